"""Bridges between trunk versions: what lets an expert trained on one trunk keep working on the next, with none of
its data.

A bridge between an old trunk and a new one holds two affine maps fitted by ridge regression on calibration texts
encoded by both trunks (never a sleeping tenant's texts):

    to_old   new features -> old feature space: what an old expert reads instead of the old trunk's features
    to_new   old feature space -> new features: where an old expert's stored statistics and gate rows go, so that
             one gate scores every expert on the new trunk's features

`to_new`'s residual covariance is kept too: a class's scatter mapped into the new space gains it for every example,
since the regression does not explain all of the new features. Feature-compatibility transformations (FCT,
Ramanujan et al. 2022) learn such a map between model versions; this one is linear, so it also folds exactly into
gate rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe.model.router import GATE_BIAS, GATE_WEIGHT
from moe.model.stats import COUNT, MEAN, SCATTER, STATISTICS

RIDGE = 1e-3  # of the mean feature energy: keeps the normal equations well conditioned on few calibration texts
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)  # the choices `Bridge.fit` measures on held-out calibration texts


@dataclass(frozen=True)
class AffineMap:
    """`x @ weight + bias`: weight (d_in, d_out), bias (d_out,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The map of `x`; `scale`: `x` holds features times `scale` (as a mixture's experts see them), and so does
        the result."""
        return x @ self.weight.to(x) + scale * self.bias.to(x)  # x's dtype and device

    @classmethod
    def fit(cls, source: torch.Tensor, target: torch.Tensor, ridge: float = RIDGE) -> tuple[AffineMap, torch.Tensor]:
        """The least-squares map source (n, d_in) -> target (n, d_out), ridge-penalised (the bias is not), in float64;
        and the residuals' covariance (d_out, d_out)."""
        x, y = source.double(), target.double()
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        gram = xc.T @ xc
        penalty = ridge * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
        weight = torch.linalg.solve(gram + penalty, xc.T @ yc)
        residual = yc - xc @ weight
        covariance = residual.T @ residual / max(len(x) - 1, 1)
        return cls(weight.float(), (y_mean - x_mean @ weight).float()), covariance.float()


@dataclass(frozen=True)
class Bridge:
    """The maps between the features of trunk `old` and trunk `new` (fingerprints), and how they were fitted."""

    old: str
    new: str
    to_old: AffineMap
    to_new: AffineMap
    residual: torch.Tensor  # (d_new, d_new) covariance of what `to_new` leaves unexplained, per example
    info: dict = field(default_factory=dict)  # calibration texts, fidelity on held-out ones

    TENSORS = ("to_old.weight", "to_old.bias", "to_new.weight", "to_new.bias", "to_new.residual")

    @classmethod
    def fit(
        cls,
        old: str,
        new: str,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        held_out: float = 0.1,
        ridges: tuple[float, ...] = RIDGES,
        groups: dict[str, torch.Tensor] | None = None,
    ) -> Bridge:
        """Both maps from the same calibration texts encoded by each trunk (rows paired). A `held_out` share of the
        rows (every k-th) chooses the ridge among `ridges` (the best R^2 of the bridged features: the share of the
        old features' variance explained) and measures fidelity (that R^2, and the mean cosine between bridged and
        true old features), also per group of rows (`groups`: name -> (n,) mask). Then both maps are refitted on every
        row with that ridge."""
        if old_features.shape[0] != new_features.shape[0]:
            raise ValueError(f"{old_features.shape[0]} old feature rows against {new_features.shape[0]} new ones")
        n = old_features.shape[0]
        if n < 2 * max(old_features.shape[1], new_features.shape[1]):
            raise ValueError(
                f"{n} calibration texts can not fit a bridge between {new_features.shape[1]}- and "
                f"{old_features.shape[1]}-dimensional features: give at least twice the larger dimension"
            )
        step = max(int(round(1 / held_out)), 2)
        test = torch.zeros(n, dtype=torch.bool)
        test[::step] = True
        scores = {}
        for ridge in ridges:
            probe, _ = AffineMap.fit(new_features[~test], old_features[~test], ridge)
            scores[ridge] = fidelity(probe(new_features[test]), old_features[test])
        ridge = max(ridges, key=lambda r: scores[r]["r2"])
        info = {"calibration_texts": n, "held_out_texts": int(test.sum()), "ridge": ridge} | scores[ridge]
        probe, _ = AffineMap.fit(new_features[~test], old_features[~test], ridge)
        for name, rows in (groups or {}).items():
            if (mine := test & rows).sum() > 1:
                scored = fidelity(probe(new_features[mine]), old_features[mine])
                info |= {f"{name}/{k}": v for k, v in scored.items()} | {f"{name}/held_out_texts": int(mine.sum())}
        to_old, _ = AffineMap.fit(new_features, old_features, ridge)
        to_new, residual = AffineMap.fit(old_features, new_features, ridge)
        return cls(old, new, to_old, to_new, residual, info)

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = (self.to_old.weight, self.to_old.bias, self.to_new.weight, self.to_new.bias, self.residual)
        return {name: t.contiguous() for name, t in zip(self.TENSORS, parts, strict=True)}

    @classmethod
    def from_tensors(cls, old: str, new: str, tensors: dict[str, torch.Tensor], info: dict) -> Bridge:
        return cls(
            old,
            new,
            AffineMap(tensors["to_old.weight"], tensors["to_old.bias"]),
            AffineMap(tensors["to_new.weight"], tensors["to_new.bias"]),
            tensors["to_new.residual"],
            info,
        )

    @torch.no_grad()
    def statistics_to_new(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An expert's class means, counts and within-class scatter, as the new trunk's features would give them:
        means mapped, scatter `W^T S W` plus the residual covariance for every example."""
        weight = self.to_new.weight.double()
        count = stats[COUNT]
        scatter = weight.T @ stats[SCATTER].double() @ weight + count.sum().double() * self.residual.double()
        return {
            MEAN: self.to_new(stats[MEAN]),
            COUNT: count.clone(),
            SCATTER: scatter.float(),
        }

    def then(self, later: Bridge) -> Bridge:
        """This bridge followed by `later` (from this one's new trunk to a newer one): the bridge from this one's old
        trunk straight to `later`'s new trunk, what keeps an expert asleep through several upgrades. Both maps compose
        exactly; this bridge's residual is carried through `later`'s forward map and adds to its own."""
        if later.old != self.new:
            raise ValueError(f"bridge to {self.new[:12]}… can not be followed by one from {later.old[:12]}…")
        to_old = AffineMap(later.to_old.weight @ self.to_old.weight, self.to_old(later.to_old.bias))
        to_new = AffineMap(self.to_new.weight @ later.to_new.weight, later.to_new(self.to_new.bias))
        weight = later.to_new.weight.double()
        residual = (weight.T @ self.residual.double() @ weight).float() + later.residual
        info = {"composed_of": [self.info, later.info]}
        return Bridge(self.old, later.new, to_old, to_new, residual, info)

    @property
    def new_dim(self) -> int:
        return self.to_old.weight.shape[0]

    def entry_to_new(self, tensors: dict[str, torch.Tensor], input_scale: float) -> dict[str, torch.Tensor]:
        """A shard's tensors with its routing entry (gate rows) and statistics, where present, as they read in the new
        trunk's feature space; its weights as they are (they read bridged features)."""
        moved = dict(tensors)
        if MEAN in tensors:
            moved |= self.statistics_to_new({name: tensors[name] for name in STATISTICS})
        if GATE_WEIGHT in tensors:
            moved[GATE_WEIGHT], moved[GATE_BIAS] = self.rows_to_new(
                tensors[GATE_WEIGHT], tensors[GATE_BIAS], input_scale
            )
        return moved

    @torch.no_grad()
    def rows_to_new(self, weight: torch.Tensor, bias: torch.Tensor, input_scale: float) -> tuple[torch.Tensor, ...]:
        """Gate rows that scored old features (times `input_scale`), rewritten to score the new features the same
        way through `to_old`: exact, since the map is affine."""
        folded = weight.double() @ self.to_old.weight.double().T
        shift = input_scale * (weight.double() @ self.to_old.bias.double())
        return folded.to(weight.dtype), (bias.double() + shift).to(bias.dtype)


def fidelity(bridged: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How close bridged features are to the true ones: mean cosine, and R^2 (variance explained)."""
    cosine = torch.nn.functional.cosine_similarity(bridged.double(), target.double(), dim=-1).mean().item()
    error = (bridged.double() - target.double()).pow(2).sum()
    total = (target.double() - target.double().mean(0)).pow(2).sum()
    return {"cosine": cosine, "r2": 1.0 - (error / total).item()}
