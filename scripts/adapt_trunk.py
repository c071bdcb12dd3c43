"""Train a new trunk version from a store's current trunk on its awake tenants' files, and record it in the store.

    python scripts/adapt_trunk.py store_dir=outputs/acme_store \\
        'tenants=[{name: banking, files: data/banking.csv, split_column: split}]'
"""

import hydra
from omegaconf import DictConfig

from moe.lifecycle.versions_run import run_adapt_trunk


@hydra.main(version_base="1.3", config_path="../conf", config_name="adapt_trunk")
def main(cfg: DictConfig) -> None:
    print(run_adapt_trunk(cfg)["fingerprint"])


if __name__ == "__main__":
    main()
