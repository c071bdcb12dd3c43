"""The serving runtime: a checked bundle, its trunk, and its experts paged under a byte budget.

    server = Server("outputs/bundle", budget_bytes=64 << 20)
    server.predict(["what's my balance", "play some jazz"], tenant=["banking", None])

Imports neither Lightning, Hydra nor wandb. Safe to call from several threads: the trunk (whose tokenizer is not
reentrant) runs under a lock, the experts under the pager's own locking.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from moe.inference import GATE_FREE_SCORES, Answer, Bundle, IndexSettings, Verify, open_bundle, predict
from moe.model import UNKNOWN_TENANT
from moe.model.pathway import Hidden

Tenants = str | Iterable[str | None] | None


def text_problem(text: str) -> str | None:
    """Why `text` cannot be served (blank, or not encodable as UTF-8: a lone surrogate), or None."""
    if not text.strip():
        return "blank text"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"not encodable as UTF-8 (lone surrogate U+{ord(text[error.start]):04X} at position {error.start})"
    return None


def checked_texts(texts: Iterable[str]) -> list[str]:
    """`texts` as a list, each a non-blank string encodable as UTF-8; otherwise TypeError or ValueError naming every
    bad index."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be an iterable of strings, got {type(texts).__name__}") from None
    if wrong := [f"texts[{i}] is {type(t).__name__}" for i, t in enumerate(texts) if not isinstance(t, str)]:
        raise TypeError(f"texts must be strings: {'; '.join(wrong)}")
    if bad := [f"texts[{i}]: {problem}" for i, t in enumerate(texts) if (problem := text_problem(t))]:
        raise ValueError(f"texts that cannot be served: {'; '.join(bad)}")
    return texts


class Server:
    """`budget_bytes`: expert weights resident on the device at most (the gate and trunk come on top). `verify`:
    "full" checks every expert's file when the bundle opens; "lazy", for thousands of tenants, reads only each
    expert's header and routing rows then, and verifies its checksums when it is first paged in. `index`: queries
    without a tenant are routed through an index over the gate's rows (`moe.inference.index`), for thousands of
    tenants; the gate's out-of-scope scores then cover the experts it chose only."""

    def __init__(
        self,
        bundle: str | Path | Bundle,
        budget_bytes: int = 256 << 20,
        device: str = "cpu",
        host_budget_bytes: int = 0,
        max_batch: int = 1024,
        verify: Verify = "full",
        index: IndexSettings | None = None,
    ):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch = max_batch
        opened = open_bundle(bundle, device, budget_bytes, host_budget_bytes, verify, index)
        self.bundle, self.trunk, self.model = opened.bundle, opened.trunk, opened.model
        self.oos_kind, self.threshold, self.unsure_margin = opened.oos_score, opened.threshold, opened.unsure_margin
        self._trunk_lock = threading.Lock()

    @property
    def tenants(self) -> list[str]:
        return list(self.model.tenants)

    @property
    def bridged(self) -> dict[str, str]:
        """Tenants whose experts were trained on an older trunk version (they read this trunk's features through a
        bridge), with that version's fingerprint."""
        return {t: fp for t, fp in self.model.expert_trunks.items() if fp != self.trunk.fingerprint}

    def encode(self, texts: list[str]) -> torch.Tensor:
        with self._trunk_lock:
            return self.trunk.encode(texts)

    def _tenant_list(self, tenant: Tenants, n: int) -> list[str | None]:
        if tenant is None or isinstance(tenant, str):
            return [tenant] * n
        names = list(tenant)
        if len(names) != n:
            raise ValueError(f"{len(names)} tenants given for {n} texts: give one tenant, None, or one per text")
        return names

    @torch.no_grad()
    def predict_features(
        self, features: torch.Tensor, tenant: Tenants = None, hidden: Hidden | None = None
    ) -> list[Answer]:
        """Answers for trunk features `(n, d)`; `tenant` as in `predict`; `hidden`: the texts' token states after the
        shared lower layers, which pathway experts read (`model.hidden_states`)."""
        ids = self.model.tenant_ids(self._tenant_list(tenant, features.shape[0]))  # KeyError names unknown ones
        device = self.model.label_ids.device
        result: list[Answer] = []
        for start in range(0, features.shape[0], self.max_batch):
            x, t = features[start : start + self.max_batch].to(device), ids[start : start + self.max_batch]
            given = t.to(device) if (t != UNKNOWN_TENANT).any() else None
            h = hidden.take(slice(start, start + self.max_batch)) if hidden is not None else None
            result += predict(self.model, x, given, self.oos_kind, self.threshold, self.unsure_margin, hidden=h)
        return result

    def predict(self, texts: Iterable[str], tenant: Tenants = None) -> list[Answer]:
        """One answer per text (any iterable of non-blank strings encodable as UTF-8; a bad one raises TypeError or
        ValueError naming every bad index). `tenant`: None (the gate chooses among all experts), one tenant's name
        for every text, or a list with a name or None per text. An unknown tenant raises KeyError naming the known
        ones. Nothing is encoded unless every text and tenant is good."""
        texts = checked_texts(texts)
        names = self._tenant_list(tenant, len(texts))
        self.model.tenant_ids(names)  # refuse an unknown tenant before encoding anything
        answers: list[Answer] = []
        for start in range(0, len(texts), self.max_batch):
            chunk, given = texts[start : start + self.max_batch], names[start : start + self.max_batch]
            features, hidden = self._encode(chunk, given)
            answers += self.predict_features(features, given, hidden)
        return answers

    def _encode(self, texts: list[str], names: list[str | None]) -> tuple[torch.Tensor, Hidden | None]:
        """Features for the gate and, for pathway experts, the texts' token states; when every text's tenant is
        given, its pathway's features computed with the gate's in one pass (`PagedMixture.given_pass`), or alone
        where no answer reads the gate (no out-of-scope threshold, or a score in `GATE_FREE_SCORES`)."""
        with self._trunk_lock:
            tenant = self.model.tenant_ids(names) if None not in names else None
            gate = self.threshold is not None and self.oos_kind not in GATE_FREE_SCORES
            return self.model.encode(self.trunk, texts, tenant, gate)  # as its experts' kind computes them

    def stats(self) -> dict:
        """The pager's counters (hits, misses, page-ins, resident bytes)."""
        return self.model.pager.summary()
