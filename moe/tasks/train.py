"""`run(cfg)`: the whole training run from a composed Hydra config. Scripts and tests call this."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_file

from moe.data import Tenant, TenantDataModule
from moe.evaluation import Evaluation, evaluate_store
from moe.model import ExpertInfo, build_mixture
from moe.model.evidence import fit_evidence
from moe.model.kinds import KINDS
from moe.model.pathway import PathwayLayout, Pathways
from moe.model.stats import COUNT, class_statistics
from moe.paths import cache_dir
from moe.progress import lightning_bar
from moe.store import ExpertStore, check_tenant_name, expert_shards, save_gate
from moe.store.assemble import Shard
from moe.store.trunks import TrunkVersions
from moe.tasks.base import instantiate_group, open_loggers, task
from moe.training.module import MixtureClassifier
from moe.training.pathway import PathwayConfig, train_pathway
from moe.trunk import FeatureCache, Trunk

log = logging.getLogger(__name__)
TENANT_METRICS = ("queries", "acc_routed", "acc_tenant_given", "routing_acc", "macro_f1")  # recorded in its shard


def check_tenant_names(names: Iterable[object]) -> list[str]:
    """`names` if each can name a tenant (`check_tenant_name`) and no two are one name in any case (their shards'
    folders would be one on a case-insensitive file system); else a ValueError saying which."""
    seen: dict[str, str] = {}
    for name in names:
        name = check_tenant_name(name)
        if (other := seen.get(name.lower())) is not None:
            clash = "is given twice" if other == name else f"differs only in case from tenant {other!r}"
            raise ValueError(f"tenant name {name!r} {clash} in data.tenants")
        seen[name.lower()] = name
    return list(seen.values())


def configured_tenant_names(cfg: DictConfig) -> list[object]:
    """The names `data.tenants` gives (a list of entries with a `name`, as in conf/data/tenant_files.yaml), as
    given: before any file is read."""
    entries = cfg.data.get("tenants")
    if not isinstance(entries, ListConfig):
        return []
    return [entry.get("name") for entry in entries if isinstance(entry, DictConfig) and "name" in entry]


def load_tenants(cfg: DictConfig) -> list[Tenant]:
    """`data.tenants`, their names checked before their files are read and again once they are."""
    check_tenant_names(configured_tenant_names(cfg))
    tenants: list[Tenant] = list(instantiate(cfg.data.tenants, _convert_="all"))
    check_tenant_names(tenant.name for tenant in tenants)
    return tenants


def check_run_folder(cfg: DictConfig) -> None:
    """A run writes its experts into an experts folder of its own: one that holds shards already (an earlier run's)
    is refused, since this run's would be stacked on them as later versions (a store that, with another
    architecture, no longer loads)."""
    experts = Path(cfg.paths.experts_dir)
    if experts.is_dir() and (shard := next(experts.rglob("*.safetensors"), None)) is not None:
        raise FileExistsError(
            f"{experts} already holds expert shards (e.g. {shard.relative_to(experts)}), from an earlier run: choose "
            "another paths.output_dir, or remove that run first"
        )


def build_data(cfg: DictConfig, trunk: Trunk, tenants: list[Tenant] | None = None) -> TenantDataModule:
    """The data module over `tenants` (default: `data.tenants`, loaded)."""
    tenants = load_tenants(cfg) if tenants is None else tenants
    encoder = None
    if trunk.frozen:
        root = Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else cache_dir()
        encoder = FeatureCache(root / "features", trunk).encode
    return TenantDataModule(tenants, encoder, cfg.data.batch_size, cfg.data.eval_batch_size)


def build_classifier(cfg: DictConfig, tenants: list[Tenant], trunk: Trunk) -> MixtureClassifier:
    model = build_mixture(
        [ExpertInfo(t.name, t.labels) for t in tenants],
        trunk.dim,
        gate_rows=cfg.gate.rows,
        top_k=cfg.gate.top_k,
        normalize_weights=cfg.gate.normalize_weights,
        rank=cfg.expert.rank,
        dropout=cfg.expert.dropout,
        input_scale=cfg.expert.input_scale,
    )
    return MixtureClassifier(
        model,
        tenants,
        trunk=None if trunk.frozen else trunk,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        gate_weight=1.0 if cfg.gate.supervised else 0.0,
        routed_weight=cfg.gate.routed_weight,
        load_balance_weight=cfg.gate.load_balance_weight,
        z_loss_weight=cfg.gate.z_loss_weight,
    )


@torch.no_grad()
def training_statistics(data: TenantDataModule, trunk: Trunk) -> dict[str, dict[str, torch.Tensor]]:
    """Class means, counts and scatter of each tenant's training features, for its shard."""
    train = data.datasets["train"]
    features = train.features if train.features is not None else trunk.eval()(train.texts)
    return {
        tenant.name: class_statistics(features[train.tenant == t], train.label[train.tenant == t], len(tenant.labels))
        for t, tenant in enumerate(data.tenants)
    }


