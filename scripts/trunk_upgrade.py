"""The trunk-upgrade experiment: sleeping experts through a trunk that has learned more, by bridge, transport, or
the old trunk kept; and whether the adapted trunk helps a tenant that comes later.

python scripts/trunk_upgrade.py experiment=clinc150_trunk_upgrade paths.output_dir=outputs/trunk_upgrade
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import trunk_upgrade


@hydra.main(version_base="1.3", config_path="../conf", config_name="trunk_upgrade")
def main(cfg: DictConfig) -> float:
    return trunk_upgrade.run(cfg)["best_one_trunk/all/delta_routed"]


if __name__ == "__main__":
    main()
