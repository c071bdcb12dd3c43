"""Export a trained expert store as a serving bundle (see conf/export.yaml).

python scripts/export.py store_dir=outputs/clinc150/experts paths.output_dir=outputs/bundle_clinc150
python scripts/export.py store_dir=outputs/clinc150/experts export.dtype=bfloat16 paths.output_dir=outputs/bundle_bf16
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import export


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export.run(cfg)


if __name__ == "__main__":
    main()
