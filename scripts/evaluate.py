"""Evaluate a trained expert store or an exported bundle (see conf/evaluate.yaml).

python scripts/evaluate.py store_dir=outputs/clinc150/experts paths.output_dir=outputs/eval_clinc150
python scripts/evaluate.py bundle_dir=outputs/bundle_clinc150 paths.output_dir=outputs/eval_bundle
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate.run(cfg)


if __name__ == "__main__":
    main()
