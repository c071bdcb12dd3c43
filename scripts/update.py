"""Update a tenant with more data or new intents: a new version (the old one is kept for rollback).

python scripts/update.py store_dir=outputs/clinc150/experts tenant.name=acme tenant.files=data/acme_more.csv

The file is streamed as grow streams it. A hibernating tenant is refused unless allow_dormant=true.
A tenant grown from few examples stays with its method until every intent has growth.few_shot_below rows seen so far,
then moves to the full method as this new version (docs/lifecycle.md, Few examples).
"""

import hydra
from omegaconf import DictConfig

from moe.tasks import update


@hydra.main(version_base="1.3", config_path="../conf", config_name="lifecycle")
def main(cfg: DictConfig) -> None:
    print(update.run(cfg))


if __name__ == "__main__":
    main()
