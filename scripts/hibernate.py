"""Hibernate a tenant: it leaves routing and memory; its shard is all that is kept.

python scripts/hibernate.py store_dir=outputs/clinc150/experts tenant.name=acme
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import hibernate


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    hibernate.run(cfg)


if __name__ == "__main__":
    main()
