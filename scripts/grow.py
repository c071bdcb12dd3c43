"""Grow a new tenant from its own CSV/JSONL file: trains only its expert and routing entry. The file is streamed
(its train rows are held as trunk features only); the name and every row are checked before the trunk loads.

From one example per intent up: a tenant whose smallest intent has fewer train rows than growth.few_shot_below is
grown by growth.few_shot_method, and its shard records how (docs/lifecycle.md, Few examples). The minimums kept: a
store's first tenant, and every tenant of a store with Mahalanobis evidence, need two different examples of one
intent (a covariance of their own rows: `moe.lifecycle.operations.check_spread` says why).

    python scripts/grow.py store_dir=outputs/clinc150/experts tenant.name=acme tenant.files=data/acme.csv \\
        tenant.text_column=utterance tenant.label_column=intent
    python scripts/grow.py store_dir=outputs/new_store create_store=true tenant.name=acme tenant.files=data/acme.csv
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import grow


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    print(grow.run(cfg))


if __name__ == "__main__":
    main()
