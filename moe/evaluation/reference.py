"""The joint linear reference: one linear softmax classifier over every tenant's intents, on the same frozen trunk
features, trained on all tenants' train data at once. A mixture's routed accuracy is read against it.

Global labels are (tenant, intent) pairs. On a split, per query:
    acc_routed        the predicted (tenant, intent) is the true one
    routing_acc       the predicted label's tenant is the true tenant
    acc_tenant_given  the argmax restricted to the true tenant's labels is the true one (always >= acc_routed)

The classifier is multinomial logistic regression, `mean cross-entropy + weight_decay / 2 * ||W||^2` (the bias is
not penalised), fitted full-batch with L-BFGS (strong Wolfe line search) from zero weights. The problem is convex, so
no Lightning loop, minibatches or seeds are needed: the same features give the same weights, run after run. The
weight decay and the number of L-BFGS steps (and, with `standardize=None`, whether features are standardised; by
default they always are) are chosen on the validation split only: every candidate is scored by its val routed
accuracy, ties going to the earlier candidate (the default grid lists the strongest decay first, then fewer steps
first). The test split takes no part in a choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe.data import Tenant
from moe.evaluation.accuracies import Accuracies, accuracy_metrics
from moe.evaluation.collect import Encoder
from moe.evaluation.metrics import accuracy

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (1e-2, 1e-3, 1e-4)  # strongest first: ties go to the first
STEPS = (20, 40)  # L-BFGS iterations at which each fit is scored on val (CLINC150: no gain past 40)


@dataclass(frozen=True)
class SplitFigures:
    split: str
    overall: Accuracies
    per_tenant: dict[str, Accuracies]

    def group(self, names: Iterable[str]) -> Accuracies:
        """Micro-averaged over this split's queries of the tenants `names` (those without queries count for nothing)."""
        names = list(names)
        if unknown := [n for n in names if n not in self.per_tenant]:
            raise KeyError(f"tenants {unknown} are not among the reference's tenants {sorted(self.per_tenant)}")
        return Accuracies.micro(self.per_tenant[n] for n in names)


@dataclass(frozen=True)
class Candidate:
    """One point of the validation grid."""

    weight_decay: float
    steps: int
    standardize: bool
    val_acc_routed: float


@dataclass
class JointLinear:
    """The fitted reference: `logits(features)` over `labels`, the (tenant, intent) pairs in tenant order."""

    tenants: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    weight: torch.Tensor  # (labels, dim)
    bias: torch.Tensor  # (labels,)
    mean: torch.Tensor  # (dim,) subtracted from features (zeros when not standardised)
    scale: torch.Tensor  # (dim,) features are divided by it
    chosen: Candidate
    grid: list[Candidate] = field(default_factory=list)  # every candidate scored on val
    seconds: float = 0.0  # the whole grid of fits (every candidate, not the chosen one alone), features given
    train_queries: int = 0

    @property
    def label_tenant(self) -> torch.Tensor:
        """(labels,) the index of each label's tenant."""
        index = {name: i for i, name in enumerate(self.tenants)}
        return torch.tensor([index[tenant] for tenant, _ in self.labels], dtype=torch.long)

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mean) / self.scale
        return torch.addmm(self.bias, x, self.weight.T)

    @torch.no_grad()
    def figures(self, features: torch.Tensor, tenant: torch.Tensor, label: torch.Tensor, split: str) -> SplitFigures:
        """Accuracies of queries with true tenant indices `tenant` and global label ids `label`."""
        # q: queries, l: labels (every tenant's), d: features. features (q, d), tenant (q,), label (q,)
        logits = self.logits(features)  # (q, l)
        label_tenant = self.label_tenant  # (l,)
        routed = logits.argmax(-1)  # (q,)
        own = label_tenant[None, :] == tenant[:, None]  # (q, l): the label belongs to the query's true tenant
        given = logits.masked_fill(~own, float("-inf")).argmax(-1)

        def accuracies(mask: torch.Tensor) -> Accuracies:
            return Accuracies(
                accuracy(routed[mask], label[mask]),
                accuracy(given[mask], label[mask]),
                accuracy(label_tenant[routed[mask]], tenant[mask]),
                int(mask.sum()),
            )

        per_tenant = {name: accuracies(tenant == t) for t, name in enumerate(self.tenants)}
        return SplitFigures(split, accuracies(torch.ones_like(tenant, dtype=torch.bool)), per_tenant)

    def evaluate(self, tenants: Sequence[Tenant], encode: Encoder, split: str = "test") -> SplitFigures:
        """The reference on `split` of these tenants (each one of its own, with labels it knows)."""
        texts, tenant, label = examples(tenants, split, self)
        features = encode(texts) if texts else torch.empty(0, self.weight.shape[1])
        return self.figures(features, tenant, label, split)


