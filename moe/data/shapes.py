"""Tenants of other shapes than CLINC150's 15-intent domains, built from CLINC150 alone (for settings chosen per tenant,
`moe.lifecycle.selection`).

    all_intents       every intent of the domains given as one tenant (all 150: 15,000 train rows)
    near_duplicates   the intents of the `pairs` closest pairs of intents from different domains (greedy, each intent in
                      one pair at most), closeness the cosine between the two intents' class means of the trunk's
                      features of their train rows: a tenant whose every intent has a near neighbour in it, merged
                      from several domains. The rule is fixed before any growth is measured on it.

Intents keep their CLINC150 names (unique across domains) and every split of theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from moe.data.tenant import SPLITS, Tenant


def merged(name: str, domains: Sequence[Tenant], intents: Sequence[str] | None = None) -> Tenant:
    """One tenant of `intents` (default: all) of `domains`, sorted by name, with all their examples."""
    every = {label: domain for domain in domains for label in domain.labels}
    labels = tuple(sorted(every if intents is None else intents))
    if unknown := [label for label in labels if label not in every]:
        raise KeyError(f"intents {unknown} are in none of the domains {[d.name for d in domains]}")
    keep = set(labels)
    splits = {split: [e for d in domains for e in d.split(split) if e.label in keep] for split in SPLITS}
    return Tenant(name, labels, splits, source=f"derived from CLINC150 ({name})")


def all_intents(domains: Sequence[Tenant], name: str = "clinc150_all") -> Tenant:
    return merged(name, domains)


def closest_pairs(domains: Sequence[Tenant], encode: Callable[[list[str]], torch.Tensor], pairs: int):
    """The `pairs` closest (cosine of class means) pairs of intents of different domains, greedily: the closest pair
    first, then the closest of intents not yet taken -> [(intent, intent, cosine)]."""
    labels, domain_of, means = [], [], []
    for d, domain in enumerate(domains):
        for label in domain.labels:
            texts = [e.text for e in domain.split("train") if e.label == label]
            if not texts:
                raise ValueError(f"intent {label!r} of {domain.name!r} has no train rows")
            labels.append(label)
            domain_of.append(d)
            means.append(encode(texts).float().mean(0))
    unit = F.normalize(torch.stack(means), dim=-1)  # (i, d)
    cosine = unit @ unit.T  # (i, i)
    same = torch.tensor(domain_of)[:, None] == torch.tensor(domain_of)[None, :]
    cosine[same] = -2.0  # pairs within a domain (and an intent with itself) are not candidates
    chosen, taken = [], set()
    for flat in torch.argsort(cosine.flatten(), descending=True, stable=True).tolist():
        i, j = divmod(flat, len(labels))
        if len(chosen) == pairs or cosine[i, j] <= -2.0:
            break
        if i < j and i not in taken and j not in taken:
            chosen.append((labels[i], labels[j], cosine[i, j].item()))
            taken |= {i, j}
    if len(chosen) < pairs:
        raise ValueError(f"only {len(chosen)} cross-domain pairs of intents exist, {pairs} asked")
    return chosen


def near_duplicates(
    domains: Sequence[Tenant],
    encode: Callable[[list[str]], torch.Tensor],
    pairs: int = 15,
    name: str = "near_duplicates",
) -> Tenant:
    """The tenant of the intents of `closest_pairs` (2 * `pairs` intents)."""
    return merged(name, domains, [label for a, b, _ in closest_pairs(domains, encode, pairs) for label in (a, b)])
