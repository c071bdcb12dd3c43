"""Move a store onto a new trunk version: awake tenants retrained from their files, every other tenant kept working
through its shard (a bridge, or its statistics transported), none of its data read.

    python scripts/upgrade.py store_dir=outputs/acme_store strategy=bridge \\
        'tenants=[{name: banking, files: data/banking.csv, split_column: split}]'
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import upgrade


@hydra.main(version_base="1.3", config_path="../conf", config_name="upgrade")
def main(cfg: DictConfig) -> None:
    print(upgrade.run(cfg)["tenants"])


if __name__ == "__main__":
    main()