def pathway_config(cfg: DictConfig) -> PathwayConfig | None:
    """The run's pathway experts (`expert=pathway`: a kind that trains on texts, through the trunk), or None for
    experts over the trunk's features, trained with the gate."""
    kind = cfg.expert.get("kind", "adapter")
    if kind not in KINDS:
        raise ValueError(f"expert.kind {kind!r} is not a kind of expert: choose among {sorted(KINDS)}")
    if not KINDS[kind].trains_on_texts:
        return None
    settings = OmegaConf.to_container(cfg.expert.pathway, resolve=True)
    own = {"rank": cfg.expert.rank, "dropout": cfg.expert.dropout, "input_scale": cfg.expert.input_scale}
    return PathwayConfig(**settings, **own, accelerator=cfg.trainer.get("accelerator", "cpu"), seed=cfg.seed)


def pathway_shards(shards: list[Shard], data: TenantDataModule, trunk: Trunk, cfg: PathwayConfig) -> list[Shard]:
    """Each tenant's pathway expert, trained in Lightning on its own train texts through the frozen trunk's top
    layers, in place of the expert its shard holds (the gate's rows and the trunk-feature statistics stay)."""
    if not trunk.frozen or not hasattr(trunk, "tokens"):
        raise ValueError("pathway experts adapt a frozen Hugging Face encoder trunk (trunk=minilm, trunk.freeze=true)")
    pathways, train = Pathways(trunk, cfg.spec()), data.datasets["train"]
    out = []
    for t, (tensors, meta) in enumerate(shards):
        assert meta.tenant == data.tenants[t].name  # the mixture's experts are the data module's tenants, in order
        rows = (train.tenant == t).nonzero().flatten().tolist()
        texts, labels = [train.texts[i] for i in rows], train.label[rows]
        start = time.perf_counter()
        pathway, expert = train_pathway(pathways, texts, labels, len(meta.labels), cfg)
        log.info("pathway of %s trained in %.1f s", meta.tenant, time.perf_counter() - start)
        layout = PathwayLayout.of(cfg.spec(), trunk)
        arch = replace(meta.architecture, rank=cfg.rank, kind="pathway", pathway=layout)
        out.append((tensors | expert | pathway, replace(meta, architecture=arch)))
    return out


class EvidenceInputs(NamedTuple):
    """What one tenant's evidence is fitted from (`fit_evidence`): the features its expert reads of its own train
    rows (n, d) and their labels (n,), and of its own val rows (m, d), or None where it has none."""

    features: torch.Tensor
    labels: torch.Tensor
    held_out: torch.Tensor | None


@torch.no_grad()
def evidence_inputs(shards: list[Shard], data: TenantDataModule, trunk: Trunk) -> list[EvidenceInputs]:
    """Each shard's `EvidenceInputs`, from its own tenant's rows only (a pathway expert: its own texts through its
    own pathway, the costly part; computed once, they serve evidence of every kind and shrinkage)."""
    out, train, val = [], data.datasets["train"], data.datasets["val"]
    for t, (tensors, meta) in enumerate(shards):
        arch = meta.architecture
        own = (train.tenant == t).nonzero().flatten().tolist()
        held = (val.tenant == t).nonzero().flatten().tolist()
        if arch.kind == "pathway":  # the features of its own pathway
            pathways = Pathways(trunk, arch.pathway.spec)
            lora = {name: tensors[name] for name in arch.pathway.lora_shapes(arch.dim)}
            features = pathways.encode([train.texts[i] for i in own], lora)
            held_out = pathways.encode([val.texts[i] for i in held], lora) if held else None
        else:
            features = train.features[own] if train.features is not None else trunk.eval()(train.texts)[own]
            held_out = val.features[held] if val.features is not None and held else None
        out.append(EvidenceInputs(features, train.label[own], held_out))
    return out


@torch.no_grad()
def with_evidence(
    shards: list[Shard],
    data: TenantDataModule,
    trunk: Trunk,
    kind: str,
    shrinkage: float,
    inputs: list[EvidenceInputs] | None = None,
) -> list[Shard]:
    """Each shard with its expert's evidence for routing (`moe.model.evidence`), from its own tenant's rows only: the
    features its expert reads of its train split, calibrated on its val split (`kind` "none": as they are).
    `inputs`: those features, computed already (`evidence_inputs` of these shards and data)."""
    if kind == "none":
        return shards
    inputs = evidence_inputs(shards, data, trunk) if inputs is None else inputs
    if len(inputs) != len(shards):
        raise ValueError(f"{len(inputs)} tenants' evidence inputs given for {len(shards)} shards")
    out = []
    for (tensors, meta), (features, labels, held_out) in zip(shards, inputs, strict=True):
        arch = replace(meta.architecture, evidence=kind)
        evidence = fit_evidence(kind, tensors, features, labels, held_out, arch.input_scale, shrinkage)
        out.append((tensors | evidence, replace(meta, architecture=arch)))
    return out


