"""Wake a hibernating tenant: it routes again, with the predictions it had when it went to sleep.

python scripts/wake.py store_dir=outputs/clinc150/experts tenant.name=acme
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import wake


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    wake.run(cfg)


if __name__ == "__main__":
    main()
