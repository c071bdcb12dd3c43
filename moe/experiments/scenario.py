"""The continual experiment: a sequence of lifecycle events, every tenant seen so far evaluated after each.

Definitions (per tenant i, R[j, i] its accuracy after event j, L(i) the last event that trained it):
    average accuracy   mean over tenants of the final R[-1, i]
    forgetting         mean over tenants not trained last of R[L(i), i] - R[-1, i]   (Avalanche)
    forgetting (max)   mean over the same tenants of max_{j >= L(i)} R[j, i] - R[-1, i]
    backward transfer  mean over the same tenants of R[-1, i] - R[L(i), i]              (Lopez-Paz & Ranzato)
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch

from moe.data import Tenant
from moe.evaluation import Outcome, accuracy, collect, tenant_sources
from moe.inference import GateSettings, PagedMixture, load_mixture
from moe.lifecycle.operations import Lifecycle
from moe.model import Mixture, best_labels


@dataclass
class Event:
    op: str  # grow | update | hibernate | wake | retire
    tenant: str
    intents: int | None = None  # grow: only the first N intents of the tenant (the rest can come by update)


@dataclass
class Record:
    event: Event
    seconds: float
    rss_bytes: int
    routed: dict[str, float] = field(default_factory=dict)
    given: dict[str, float] = field(default_factory=dict)
    routing: dict[str, float] = field(default_factory=dict)


def restrict(tenant: Tenant, intents: int | None = None) -> Tenant:
    """The tenant with only its first `intents` labels (all when None) and their examples."""
    return tenant if intents is None else tenant.restricted(tenant.labels[:intents])


def new_data(tenant: Tenant, known: tuple[str, ...]) -> Tenant:
    """What an update brings: the examples of the intents the expert does not know yet (or all, if none)."""
    fresh = [label for label in tenant.labels if label not in known]
    return tenant.restricted(fresh) if fresh else tenant


def split_outcome(
    model: Mixture, tenants: list[Tenant], encode, split: str = "test", batch_size: int | None = None
) -> Outcome:
    """The evaluation's per-query outcome on these tenants' `split` examples (one batch when `batch_size` is None)."""
    source = tenant_sources(tenants, [split])[split]
    return collect(model, source.batches(batch_size or source.size), encode, progress=False)


def accuracies(outcome: Outcome) -> tuple[float, float, float]:
    """(routed, tenant given, routing) accuracy in percent."""
    routed = accuracy(outcome.routed, outcome.label)
    return routed, accuracy(outcome.given, outcome.label), accuracy(outcome.routed_tenant, outcome.tenant)


def continual_metrics(records: list[Record], key: str, last_trained: dict[str, int]) -> dict[str, float]:
    final = getattr(records[-1], key)
    tenants = [t for t in final if not math.isnan(final[t])]
    last_event = max(last_trained.values())
    older = [t for t in tenants if last_trained[t] != last_event]
    after = {t: getattr(records[last_trained[t]], key)[t] for t in older}
    best = {t: max(getattr(r, key).get(t, -math.inf) for r in records[last_trained[t] :]) for t in older}
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    return {
        "average": mean([final[t] for t in tenants]),
        "forgetting": mean([after[t] - final[t] for t in older]),
        "forgetting_max": mean([best[t] - final[t] for t in older]),
        "bwt": mean([final[t] - after[t] for t in older]),
    }


class Scenario:
    """Runs `events` through a `Lifecycle`, rebuilding the served mixture from the store after each."""

    def __init__(
        self, lifecycle: Lifecycle, tenants: dict[str, Tenant], gate: GateSettings | None = None, split: str = "test"
    ):
        """`gate`: how the served mixture routes as the experts grow (by default as growth makes rows: trained rows,
        or the statistics gate). `split`: where every tenant is evaluated after each event (val, to choose
        settings; test, to report)."""
        self.lifecycle, self.tenants, self.split = lifecycle, tenants, split
        cfg = lifecycle.cfg
        self.gate = gate or GateSettings(source=cfg.source, shrinkage=cfg.shrinkage)
        self.known: dict[str, tuple[str, ...]] = {}  # tenant -> labels its expert knows now
        self.records: list[Record] = []
        self.last_trained: dict[str, int] = {}
        self.sleeping: dict[str, tuple[list, torch.Tensor]] = {}  # tenant -> its given predictions when it slept
        self.wake_identical: dict[str, bool] = {}

    def mixture(self) -> PagedMixture:
        trunk = self.lifecycle.trunk
        return load_mixture(self.lifecycle.store, gate=self.gate, trunk_fingerprint=trunk.fingerprint, trunk=trunk)

    def known_tenant(self, name: str) -> Tenant:
        """The tenant with the intents its expert knows now, and their examples."""
        return self.tenants[name].restricted(self.known[name])

    @torch.no_grad()
    def given_predictions(self, model: Mixture, name: str) -> tuple[list, torch.Tensor]:
        """The tenant's predictions (by name) and its expert's log-probabilities on its own evaluation split."""
        texts = [e.text for e in self.known_tenant(name).split(self.split)]
        features, hidden = self.lifecycle.encode(texts), model.hidden_states(texts)
        output = model(features, torch.full((len(features),), model.tenant_index(name)), hidden=hidden)
        own = len(self.known[name])  # the padded width depends on other experts: compare its own columns
        return [model.labels[i] for i in best_labels(output)[0].tolist()], output.log_probs[:, 0, :own]

    def apply(self, event: Event) -> None:
        ops, name = self.lifecycle, event.tenant
        if event.op == "grow":
            tenant = restrict(self.tenants[name], event.intents)
            ops.grow(tenant)
            self.known[name] = tenant.labels
        elif event.op == "update":
            self.sleeping.pop(name, None)  # a new version: no promise of identical predictions
            ops.update(new_data(self.tenants[name], self.known[name]), allow_dormant=True)  # as the event says
            self.known[name] = ops.store.meta(name).labels
        elif event.op == "hibernate":
            self.sleeping[name] = self.given_predictions(self.mixture(), name)
            ops.hibernate(name)
        elif event.op == "wake":
            ops.wake(name)
        elif event.op == "retire":
            ops.retire(name)
            self.known.pop(name)
        else:
            raise ValueError(f"unknown event {event.op!r} (grow, update, hibernate, wake, retire)")

    def run(self, events: list[Event], progress=None) -> list[Record]:
        for index, event in enumerate(events):
            start = time.perf_counter()
            self.apply(event)
            seconds = time.perf_counter() - start
            record = Record(event, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            if event.op in ("grow", "update"):
                self.last_trained[event.tenant] = index
            awake = self.lifecycle.store.tenants()
            model = self.mixture() if awake else None
            if event.op == "wake" and event.tenant in self.sleeping:
                (names, log_probs), (names_before, log_probs_before) = (
                    self.given_predictions(model, event.tenant),
                    self.sleeping.pop(event.tenant),
                )
                self.wake_identical[event.tenant] = names == names_before and torch.equal(log_probs, log_probs_before)
            for name in self.known:
                if name in awake:
                    tenant = [self.known_tenant(name)]
                    outcome = split_outcome(model, tenant, self.lifecycle.encode, self.split, batch_size=1024)
                    routed, given, routing = accuracies(outcome)
                else:
                    routed = given = routing = math.nan  # dormant: not served
                record.routed[name], record.given[name], record.routing[name] = routed, given, routing
            self.records.append(record)
            if progress:
                progress(index, record)
        return self.records
