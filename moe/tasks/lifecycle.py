"""What the lifecycle tasks (`moe.tasks.grow`, `update`, `hibernate`, `wake`, `retire`) share, from a composed
`conf/lifecycle.yaml`.

Each operation checks what it is given before any work starts: the tenant's name (`check_tenant_name`; for grow also
`ExpertStore.check_new_tenant`: no clash, in any case, with a tenant in the store), that `store_dir` is an existing
store (grow may start a new one with `create_store=true`), and for grow and update every row of the tenant's file.
Only then does the trunk load. Grow and update stream the file (`moe.lifecycle.stream`): its train rows are held as
features, never as rows or texts; but for pathway experts, which train on the texts themselves (through the trunk's
layers), the file is read whole.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe.data import Tenant, TenantFile, read_tenant_file
from moe.lifecycle.growth import GrowthConfig
from moe.lifecycle.operations import Lifecycle
from moe.lifecycle.stream import EncodedRows, ScannedFile, encode_train_rows
from moe.store import ExpertStore, check_tenant_name
from moe.store.trunks import serving_trunk
from moe.trunk import Trunk


def growth_config(cfg: DictConfig) -> GrowthConfig:
    """`growth` with the routing group's settings (`routing.source` says where a new expert's rows come from)."""
    routing = {k: v for k, v in cfg.routing.items() if k in GrowthConfig.__dataclass_fields__}
    return GrowthConfig(**OmegaConf.to_container(cfg.growth, resolve=True), **routing)


def tenant_name(cfg: DictConfig) -> str:
    """`tenant.name`, if it can name a tenant (a ValueError saying why not: `tenant.name=123` is a number)."""
    return check_tenant_name(cfg.tenant.name)


def open_store(cfg: DictConfig, create: bool | None = None) -> ExpertStore:
    """The store at `store_dir`, which must exist unless `create` (grow's `create_store`; None: an operation that
    can not start a store). A new store's folder is made by its first save."""
    root = Path(cfg.store_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"store_dir {root} is a file, not an expert store's folder")
    if not root.exists() and not create:
        hint = " (a typo?); create_store=true starts a new store there" if create is not None else ""
        raise FileNotFoundError(f"store_dir {root} does not exist{hint}")
    return ExpertStore(root)


def build_lifecycle(cfg: DictConfig, store: ExpertStore | None = None) -> Lifecycle:
    """Loads the trunk (the work every check comes before). Texts are encoded by the trunk itself: a feature
    cache would hold every feature of a large file in memory a second time."""
    store = store or open_store(cfg)
    trunk = current_trunk(store, cfg.trunk)
    if not trunk.frozen:
        raise ValueError("lifecycle operations need a frozen trunk (the one the store's experts were trained on)")
    return Lifecycle(store, trunk, trunk.encode, growth_config(cfg))


def current_trunk(store: ExpertStore, trunk_cfg: DictConfig) -> Trunk:
    """The trunk the store serves on, from the store alone (`serving_trunk`); `trunk_cfg`'s only for a store that
    records none (a new store, or one trained before training recorded its trunk)."""
    return serving_trunk(store.root, lambda: (instantiate(trunk_cfg), False))[0]


def tenant_file(cfg: DictConfig, name: str | None = None) -> TenantFile:
    """`tenant` as the file(s) it names (not read yet)."""
    if not cfg.tenant.files:
        raise ValueError("this operation needs the tenant's data: set tenant.files=PATH (CSV or JSONL)")
    return TenantFile.from_entry({**cfg.tenant, "name": tenant_name(cfg) if name is None else name})


def training_data(entry: TenantFile, scanned: ScannedFile, lifecycle: Lifecycle) -> tuple[Tenant, EncodedRows | None]:
    """What grow and update train on: the tenant (no examples) and its train rows encoded as its file streams by;
    for a store of pathway experts, which train on the texts, the tenant read whole and nothing encoded."""
    if lifecycle.trains_on_texts():
        columns = (entry.text_column, entry.label_column, entry.split_column)
        return read_tenant_file(entry.name, entry.files, *columns), None
    return scanned.tenant, encode_train_rows(entry, scanned, lifecycle.encode)
