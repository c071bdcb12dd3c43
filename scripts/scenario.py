"""The continual experiment: grow, update, hibernate, wake and retire tenants, evaluating after each event.

python scripts/scenario.py experiment=clinc150_incremental paths.output_dir=outputs/incremental
python scripts/scenario.py experiment=clinc150_incremental routing=trained   # rows trained against the others'
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import scenario


@hydra.main(version_base="1.3", config_path="../conf", config_name="scenario")
def main(cfg: DictConfig) -> float:
    return scenario.run(cfg)["final/acc_routed"]


if __name__ == "__main__":
    main()
