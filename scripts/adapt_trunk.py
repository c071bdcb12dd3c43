"""Train a new trunk version from a store's current trunk on its awake tenants' files, and record it in the store.

    python scripts/adapt_trunk.py store_dir=outputs/acme_store \\
        'tenants=[{name: banking, files: data/banking.csv, split_column: split}]'
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import adapt_trunk


@hydra.main(version_base="1.3", config_path="../conf", config_name="adapt_trunk")
def main(cfg: DictConfig) -> None:
    print(adapt_trunk.run(cfg)["fingerprint"])


if __name__ == "__main__":
    main()
