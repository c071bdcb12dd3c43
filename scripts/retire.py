"""Retire a tenant for good: its folder is archived (archive_dir=...) or deleted (archive_dir=null).

python scripts/retire.py store_dir=outputs/clinc150/experts tenant.name=acme archive_dir=outputs/archive
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import retire


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    print(retire.run(cfg))


if __name__ == "__main__":
    main()
