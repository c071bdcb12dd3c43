"""The serving runtime: a checked bundle, or an expert store it follows, with its trunk and its experts paged under a
byte budget.

    server = Server("outputs/bundle", budget_bytes=64 << 20)
    server.predict(["what's my balance", "play some jazz"], tenant=["banking", None])

    server = Server("experts/", follow_s=1.0)        # a store (or s3://bucket/prefix): follows its generations

Imports neither Lightning, Hydra nor wandb. Safe to call from several threads: the trunk (whose tokenizer is not
reentrant) runs under a lock, the experts under the pager's own locking.

Everything a request is answered by (trunk, mixture, out-of-scope rule, generation) is one `ServingState`, replaced
whole and never changed in place: a request reads `server.state` once and is answered by it alone, so a swap to the
store's next generation (`refresh`, or the background poll `follow` starts) never answers it half by one generation
and half by the next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from moe.inference import GATE_FREE_SCORES, Answer, Bundle, GateSettings, IndexSettings, Verify, predict
from moe.model import UNKNOWN_TENANT
from moe.model.pathway import Hidden
from moe.serving.follow import Follower, ServingState, StoreSource, open_source
from moe.store import ExpertStore, ShardError
from moe.trunk import Trunk

log = logging.getLogger(__name__)

Tenants = str | Iterable[str | None] | None
Among = Iterable[Iterable[str] | None] | None  # per query, the tenants it may be routed among (None: any)


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


class ExpertUnavailable(RuntimeError):
    """A query for a tenant whose expert is damaged on this server: its answer in `Server.predict_each`, in place of
    an `Answer`. The message names the query's own tenant only (never another's, nor a path of the server's)."""

    def __init__(self, tenant: str):
        super().__init__(f"the expert of tenant {tenant!r} is damaged on this server and can not answer")
        self.tenant = tenant


