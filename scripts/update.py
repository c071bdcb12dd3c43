"""Update a tenant with more data or new intents: a new version (the old one is kept for rollback).

python scripts/update.py store_dir=outputs/clinc150/experts tenant.name=acme tenant.files=data/acme_more.csv
"""

import hydra
from omegaconf import DictConfig

from moe.lifecycle.config import build_lifecycle, tenant_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    lifecycle = build_lifecycle(cfg)
    print(lifecycle.update(tenant_from_config(cfg)))


if __name__ == "__main__":
    main()
