"""The entry points' Hydra glue: one module per script, each with `run(cfg)` taking the script's composed config
(`scripts/grow.py` runs `moe.tasks.grow.run`); the library below it takes plain values."""
