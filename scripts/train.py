"""Train tenant experts and their gate.

python scripts/train.py experiment=clinc150 paths.output_dir=outputs/clinc150
python scripts/train.py experiment=tiny logger=csv            # a seconds-long smoke run
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train.run(cfg)[cfg.optimized_metric]


if __name__ == "__main__":
    main()
