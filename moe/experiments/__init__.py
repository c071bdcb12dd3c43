"""Research experiments built on the library: the continual scenario and its baselines, the trunk upgrade, their
plots, and the benchmarks' shared helpers (`moe.experiments.bench`). Their entry points are in `moe.tasks`."""