def tenant_metrics(evaluation: Evaluation) -> dict[str, dict]:
    """Each tenant's own figures, split by split ({"test/acc_routed": ...}), as its shard records them."""
    own: dict[str, dict] = {}
    for row in evaluation.per_tenant:
        own.setdefault(row["tenant"], {}).update({f"{row['split']}/{k}": row[k] for k in TENANT_METRICS})
    return own


@task
def run(cfg: DictConfig) -> dict[str, float]:
    """Train gate and experts, evaluate them as `scripts/evaluate.py` would, and write config, shards (each with its
    tenant's own figures), gate and metrics under `paths.output_dir`. Before any work: the experts folder must hold
    no shards, and the tenants' names must be names a store takes."""
    L.seed_everything(cfg.seed, workers=True)
    check_run_folder(cfg)
    tenants = load_tenants(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    trunk: Trunk = instantiate(cfg.trunk)
    data = build_data(cfg, trunk, tenants)
    data.setup()
    classifier = build_classifier(cfg, data.tenants, trunk)

    loggers: list[Logger] = open_loggers(cfg)  # closed by `task`, whether the run succeeds or fails
    callbacks, bar = instantiate_group(cfg.get("callbacks")), lightning_bar()  # no bar in logs and CI
    callbacks = [c for c in callbacks if bar or not isinstance(c, ProgressBar)]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, enable_progress_bar=bar)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    trainer.fit(classifier, datamodule=data)
    train_s = time.perf_counter() - start

    # The run's one evaluation: its shards, paged, on its in-memory splits, as scripts/evaluate.py computes it.
    # Every rank evaluates its own copy (under DDP the experts are the same on all), so every rank returns the
    # same figures; rank 0 then writes the shards, each with its own tenant's figures, to the store.
    fingerprint, stats = trunk.fingerprint, training_statistics(data, trunk)
    shards = list(expert_shards(classifier.model, fingerprint, stats))
    if (pathway := pathway_config(cfg)) is not None:  # the gate trained above; each tenant's pathway now
        start = time.perf_counter()
        shards = pathway_shards(shards, data, trunk, pathway)
        train_s += time.perf_counter() - start
    evidence = cfg.get("evidence") or {}
    shards = with_evidence(shards, data, trunk, evidence.get("kind", "none"), float(evidence.get("shrinkage", 0.1)))
    encoder = data.encoder or trunk.eval().encode
    splits = [split for split in ("val", "test") if len(data.datasets[split])]
    with tempfile.TemporaryDirectory(prefix="moe-staging-") as staging:
        staged = ExpertStore(staging)
        for tensors, meta in shards:
            staged.save(tensors, meta)
        gate_file = save_gate(
            Path(staging) / "gate.safetensors", classifier.model, fingerprint, shards[0][1].architecture
        )
        evaluation = evaluate_store(
            staged.root, data.tenants, splits, encoder, cfg.data.eval_batch_size, gate_file, fingerprint, trunk
        )

    metrics = {**evaluation.metrics, "time/encode_s": data.encode_seconds, "time/train_s": train_s}
    metrics |= {"data/tenants": len(data.tenants), "data/train_examples": len(data.datasets["train"])}
    tensors, meta = shards[0]
    metrics["expert/weight_bytes"] = sum(tensors[name].nbytes for name in meta.architecture.weight_names())
    if trainer.is_global_zero:
        store, own = ExpertStore(cfg.paths.experts_dir), tenant_metrics(evaluation)
        for tensors, meta in shards:
            examples = int(stats[meta.tenant][COUNT].sum())
            meta = replace(meta, metrics=own.get(meta.tenant, {}) | {"train_examples": examples})
            path = store.save(tensors, meta)
            log.info("saved expert %s to %s", meta.tenant, path)
        versions = TrunkVersions(store.root)  # the store describes its trunk: what rebuilds it, that it serves on it
        versions.record(trunk, note="the training run's trunk", weights=not trunk.frozen)
        versions.set_current(fingerprint)
        save_gate(out / "gate.safetensors", classifier.model, fingerprint, shards[0][1].architecture)
        if not trunk.frozen:  # the trunk trained with the experts: keep the weights their shards were made on
            save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, out / "trunk.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for logger in loggers:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics
