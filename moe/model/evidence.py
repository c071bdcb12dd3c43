"""Expert evidence: how typical a query looks to one expert, from what its own shard keeps (exemplar-free).

Each expert may record, at training or growth and from its own tenant's data only, what it needs to score a query
in its own feature space (the adapter's output `z = x + up(gelu(down(x)))`, before the head):

    mahalanobis   class means of z and a shared, shrunk covariance of z (kept as its precision's factor F, with the
                  means whitened by it): raw score -min_c |z F - mu_c F|^2 (Lee et al. 2018, in the expert's own space)
    energy        logsumexp of the expert's logits (Liu et al. 2020); no tensors beyond the calibration
    none          no evidence (a shard written before evidence, or with evidence=none): routing as the gate decides

Raw scores of different experts live in different spaces, so each is calibrated on its tenant's own held-out
queries (its val split): `evidence = (raw - location) / scale`, about N(0, 1) on the tenant's own queries and far
below 0 on another tenant's. The mixture combines it with the gate (`reweigh`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from moe.model.experts import expert_features, head_logits
from moe.model.stats import class_statistics, pooled_covariance, shrunk

EvidenceKind = Literal["none", "mahalanobis", "energy"]
EV_MEANS, EV_FACTOR, EV_CALIBRATION = EVIDENCE_TENSORS = ("evidence.means", "evidence.factor", "evidence.calibration")
EVIDENCE_SHRINKAGE = 0.1  # of the covariance of z towards its mean variance


def check_evidence(kind: str) -> str:
    if kind not in get_args(EvidenceKind):
        raise TypeError(f"evidence must be one of {list(get_args(EvidenceKind))}, got {kind!r}")
    return kind


def evidence_shapes(kind: str, dim: int, num_labels: int) -> dict[str, tuple[int, ...]]:
    """The tensors an expert's shard holds for evidence of this kind."""
    if kind == "none":
        return {}
    if kind == "energy":
        return {EV_CALIBRATION: (2,)}
    return {EV_MEANS: (num_labels, dim), EV_FACTOR: (dim, dim), EV_CALIBRATION: (2,)}


def raw_evidence(z: torch.Tensor, logits: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(n,) uncalibrated evidence of an expert's features z (n, d) and logits (n, c), by the tensors its shard holds
    (None: it holds none)."""
    # n: queries, d: features, c: labels
    if EV_CALIBRATION not in tensors:
        return None
    if EV_FACTOR not in tensors:
        return torch.logsumexp(logits, dim=-1)
    white = z @ tensors[EV_FACTOR].to(z.dtype)  # (n, d)
    means = tensors[EV_MEANS].to(z.dtype)  # (c, d), whitened
    distance = (white.square().sum(-1, keepdim=True) - 2 * white @ means.T + means.square().sum(-1)).clamp(min=0)
    return -distance.amin(dim=-1)


def expert_evidence(z: torch.Tensor, logits: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """(n,) calibrated evidence (`raw_evidence`, standardised on the tenant's own held-out queries), or None."""
    raw = raw_evidence(z, logits, tensors)
    if raw is None:
        return None
    location, scale = tensors[EV_CALIBRATION].to(raw.dtype)
    return (raw - location) / scale


@torch.no_grad()
def fit_evidence(
    kind: str,
    expert: dict[str, torch.Tensor],
    features: torch.Tensor,
    labels: torch.Tensor,
    held_out: torch.Tensor | None,
    input_scale: float,
    shrinkage: float = EVIDENCE_SHRINKAGE,
) -> dict[str, torch.Tensor]:
    """An expert's evidence tensors from its own tenant's data only: its train features (n, d) and label ids (n,), as
    the expert reads them before scaling, and its held-out features (m, d) for the calibration (None or empty: the
    train features calibrate, which makes their evidence look more typical than a new query's)."""
    check_evidence(kind)
    if kind == "none":
        return {}
    num_labels = expert["head.bias"].shape[0]
    tensors: dict[str, torch.Tensor] = {}
    if kind == "mahalanobis":
        z = expert_features(features.float() * input_scale, expert)
        stats = class_statistics(z, labels, num_labels)
        covariance = shrunk(pooled_covariance(stats["stats.scatter"], len(labels), num_labels), shrinkage)
        factor = torch.linalg.cholesky(torch.linalg.inv(covariance))  # P = F F^T: |z F|^2 = z P z^T
        tensors = {EV_MEANS: (stats["stats.mean"].double() @ factor).float(), EV_FACTOR: factor.float().contiguous()}
    calibrate = held_out if held_out is not None and len(held_out) > 1 else features
    z = expert_features(calibrate.float() * input_scale, expert)
    raw = raw_evidence(z, head_logits(z, expert), tensors | {EV_CALIBRATION: torch.zeros(2)})
    location = raw.double().mean()  # one row (a tenant of one example): no spread to scale by, its raw units
    scale = raw.double().std().clamp(min=1e-6) if len(raw) > 1 else torch.ones((), dtype=torch.float64)
    tensors[EV_CALIBRATION] = torch.stack([location, scale]).float()
    return {name: t.contiguous() for name, t in tensors.items()}


def reweigh(weights: torch.Tensor, evidence: torch.Tensor, weight: float) -> torch.Tensor:
    """The candidates' combined weights: softmax over each input's candidates of log p_gate + `weight` * evidence
    (weights (b, k), the gate's, 0 where a candidate was not consulted; evidence (b, k)). Large `weight`: the
    candidate with the best evidence; a candidate without evidence counts as 0 (its tenant's average)."""
    # b: batch, k: candidates
    logits = weights.log() + weight * evidence.nan_to_num(0.0)
    return logits.masked_fill(weights <= 0, float("-inf")).softmax(dim=-1)
