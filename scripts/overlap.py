"""Which tenants' intents are confusable with which, known before any query: every awake tenant's stored class
statistics compared pairwise under the statistics gate's pooled covariance (no data, no trunk).

    python scripts/overlap.py store_dir=outputs/clinc150/experts paths.output_dir=outputs/overlap
    python scripts/overlap.py store_dir=... min_confusion=0 top=null   # every cross-tenant pair
"""

import hydra
from omegaconf import DictConfig

from moe.lifecycle.overlap import describe
from moe.tasks import overlap


@hydra.main(version_base="1.3", config_path="../conf", config_name="overlap")
def main(cfg: DictConfig) -> None:
    report, paths = overlap.run(cfg)
    o = report.overlap
    print(f"{len(o.tenants)} tenants, {o.intents} intents, {o.compared} cross-tenant pairs compared; closest:")
    print("\n".join(f"  {line}" for line in describe(o.pairs)))
    print("written:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
