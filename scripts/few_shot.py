"""Learning curves of growth: each tenant grown into a store of the others with k examples per intent, by each growth
method, beside a logistic-regression probe (settings chosen on the development domains, reported on the others).

python scripts/few_shot.py experiment=clinc150_few_shot paths.output_dir=outputs/few_shot
python scripts/few_shot.py experiment=clinc150_pathway_few_shot paths.output_dir=outputs/pathway_few_shot
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import few_shot


@hydra.main(version_base="1.3", config_path="../conf", config_name="few_shot")
def main(cfg: DictConfig) -> None:
    few_shot.run(cfg)


if __name__ == "__main__":
    main()
