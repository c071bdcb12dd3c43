"""The entry points' Hydra glue: one module per script, each with `run(cfg)` taking the script's composed config
(`scripts/grow.py` runs `moe.tasks.grow.run`) through one wrapper (`moe.tasks.base.task`) that closes its loggers.
Only this package reads a Hydra config; the library below it takes plain values (tests/test_layers.py checks)."""
