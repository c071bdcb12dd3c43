"""An approximate index over the gate's rows: routed top-k experts without scoring every row.

Maximum inner product search with the bias folded in (x -> [x, 1], row -> [w, b], so x' . row' is the row's
logit), reduced to nearest neighbours in L2 (row -> [w, b, sqrt(r^2 - |[w, b]|^2)], x -> [x, 1, 0], r the
largest row norm) for graph libraries that need a metric ("l2"), or searched as inner products directly ("ip").
The rows found name candidate experts; each candidate is then scored exactly, the logsumexp over all its rows as
`TopKRouter` does, and the top k are chosen among them. The chosen experts' logits are exact; only the candidate
set is approximate (its recall of the exact top-k is measured by scripts/bench_routing_index.py).

The index reads the router's rows when built and scores candidates from the router itself: rebuild it after
the router's rows change, or carry it over to a router whose experts changed (`RowIndex.follow`: the rows of added
experts inserted into the graph, those of removed ones masked, a rebuild once masked rows pass `MAX_MASKED` of it).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from einops import einsum

from moe.model import RouterOutput, TopKRouter, check_choice

Library = Literal["hnswlib", "faiss", "usearch"]
Metric = Literal["l2", "ip"]  # the MIPS-to-L2 reduction, or inner products on the augmented rows as they are
MAX_MASKED = 0.2  # `follow` rebuilds the graph when more than this share of its rows belongs to removed experts


@dataclass(frozen=True)
class IndexSettings:
    """Graph degree `M`, candidate-list sizes when building (`ef_construction`) and searching (`ef`), and the
    number of nearest rows whose experts become candidates (`rows`, at most `ef`)."""

    library: Library = "faiss"  # chosen by scripts/bench_routing_index.py; the defaults are its choice at 10,000
    metric: Metric = "l2"
    M: int = 16
    ef_construction: int = 100
    ef: int = 128
    rows: int = 8
    threads: int = 0  # for building and searching; 0: torch's intra-op thread count


class _Graph(Protocol):
    def search(self, queries: np.ndarray, count: int, ef: int) -> np.ndarray: ...  # (b, count) ids, -1: none

    def add(self, vectors: np.ndarray, start: int) -> None: ...  # graph ids start, start + 1, ...

    def nbytes(self) -> int: ...


class _Hnswlib:
    def __init__(self, vectors: np.ndarray, metric: Metric, s: IndexSettings, threads: int):
        import hnswlib

        self.threads = threads
        self.index = hnswlib.Index(space=metric, dim=vectors.shape[1])
        self.index.init_index(max_elements=len(vectors), ef_construction=s.ef_construction, M=s.M, random_seed=0)
        self.index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)

    def add(self, vectors: np.ndarray, start: int) -> None:
        self.index.resize_index(start + len(vectors))
        self.index.add_items(vectors, np.arange(start, start + len(vectors)), num_threads=self.threads)

    def search(self, queries: np.ndarray, count: int, ef: int) -> np.ndarray:
        self.index.set_ef(ef)
        return self.index.knn_query(queries, k=count, num_threads=self.threads)[0].astype(np.int64)

    def nbytes(self) -> int:
        with tempfile.TemporaryDirectory() as folder:
            self.index.save_index(path := os.path.join(folder, "index.bin"))
            return os.path.getsize(path)


class _Faiss:
    def __init__(self, vectors: np.ndarray, metric: Metric, s: IndexSettings, threads: int):
        import faiss

        self.faiss, self.threads = faiss, threads
        faiss.omp_set_num_threads(threads)
        kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], s.M, kind)
        self.index.hnsw.efConstruction = s.ef_construction
        self.index.add(vectors)

    def add(self, vectors: np.ndarray, start: int) -> None:  # faiss numbers rows in the order added
        self.faiss.omp_set_num_threads(self.threads)
        self.index.add(vectors)

    def search(self, queries: np.ndarray, count: int, ef: int) -> np.ndarray:
        self.faiss.omp_set_num_threads(self.threads)
        self.index.hnsw.efSearch = ef
        return self.index.search(queries, count)[1].astype(np.int64)

    def nbytes(self) -> int:
        return int(self.faiss.serialize_index(self.index).nbytes)


class _Usearch:
    def __init__(self, vectors: np.ndarray, metric: Metric, s: IndexSettings, threads: int):
        from usearch.index import Index

        self.threads = threads
        self.index = Index(
            ndim=vectors.shape[1],
            metric="l2sq" if metric == "l2" else "ip",
            dtype="f32",
            connectivity=s.M,
            expansion_add=s.ef_construction,
        )
        self.index.add(np.arange(len(vectors)), vectors, threads=threads)

    def add(self, vectors: np.ndarray, start: int) -> None:
        self.index.add(np.arange(start, start + len(vectors)), vectors, threads=self.threads)

    def search(self, queries: np.ndarray, count: int, ef: int) -> np.ndarray:
        self.index.expansion_search = ef
        matches = self.index.search(queries, count, threads=self.threads)
        keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(queries), -1)
        found = np.asarray(matches.counts).reshape(-1, 1) > np.arange(keys.shape[1])
        return np.where(found, keys, -1)

    def nbytes(self) -> int:
        return int(self.index.serialized_length)


GRAPHS = {"hnswlib": _Hnswlib, "faiss": _Faiss, "usearch": _Usearch}


class RowIndex:
    """Routed top-k over a router's rows through an approximate nearest-neighbour graph (`RowIndex.build`)."""

    def __init__(
        self,
        router: TopKRouter,
        graph: _Graph,
        ids: torch.Tensor,
        settings: IndexSettings,
        lift: float = 0.0,
        lock: threading.Lock | None = None,
    ):
        self.router, self.graph, self.settings = router, graph, settings
        self.ids = ids  # (n,) flat row ids e * m + j of the indexed (non-padding) rows, by graph id; -1: masked
        self.lift = lift  # metric "l2": the squared norm every augmented row is lifted to (the largest when built)
        self.lock = lock or threading.Lock()  # the graph's: shared with the indices `follow` carries it over to

    @classmethod
    @torch.no_grad()
    def build(cls, router: TopKRouter, settings: IndexSettings | None = None) -> RowIndex:
        """An index over every non-padding row of `router`; a ValueError if it has none."""
        # e: experts, m: rows per expert, d: features, n: indexed rows
        s = settings or IndexSettings()
        check_choice(s.library, Library, "library")
        check_choice(s.metric, Metric, "metric")
        if not 1 <= s.rows <= s.ef:
            raise ValueError(f"rows must be between 1 and ef ({s.ef}), got {s.rows}")
        _check_linear(router)
        ids = router.row_mask.flatten().nonzero().flatten()
        if len(ids) == 0:
            raise ValueError("the router has no rows to index (every row is padding)")
        rows = _rows(router, ids)
        lift = float(rows.double().square().sum(-1).max()) if s.metric == "l2" else 0.0
        threads = s.threads or torch.get_num_threads()
        graph = GRAPHS[s.library](_lifted(rows, s.metric, lift), s.metric, s, threads)
        return cls(router, graph, ids, s, lift)

    @torch.no_grad()
    def follow(self, router: TopKRouter, moved: torch.Tensor, added: list[int]) -> RowIndex:
        """This index carried over to `router`, a router whose experts changed: `moved` (old experts,) gives each old
        expert's place in `router` (-1: removed, its rows masked in the graph), `added` the experts of `router` new to
        it (their rows inserted). Built afresh instead when the masked rows would pass `MAX_MASKED` of the graph, when
        the rows per expert changed, or (metric "l2") when a new row is longer than the rows the graph was lifted
        to. The old index keeps answering as it did (its `ids` are not touched): requests still routed by the old
        generation see the old graph's rows; the graph only grows, and the old ids never name the added rows."""
        # e: experts, m: rows per expert, n: indexed rows (graph ids)
        old_m, m = self.router.weight.shape[1], router.weight.shape[1]
        if m != old_m or self.router.weight.shape[-1] != router.weight.shape[-1]:
            return RowIndex.build(router, self.settings)
        old = self.ids.clamp(min=0)
        expert = moved[old // m]
        ids = torch.where((self.ids >= 0) & (expert >= 0), expert * m + old % m, -1)
        new = router.row_mask[added].nonzero() if added else torch.zeros(0, 2, dtype=torch.long)
        new_ids = torch.tensor(added, dtype=torch.long)[new[:, 0]] * m + new[:, 1] if added else new[:, 0]
        total = len(ids) + len(new_ids)
        if total == 0 or (ids < 0).sum().item() > MAX_MASKED * total:
            return RowIndex.build(router, self.settings)
        rows = _rows(router, new_ids)
        if self.settings.metric == "l2" and len(rows) and rows.double().square().sum(-1).max() > self.lift:
            return RowIndex.build(router, self.settings)
        with self.lock:
            if len(rows):
                self.graph.add(_lifted(rows, self.settings.metric, self.lift), len(ids))
        return RowIndex(router, self.graph, torch.cat([ids, new_ids]), self.settings, self.lift, self.lock)

    @property
    def num_rows(self) -> int:
        """Rows the graph answers with (masked rows not counted)."""
        return int((self.ids >= 0).sum())

    @property
    def masked_share(self) -> float:
        return 1.0 - self.num_rows / len(self.ids)

    def nbytes(self) -> int:
        """Bytes of the graph and its vectors, as the library serialises them (the router's rows not counted)."""
        return self.graph.nbytes() + self.ids.numel() * self.ids.element_size()

    def nearest_rows(self, x: torch.Tensor, rows: int | None = None, ef: int | None = None) -> torch.Tensor:
        """(b, rows) flat ids (e * m + j) of the rows found nearest to each input, -1 where fewer were found."""
        s = self.settings
        rows, ef = min(rows or s.rows, self.num_rows), ef or s.ef
        if self.num_rows < len(self.ids):  # about as many live rows among those found as without masks
            rows = min(len(self.ids), math.ceil(rows * len(self.ids) / max(1, self.num_rows)))
        queries = torch.cat([x.detach().float().cpu(), torch.ones(x.shape[0], 1)], dim=1)
        if s.metric == "l2":
            queries = torch.cat([queries, torch.zeros(x.shape[0], 1)], dim=1)
        with self.lock:
            found = self.graph.search(np.ascontiguousarray(queries.numpy()), rows, max(ef, rows))
        found = torch.from_numpy(found).to(self.ids.device)
        found = found.masked_fill(found >= len(self.ids), -1)  # rows added for a later generation's router
        return self.ids[found.clamp(min=0)].masked_fill(found < 0, -1)

    @torch.no_grad()
    def top_k(
        self, x: torch.Tensor, k: int | None = None, rows: int | None = None, ef: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, d) as the router sees it -> exact logits (b, k) of the chosen experts and the experts (b, k), best
        first; `k` defaults to the router's. An input whose candidates number fewer than k is scanned exactly.

        The experts owning the rows found are the candidates. Taking the rows found as the input's nearest (what
        the graph approximates), a candidate's rows not found score at most the last row found: a candidate whose
        logit cannot reach the k-th best lower bound (the logsumexp of the rows found) is dropped unscored."""
        # b: batch, n: rows found, p: (input, candidate expert) pairs, m: rows per expert, d: features
        router = self.router
        if x.ndim != 2 or x.shape[1] != router.weight.shape[-1]:
            raise ValueError(f"inputs must be (batch, {router.weight.shape[-1]}) for this gate, got {tuple(x.shape)}")
        _check_linear(router)
        (e, m, d), b = router.weight.shape, x.shape[0]
        k = min(k or router.top_k, e)
        found = self.nearest_rows(x, rows, ef)  # (b, n)
        valid = found >= 0
        row = found.clamp(min=0)
        found_logits = einsum(x, router.weight.view(e * m, d)[row].to(x.dtype), "b d, b n d -> b n")
        found_logits = (found_logits + router.bias.view(-1)[row]).masked_fill(~valid, float("-inf"))
        last = found_logits.masked_fill(~valid, float("inf")).amin(dim=1)  # (b,) the least row found
        pairs, pair = (torch.arange(b, device=x.device)[:, None] * e + row // m)[valid].unique(return_inverse=True)
        query, expert = pairs // e, pairs % e
        lower = _segment_logsumexp(found_logits[valid], pair, len(pairs))  # (p,) the rows found only
        unfound = router.row_mask[expert].sum(dim=1) - torch.bincount(pair, minlength=len(pairs))
        upper = torch.logaddexp(lower, last[query] + unfound.clamp(min=1).log().masked_fill(unfound == 0, -torch.inf))
        counts = torch.bincount(query, minlength=b)
        threshold = _per_input(lower, query, counts, b, k).topk(k, dim=-1).values[:, -1]  # (b,)
        keep = upper >= threshold[query]
        query, expert = query[keep], expert[keep]
        row_logits = einsum(x[query], router.weight[expert].to(x.dtype), "p d, p m d -> p m") + router.bias[expert]
        logits = row_logits.masked_fill(~router.row_mask[expert], float("-inf")).logsumexp(dim=-1)  # (p,)
        kept = torch.bincount(query, minlength=b)
        top, where = _per_input(logits, query, kept, b, k).topk(k, dim=-1)
        chosen = _per_input(expert, query, kept, b, k, fill=-1).gather(1, where)
        if (short := counts < k).any():  # too few candidates: these inputs get the exact scan
            top[short], chosen[short] = router(x[short]).logits.topk(k, dim=-1)
        return top, chosen

    @torch.no_grad()
    def route(self, x: torch.Tensor) -> RouterOutput:
        """The router's output for routed inputs, from `top_k`. Chosen experts and their logits are exact (when the
        candidates hold the exact top-k); the other experts are not scored, so probabilities, `energy` and
        `max_row` cover the chosen experts only (normalised weights among them are the router's)."""
        # b: batch, e: experts, k: chosen experts, m: rows per expert, d: features
        router = self.router
        top, chosen = self.top_k(x)
        logits = top.new_full((x.shape[0], router.num_experts), float("-inf")).scatter_(1, chosen, top)
        probs = logits.softmax(dim=-1)
        weights = probs.gather(1, chosen)
        if router.normalize_weights:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        rows = einsum(x, router.weight[chosen].to(x.dtype), "b d, b k m d -> b k m") + router.bias[chosen]
        rows = rows.masked_fill(~router.row_mask[chosen], float("-inf"))
        zero = top.new_zeros(())
        return RouterOutput(logits, None, top.logsumexp(-1), rows.amax(dim=(1, 2)), probs, chosen, weights, zero, zero)


def _rows(router: TopKRouter, ids: torch.Tensor) -> torch.Tensor:
    """(n, d + 1) the router's rows `ids` (flat e * m + j) with their bias: x' . row' is the row's logit."""
    weight = router.weight.detach().flatten(0, 1)[ids].float().cpu()
    return torch.cat([weight, router.bias.detach().flatten()[ids, None].float().cpu()], dim=1)


def _lifted(rows: torch.Tensor, metric: Metric, lift: float) -> np.ndarray:
    """The graph's vectors: for "l2", each row lifted by one coordinate to squared norm `lift` (so that nearest in
    L2 is largest inner product); for "ip", the rows as they are."""
    if metric == "l2":
        norms = rows.double().square().sum(-1)
        rows = torch.cat([rows, (lift - norms).clamp(min=0).sqrt().float()[:, None]], dim=1)
    return np.ascontiguousarray(rows.numpy())


def _check_linear(router: TopKRouter) -> None:
    """Rows alone make a linear gate's logits; a quadratic term per expert (an expert's own covariance) is not in
    the rows the graph holds."""
    if getattr(router, "factor", None) is not None:
        raise ValueError("the row index serves a linear gate only: this router has a quadratic term per expert")


def _segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """(segments,) logsumexp of `values` grouped by `segment` (each segment non-empty, values finite)."""
    peak = values.new_full((segments,), float("-inf")).scatter_reduce(0, segment, values, "amax")
    total = values.new_zeros(segments).index_add_(0, segment, (values - peak[segment]).exp())
    return peak + total.log()


def _per_input(values: torch.Tensor, query: torch.Tensor, counts: torch.Tensor, b: int, k: int, fill=-torch.inf):
    """Values grouped by input (`query` sorted, `counts` per input) -> (b, max(count, k)), `fill` elsewhere."""
    slot = torch.arange(len(query), device=query.device) - (counts.cumsum(0) - counts)[query]
    width = max(int(counts.max()) if len(counts) else 0, k)
    return values.new_full((b, width), fill).index_put_((query, slot), values)