class Server:
    """`source`: a bundle (folder, URL or `Bundle`) or an expert store (folder, `s3://` URL or `ExpertStore`). A store
    is served at its latest generation (`moe.store.generation`) with `gate`, the out-of-scope rule (`oos_score`,
    `threshold`, `unsure_margin`) and its own trunk (`trunk`, if given, must be it); `follow_s`: poll it every so
    many seconds in the background and swap to each new generation (`refresh` does it once, now).

    `budget_bytes`: expert weights resident on the device at most (the gate and trunk come on top). `verify`:
    "full" checks every expert's file when the bundle opens; "lazy", for thousands of tenants, reads only each
    expert's header and routing rows then, and verifies its checksums when it is first paged in. `index`: queries
    without a tenant are routed through an index over the gate's rows (`moe.inference.index`), for thousands of
    tenants; the gate's out-of-scope scores then cover the experts it chose only."""

    def __init__(
        self,
        source: str | Path | Bundle | ExpertStore,
        budget_bytes: int = 256 << 20,
        device: str = "cpu",
        host_budget_bytes: int = 0,
        max_batch: int = 1024,
        verify: Verify = "full",
        index: IndexSettings | None = None,
        *,
        gate: GateSettings | None = None,
        oos_score: str | None = None,
        threshold: float | None = None,
        unsure_margin: float | None = None,
        trunk: Trunk | None = None,
        store_options: dict | None = None,
        follow_s: float | None = None,
    ):
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.max_batch = max_batch
        store_settings = dict(gate=gate, oos_score=oos_score, threshold=threshold, unsure_margin=unsure_margin)
        self.source = open_source(
            source, device, budget_bytes, host_budget_bytes, verify, index, store_options, **store_settings, trunk=trunk
        )
        self._state = self.source.build()
        self._trunk_lock, self._refresh_lock = threading.Lock(), threading.Lock()
        self.follower = Follower(self, follow_s) if follow_s is not None else None

    # -- the state answered from: one reference, swapped whole -----------------------------------------------------

    @property
    def state(self) -> ServingState:
        """What a request is answered by: read it once per request and pass it on (`predict(..., state=)`)."""
        return self._state

    @property
    def follows_store(self) -> bool:
        return isinstance(self.source, StoreSource)

    def refresh(self) -> bool:
        """Swap to the store's latest generation if it is not the one served (built whole first, then swapped in one
        assignment: requests already running keep the state they started with). Whether it swapped."""
        if not isinstance(self.source, StoreSource):
            return False
        with self._refresh_lock:
            if self.source.generation() == self._state.generation:
                return False
            state = self.source.build(self._state)
            if state.generation == self._state.generation:
                return False
            changes = state.store_state.changes if state.store_state else ()
            log.info("serving generation %s (was %s): %s", state.generation, self._state.generation, list(changes))
            self._state = state
            return True

    def close(self) -> None:
        """Stop following the store (the state served stays)."""
        if self.follower is not None:
            self.follower.stop()

    # the current state's parts, for callers that answer one request at a time
    bundle = property(lambda self: self._state.bundle)
    trunk = property(lambda self: self._state.trunk)
    model = property(lambda self: self._state.model)
    oos_kind = property(lambda self: self._state.oos_kind)
    threshold = property(lambda self: self._state.threshold)
    unsure_margin = property(lambda self: self._state.unsure_margin)
    generation = property(lambda self: self._state.generation)

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

    def _among_mask(self, among: Among, n: int, state: ServingState) -> torch.Tensor | None:
        """(n, e) the experts each query may be routed to in `state`; ValueError for a query whose tenants are none
        served."""
        sets = [None if a is None else frozenset(a) for a in among] if among is not None else [None] * n
        if len(sets) != n:
            raise ValueError(f"{len(sets)} tenant sets given for {n} texts: give one per text (None: any tenant)")
        healthy = self.healthy(state)
        if all(a is None for a in sets) and healthy is None:
            return None
        everyone = torch.ones_like(state.model.expert_tenant, dtype=torch.bool) if healthy is None else healthy
        masks = {a: state.model.experts_among(a) & everyone for a in set(sets) if a is not None}
        if empty := sorted(sorted(a) for a, m in masks.items() if not m.any()):
            raise ValueError(f"no tenant served among {empty[0]}: a query can not be routed among none")
        return torch.stack([everyone if a is None else masks[a] for a in sets])

    @staticmethod
    def healthy(state: ServingState) -> torch.Tensor | None:
        """(e,) the experts a routed query may choose in `state`: all but those found damaged at a page-in
        (`PagedMixture.damaged`); None while none is."""
        if not state.model.damaged:
            return None
        return torch.tensor([key not in state.model.damaged for key in state.model.keys], dtype=torch.bool)

    @torch.no_grad()
    def predict_features(
        self,
        features: torch.Tensor,
        tenant: Tenants = None,
        hidden: Hidden | None = None,
        state: ServingState | None = None,
        among: Among = None,
    ) -> list[Answer]:
        """Answers for trunk features `(n, d)`; `tenant` and `among` as in `predict`; `hidden`: the texts' token
        states after the shared lower layers, which pathway experts read (`model.hidden_states`); `state`: the one
        to answer by (default: the current one)."""
        state = state or self._state
        model = state.model
        ids = model.tenant_ids(self._tenant_list(tenant, features.shape[0]))  # KeyError names unknown ones
        allowed = self._among_mask(among, features.shape[0], state)
        device = model.label_ids.device
        result: list[Answer] = []
        for start in range(0, features.shape[0], self.max_batch):
            x, t = features[start : start + self.max_batch].to(device), ids[start : start + self.max_batch]
            given = t.to(device) if (t != UNKNOWN_TENANT).any() else None
            h = hidden.take(slice(start, start + self.max_batch)) if hidden is not None else None
            a = allowed[start : start + self.max_batch].to(device) if allowed is not None else None
            result += predict(model, x, given, state.oos_kind, state.threshold, state.unsure_margin, hidden=h, among=a)
        return result

    def predict(
        self, texts: Iterable[str], tenant: Tenants = None, state: ServingState | None = None, among: Among = None
    ) -> list[Answer]:
        """One answer per text (any iterable of non-blank strings encodable as UTF-8; a bad one raises TypeError or
        ValueError naming every bad index). `tenant`: None (the gate chooses among all experts), one tenant's name
        for every text, or a list with a name or None per text. An unknown tenant raises KeyError naming the known
        ones. `among`: per text, the tenants a text without a tenant may be routed to (None: any; an API key's
        tenants), in the same mixed batch as the rest. Nothing is encoded unless every text and tenant is good.
        Every answer comes from one state (`state`, default the current one), whatever is swapped in meanwhile."""
        state = state or self._state
        texts = checked_texts(texts)
        names = self._tenant_list(tenant, len(texts))
        state.model.tenant_ids(names)  # refuse an unknown tenant before encoding anything
        sets = list(among) if among is not None else [None] * len(texts)
        self._among_mask(sets, len(texts), state)  # and a set of tenants none of which is served
        answers: list[Answer] = []
        for start in range(0, len(texts), self.max_batch):
            chunk, given = texts[start : start + self.max_batch], names[start : start + self.max_batch]
            features, hidden = self._encode(chunk, given, state)
            answers += self.predict_features(features, given, hidden, state, sets[start : start + self.max_batch])
        return answers

    def predict_each(
        self, queries: list[tuple[str, str | None, Iterable[str] | None, ServingState]]
    ) -> list[Answer | ExpertUnavailable]:
        """Answers to (text, tenant, tenants routed among, state) queries in order, each by its own state: queries of
        concurrent requests answered together in one mixed forward, every request by the state it started with (one
        forward per state, normally one).

        Faults stay with their tenant: an expert whose shard fails its checks when paged in is marked damaged in its
        state (`PagedMixture.damaged`, logged) and the forward runs again without it. A query naming its tenant gets
        `ExpertUnavailable` in place of its answer; a routed query is answered by the remaining candidates (the
        damaged expert is never chosen again in that state); every other query is answered as if it were absent."""
        groups: dict[int, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(id(query[3]), []).append(i)
        answers: list[Answer | ExpertUnavailable | None] = [None] * len(queries)
        for positions in groups.values():
            self._answer_group(queries, positions, answers)
        return answers  # type: ignore[return-value]

    def _answer_group(self, queries: list[tuple], positions: list[int], answers: list) -> None:
        state: ServingState = queries[positions[0]][3]
        for _ in range(len(state.model.keys) + 1):  # each pass marks one more expert damaged, or answers
            damaged = {state.tenant_of[key] for key in state.model.damaged}
            todo = []
            for i in positions:
                if queries[i][1] in damaged:
                    answers[i] = ExpertUnavailable(queries[i][1])
                else:
                    todo.append(i)
            if not todo:
                return
            texts, tenants, among, _ = (list(c) for c in zip(*(queries[i] for i in todo), strict=True))
            restricted = among if any(a is not None for a in among) else None
            try:
                result = self.predict(texts, tenants, state, restricted)
            except ShardError as error:
                key = getattr(error, "key", None)
                if key not in state.tenant_of or key in state.model.damaged:
                    raise
                state.model.damaged[key] = error.reason
                log.error("expert %s damaged, left out of generation %s: %s", key, state.generation, error)
                continue
            for i, answer in zip(todo, result, strict=True):
                answers[i] = answer
            return
        raise RuntimeError("no forward left after marking every expert damaged")  # unreachable: bounded above

    def _encode(
        self, texts: list[str], names: list[str | None], state: ServingState
    ) -> tuple[torch.Tensor, Hidden | None]:
        """Features for the gate and, for pathway experts, the texts' token states; when every text's tenant is
        given, its pathway's features computed with the gate's in one pass (`PagedMixture.given_pass`), or alone
        where no answer reads the gate (no out-of-scope threshold, or a score in `GATE_FREE_SCORES`)."""
        model, trunk = state.model, state.trunk
        with self._trunk_lock:
            tenant = model.tenant_ids(names) if None not in names else None
            gate = state.threshold is not None and state.oos_kind not in GATE_FREE_SCORES
            return model.encode(trunk, texts, tenant, gate)  # as its experts' kind computes them

    def stats(self) -> dict:
        """The pager's counters (hits, misses, page-ins, resident bytes)."""
        return self.model.pager.summary()

    def damaged(self, state: ServingState | None = None) -> dict[str, str]:
        """The tenants not answered because their experts are damaged, and why: left out when the state was built
        (their shards failed verification) or found at a page-in since."""
        state = state or self._state
        found = {t: str(problem) for t, problem in state.model.left_out.items()}
        return found | {state.tenant_of[key]: reason for key, reason in state.model.damaged.items()}

    def following(self) -> dict:
        """The generation served, since when, and the poll's health (for a store; a bundle has no generation)."""
        state = self._state
        info = {"generation": state.generation, "served_since_s": round(time.time() - state.applied, 3)}
        if isinstance(self.source, StoreSource):
            info["store"] = str(getattr(self.source.store, "url", self.source.store.root))
            info["left_out"] = sorted(state.model.left_out)
            if self.follower is not None:
                info |= {"poll_s": self.follower.interval_s, "poll_failures": self.follower.failures}
                info["last_poll_error"] = self.follower.last_error
        return info
