"""PagedMixture: inference over expert shards, with only the pager's budget of expert weights resident.

The gate's rows for every registered expert stay resident (they are small); expert weights are paged in,
wave by wave, for the experts a batch actually chose. Each expert's group is computed on its own, at its own
width (`expert_logits`, the one expert formula, then a softmax over its own labels only), so a prediction never
depends on what else happened to be resident, nor on how many labels other experts have: a tenant's tenant-given
scores are bit-identical whatever else grows (tests/test_exactness.py).
`moe.inference.build.load_mixture` builds one from a store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable
from pathlib import Path

import torch

from moe.inference.index import RowIndex
from moe.inference.pager import ExpertPager
from moe.model import (
    DispatchPlan,
    ExpertInfo,
    GateRows,
    Mixture,
    RouterOutput,
    TopKRouter,
    dispatch,
)
from moe.model.bridge import AffineMap
from moe.model.evidence import expert_evidence
from moe.model.experts import expert_features, head_logits
from moe.model.kinds import ExpertForward
from moe.model.pathway import Hidden
from moe.store import ExpertMeta, ShardError, read_shard, read_tensors
from moe.store.shard import check_tensors

Key = tuple[str, int]  # (tenant, version)


def _identity(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class ShardLoader:
    """Reads expert weights for the pager. A shard is verified in full when registered (`register`), or at its first
    page-in when registered from its header (`register_header`), and again whenever its file changed since (inode,
    size or modification time); unchanged files are read without rehashing.

    Per expert it keeps only the file name, its identity and a digest of its metadata: at thousands of
    registered experts, every byte kept here is resident. `locate(key)`, when given, finds a file that disappeared
    (a remote store's cache evicted it): the copy it hands back is verified in full, as any changed file is."""

    def __init__(self, trunk_fingerprint: str | None, locate: Callable[[Hashable], Path] | None = None):
        self.trunk_fingerprint, self.locate = trunk_fingerprint, locate
        self.trunks: dict[Hashable, str] = {}  # experts on another trunk version (bridged): the one each must name
        self.paths: dict[Hashable, str] = {}
        self.identities: dict[Hashable, tuple[int, int, int] | None] = {}
        self.digests: dict[Hashable, int] = {}
        self.names: dict[Hashable, tuple[str, ...]] = {}  # the tensors each expert computes with (its kind's)

    def trunk_of(self, key: Hashable) -> str | None:
        """The trunk fingerprint `key`'s shard must name: its own bridged version's, else the model's."""
        return self.trunks.get(key, self.trunk_fingerprint)

    def register(
        self, key: Hashable, path: Path, trunk: str | None = None
    ) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
        """Read and check a shard in full, and remember it; returns its tensors and metadata. `trunk`: the shard is
        on this other trunk version (bridged to the model's)."""
        try:
            identity = _identity(path)  # before the read: a change made during it shows as a change later
        except FileNotFoundError:
            raise ShardError(path, "file not found") from None
        if trunk is not None:
            self.trunks[key] = trunk
        tensors, meta = read_shard(path, self.trunk_of(key))
        self.paths[key], self.identities[key], self.digests[key] = str(path), identity, _digest(meta)
        self.names[key] = meta.architecture.weight_names()
        return tensors, meta

    def register_header(
        self, key: Hashable, path: Path, meta: ExpertMeta, tensors: dict[str, torch.Tensor], trunk: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Remember a shard from its header (`meta`, read and checked by the caller) and the few `tensors` read from
        it (its routing entry: `ExpertStore.read_tensors`), checked here; its checksum is verified in full when it is
        first paged in. `trunk`: as for `register`."""
        if trunk is not None:
            self.trunks[key] = trunk
        expected = self.trunk_of(key)
        if expected is not None and meta.trunk_fingerprint != expected:
            fingerprints = f"{meta.trunk_fingerprint[:12]}…, not on trunk {expected[:12]}… as expected"
            raise ShardError(path, f"trained on trunk {fingerprints}")
        check_tensors(path, meta, tensors, complete=False)
        self.paths[key], self.identities[key], self.digests[key] = str(path), None, _digest(meta)
        self.names[key] = meta.architecture.weight_names()
        return tensors

    def forget(self, key: Hashable) -> None:
        for table in (self.paths, self.identities, self.digests, self.trunks, self.names):
            table.pop(key, None)

    def __call__(self, key: Hashable) -> dict[str, torch.Tensor]:
        """`key`'s tensors; a ShardError (naming the file, and carrying `key` as `error.key`) if they fail a check."""
        try:
            return self._load(key)
        except ShardError as error:
            error.key = key  # which expert failed: the server fails only the queries that need it
            raise

    def _load(self, key: Hashable) -> dict[str, torch.Tensor]:
        path = self.paths[key]
        try:
            identity = _identity(path)
        except FileNotFoundError:
            if self.locate is None:
                raise ShardError(path, "file disappeared after it was registered") from None
            path = self.paths[key] = str(self.locate(key))
            self.identities[key] = None  # a fresh copy: verified in full below
            try:
                identity = _identity(path)
            except FileNotFoundError:
                raise ShardError(path, "file disappeared after it was located again") from None
        if identity == self.identities[key]:
            return read_tensors(path, self.names[key])
        tensors, meta = read_shard(path, self.trunk_of(key))
        if _digest(meta) != self.digests[key]:
            raise ShardError(path, "file was replaced by a different expert after it was registered")
        self.identities[key] = identity
        return {name: tensors[name].clone() for name in self.names[key]}  # not views keeping every tensor alive


def _digest(meta: ExpertMeta) -> int:
    return hash(json.dumps(meta.to_dict(), sort_keys=True))


class PagedMixture(Mixture):
    def __init__(
        self,
        router: TopKRouter,
        experts: list[ExpertInfo],
        keys: list[Key],
        pager: ExpertPager,
        input_scale: float,
        gate_rows: GateRows,
    ):
        super().__init__(router, experts, input_scale, gate_rows)
        self.keys, self.pager = list(keys), pager
        self.left_out: dict[str, Exception] = {}  # tenants whose shards failed their checks (see load_mixture)
        self.damaged: dict[Key, str] = {}  # experts whose shards failed a check at a page-in, and why (`Server`)
        self.index: RowIndex | None = None  # routes batches without a known tenant (`load_mixture(index=...)`)
        self.input_maps: dict[Key, AffineMap] = {}  # experts on an older trunk: their bridge from the model's features
        self.expert_trunks: dict[str, str] = {}  # tenant -> fingerprint of the trunk version its expert was trained on
        self.forward_kind = ExpertForward()  # how its experts' kind computes them in a batch (`load_mixture` sets it)
        self.register_buffer("label_mask", self.label_ids >= 0, persistent=False)

    def route_unknown(self, x: torch.Tensor) -> RouterOutput:
        """Through the index over the gate's rows when there is one (no full scan of the gate), else every row."""
        return self.index.route(x) if self.index is not None else super().route_unknown(x)

    def hidden_states(self, texts: list[str]) -> Hidden | None:
        """What the experts read of a batch besides its features (pathway experts: its token states after the shared
        lower layers; None for experts that read the trunk's features)."""
        return self.forward_kind.hidden_states(texts)

    def encode(self, trunk, texts: list[str], tenant: torch.Tensor | None, gate: bool) -> tuple[torch.Tensor, Hidden]:
        """A batch's features for the gate and its `hidden_states`, as its experts' kind computes them (`tenant`:
        every text's, when all are given; `gate`: whether an answer reads the gate's features)."""
        return self.forward_kind.encode(self, trunk, texts, tenant, gate)

    def given_pass(self, hidden: Hidden, tenant: torch.Tensor, gate: bool = True) -> tuple[torch.Tensor, Hidden]:
        """Pathway experts, every query's tenant given: the gate's features and the pathways' in one pass
        (`moe.model.kinds.PathwayForward.given_pass`)."""
        return self.forward_kind.given_pass(self, hidden, tenant, gate)

    def group_log_probs(self, x: torch.Tensor, plan: DispatchPlan, hidden: Hidden | None = None) -> torch.Tensor:
        return self.group_outputs(x, plan, hidden)[0]

    def group_outputs(
        self, x: torch.Tensor, plan: DispatchPlan, hidden: Hidden | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities (g, n, c), and the experts' evidence (g, n) where `evidence_weight` asks for it."""
        # g: groups (chosen experts), n: capacity, c: label width
        self.forward_kind.check_hidden(hidden)
        groups = dispatch(x, plan)  # (g, n, d)
        counts = torch.bincount(plan.group, minlength=plan.experts.numel()).tolist()
        rows = torch.zeros(plan.experts.numel(), plan.capacity, dtype=torch.long, device=x.device)
        rows[plan.group, plan.slot] = plan.token  # the query in each group's slot
        experts = plan.experts.tolist()
        out = x.new_zeros(len(experts), plan.capacity, self.width)
        out.masked_fill_(~self.label_mask[plan.experts][:, None, :], float("-inf"))
        position = {self.keys[e]: i for i, e in enumerate(experts)}
        evidence = x.new_full(out.shape[:2], float("nan")) if self.evidence_weight else None
        for wave in self.pager.waves([self.keys[e] for e in experts]):
            self._compute_wave(wave, groups, counts, position, out, rows, hidden, plan.experts, evidence)
        if evidence is not None and evidence.isnan().all():  # no chosen expert keeps evidence: the gate decides
            evidence = None
        return out, evidence

    def _compute_wave(
        self, wave: list[Hashable], groups, counts, position, out, rows, hidden, experts, evidence=None
    ) -> None:
        # a function of its own: no reference to this wave's weights outlives it, so the next wave's
        # evictions free their memory before its page-ins take more
        with self.pager.acquire(wave) as resident:
            inputs = self.forward_kind.inputs(self, resident, groups, counts, position, rows, hidden, experts)
            for key, tensors in resident.items():
                i, n = position[key], counts[position[key]]
                c = tensors["head.bias"].shape[0]
                x = inputs[key]
                if key in self.input_maps:  # an expert of an older trunk reads the model's features bridged to it
                    x = self.input_maps[key](x, self.input_scale)
                z = expert_features(x, tensors)
                logits = head_logits(z, tensors)  # = expert_logits(x, tensors), the one expert formula
                out[i, :n, :c] = logits.log_softmax(dim=-1)  # its own labels only
                if evidence is not None and (own := expert_evidence(z, logits, tensors)) is not None:
                    evidence[i, :n] = own