def examples(
    tenants: Sequence[Tenant], split: str, reference: JointLinear | None = None
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Texts, tenant indices and global label ids of a split: indices into `reference`'s tenants and labels when
    given, else into these tenants and their labels in order."""
    if reference is None:
        tenant_index = {t.name: i for i, t in enumerate(tenants)}
        pairs = [(t.name, label) for t in tenants for label in t.labels]
        label_index = {pair: i for i, pair in enumerate(pairs)}
    else:
        tenant_index = {name: i for i, name in enumerate(reference.tenants)}
        label_index = {pair: i for i, pair in enumerate(reference.labels)}
    texts, tenant_ids, label_ids = [], [], []
    for t in tenants:
        if t.name not in tenant_index:
            raise KeyError(f"tenant {t.name!r} is not one the reference was trained on: {list(tenant_index)}")
        for example in t.split(split):
            if (t.name, example.label) not in label_index:
                raise KeyError(f"label {example.label!r} of tenant {t.name!r} is not one the reference knows")
            texts.append(example.text)
            tenant_ids.append(tenant_index[t.name])
            label_ids.append(label_index[(t.name, example.label)])
    return texts, torch.tensor(tenant_ids, dtype=torch.long), torch.tensor(label_ids, dtype=torch.long)


@contextmanager
def _threads_for(work: int, small: int = 50_000_000):
    """One thread for a small problem (`work` = examples x dim x labels multiply-adds a pass): its many tiny ops gain
    nothing from more, and on a busy machine each op would wait for a second thread (seconds instead of
    milliseconds). A large one keeps torch's threads."""
    before = torch.get_num_threads()
    if work < small and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _lbfgs_path(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    weight_decay: float,
    steps: Sequence[int],
    val: tuple[torch.Tensor, torch.Tensor] | None,
) -> list[tuple[int, float, torch.Tensor, torch.Tensor]]:
    """(steps, val routed accuracy, weight, bias) after each of `steps` L-BFGS iterations, from zero weights."""
    # n: train examples, v: val examples, d: features, c: classes. x (n, d), y (n,), val (v, d) and (v,)
    weight = torch.zeros(classes, x.shape[1], requires_grad=True)  # (c, d)
    bias = torch.zeros(classes, requires_grad=True)  # (c,)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.addmm(bias, x, weight.T)  # (n, c)
        loss = F.cross_entropy(logits, y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    done, path = 0, []
    for target in sorted(set(steps)):
        group = optimizer.param_groups[0]  # the optimiser's state (its history) carries over from call to call
        group["max_iter"], group["max_eval"] = target - done, (target - done) * 5 // 4
        optimizer.step(closure)
        done = target
        with torch.no_grad():
            val_acc = accuracy(torch.addmm(bias, val[0], weight.T).argmax(-1), val[1]) if val else float("nan")
        path.append((target, val_acc, weight.detach().clone(), bias.detach().clone()))
    return path


def fit_joint_linear(
    tenants: Sequence[Tenant],
    encode: Encoder,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    steps: Sequence[int] = STEPS,
    standardize: bool | None = True,
) -> JointLinear:
    """Fit the reference on the tenants' train splits, choosing the weight decay and the number of L-BFGS steps on
    their val splits. Features are standardised or not as `standardize` says: True (the default) always, False never,
    a fixed setting that is not chosen; only `standardize=None` adds it to the choice on val (both settings fitted).
    Without val examples the last candidate is used (weakest decay, most steps) and a warning says so. `seconds` is
    the time of the whole grid of fits."""
    if not tenants:
        raise ValueError("the joint linear reference needs at least one tenant")
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"tenant names must be unique, got {names}")
    texts, _, y = examples(tenants, "train")
    if not texts:
        raise ValueError(f"the joint linear reference needs train examples; tenants {names} have none")
    labels = tuple((t.name, label) for t in tenants for label in t.labels)
    x = encode(texts).float()
    val_texts, _, val_y = examples(tenants, "val")
    val_x = encode(val_texts).float() if val_texts else None
    if val_x is None:
        log.warning("no val examples: the joint linear reference takes its last candidate, chosen on nothing")

    grid: list[Candidate] = []
    best: tuple[float, Candidate, tuple] | None = None
    start = time.perf_counter()
    with _threads_for(x.shape[0] * x.shape[1] * len(labels)):
        for std in (True, False) if standardize is None else (bool(standardize),):
            if std:
                mean, scale = x.mean(0), x.std(0)
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            else:
                mean, scale = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
            train_x = (x - mean) / scale
            val = ((val_x - mean) / scale, val_y) if val_x is not None else None
            for decay in weight_decays:
                for n, val_acc, weight, bias in _lbfgs_path(train_x, y, len(labels), float(decay), steps, val):
                    candidate = Candidate(float(decay), n, std, val_acc)
                    grid.append(candidate)
                    score = val_acc if val is not None else 0.0
                    if best is None or score > best[0] or val is None:
                        best = (score, candidate, (weight, bias, mean, scale))
    seconds = time.perf_counter() - start
    assert best is not None
    _, chosen, (weight, bias, mean, scale) = best
    log.info(
        "joint linear reference: weight decay %g, %d steps, standardised %s (val routed %.2f%%), %.1f s",
        chosen.weight_decay,
        chosen.steps,
        chosen.standardize,
        chosen.val_acc_routed,
        seconds,
    )
    return JointLinear(tuple(names), labels, weight, bias, mean, scale, chosen, grid, seconds, len(texts))


def joint_linear_reference(
    tenants: Sequence[Tenant], encode: Encoder, split: str = "test", **fit_options
) -> tuple[JointLinear, SplitFigures]:
    """Fit the reference on the tenants' train data (choices on val, see `fit_joint_linear`) and measure it on
    `split`: `figures.overall` and `figures.per_tenant[name]` hold acc_routed, acc_tenant_given and routing_acc;
    the model holds the chosen regularisation (`chosen`), the whole grid and the training seconds."""
    model = fit_joint_linear(tenants, encode, **fit_options)
    return model, model.evaluate(tenants, encode, split)


def fit_metrics(model: JointLinear, prefix: str) -> dict[str, float]:
    """What was chosen on val, as flat metrics under `prefix`."""
    return {
        f"{prefix}/weight_decay": model.chosen.weight_decay,
        f"{prefix}/steps": float(model.chosen.steps),
        f"{prefix}/standardize": float(model.chosen.standardize),
        f"{prefix}/val_acc_routed": model.chosen.val_acc_routed,
        f"{prefix}/candidates": float(len(model.grid)),
    }


def store_reference_metrics(
    configured: Iterable[Tenant], labels: Sequence[tuple[str, str]], encode: Encoder, splits: Sequence[str]
) -> dict[str, float]:
    """The reference for an evaluated store: trained on the train data of the `configured` tenants that the
    store serves (each with the labels its expert knows, `labels` as the mixture's (tenant, intent) pairs), measured
    on each split's in-scope queries of those tenants: `reference/joint_linear/<split>/{acc_routed, routing_acc,
    acc_tenant_given}`. An error is logged, and nothing returned, when those tenants have no train split."""
    known: dict[str, list[str]] = {}
    for tenant, label in labels:
        known.setdefault(tenant, []).append(label)
    tenants = [t.restricted(x for x in known[t.name] if x in t.labels) for t in configured if t.name in known]
    if not tenants or not any(t.split("train") for t in tenants):
        log.error(
            "reference.joint_linear: the configured data has no train split for the store's tenants %s, so the "
            "joint linear reference can not be trained (give data whose tenants have train rows, e.g. a split column)",
            sorted(known),
        )
        return {}
    model = fit_joint_linear(tenants, encode)
    prefix = "reference/joint_linear"
    metrics = fit_metrics(model, prefix) | {f"{prefix}/train_s": model.seconds}
    for split in splits:
        figures = model.evaluate(tenants, encode, split)
        if not figures.overall.queries:
            log.warning("reference.joint_linear: no %s queries of the store's tenants; skipped", split)
            continue
        metrics |= accuracy_metrics(figures.overall, f"{prefix}/{split}")
    return metrics
