"""Grow a new tenant from its own CSV/JSONL file: trains only its expert and routing entry.

    python scripts/grow.py store_dir=outputs/clinc150/experts tenant.name=acme tenant.files=data/acme.csv \\
        tenant.text_column=utterance tenant.label_column=intent
"""

import hydra
from omegaconf import DictConfig

from moe.lifecycle.config import build_lifecycle, tenant_from_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    lifecycle = build_lifecycle(cfg)
    print(lifecycle.grow(tenant_from_config(cfg)))


if __name__ == "__main__":
    main()
