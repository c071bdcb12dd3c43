"""Overlapping tenants built from CLINC150, so that overlap is exercised wherever CLINC150 is (tests, the scenario).

Real tenants overlap: two HR apps both answer "when is payday", a concierge app books flights and tables that a travel
app and a dining app also know about. Each derived tenant takes CLINC150 intents, with all their examples, under names
of its own. An intent taken by a derived tenant leaves its domain, except those in `KEPT_BY_DOMAIN`, so that:

- `hr_portal` and `payroll` share one intent (payday) under other names: its queries are the same texts in both
  tenants' splits, as ambiguous as a query can be (whoever answers, exactly one of the two is right);
- `concierge` is made of intents drawn from five domains, one of them (weather) shared with `utility`, the others
  moved out of their domains and near what those domains keep (flights beside flight_status, music beside next_song).
"""

from __future__ import annotations

from collections.abc import Sequence

from moe.data.tenant import SPLITS, Tenant

# tenant -> {its intent: (CLINC150 domain, CLINC150 intent)}
DERIVED: dict[str, dict[str, tuple[str, str]]] = {
    "hr_portal": {
        "time_off_balance": ("work", "pto_balance"),
        "time_off_request": ("work", "pto_request"),
        "time_off_used": ("work", "pto_used"),
        "salary_day": ("work", "payday"),
    },
    "payroll": {
        "payday_date": ("work", "payday"),
        "deposit_setup": ("work", "direct_deposit"),
        "tax_form": ("work", "w2"),
    },
    "concierge": {
        "flights": ("travel", "book_flight"),
        "hotels": ("travel", "book_hotel"),
        "table_booking": ("kitchen_and_dining", "restaurant_reservation"),
        "ride": ("auto_and_commute", "uber"),
        "forecast": ("utility", "weather"),
        "music": ("home", "play_music"),
    },
}
KEPT_BY_DOMAIN = {("utility", "weather")}  # shared with its domain; every other derived intent leaves its domain


def with_overlapping(domains: Sequence[Tenant], names: Sequence[str]) -> list[Tenant]:
    """The CLINC150 domain tenants without the intents the `names`d derived tenants take from them (but those in
    `KEPT_BY_DOMAIN`), then the derived tenants, in `names` order."""
    unknown = [name for name in names if name not in DERIVED]
    if unknown:
        raise KeyError(f"unknown overlapping tenants {unknown}; known: {sorted(DERIVED)}")
    by_name = {tenant.name: tenant for tenant in domains}
    taken = {source for name in names for source in DERIVED[name].values()}
    missing = sorted({domain for domain, _ in taken} - set(by_name))
    if missing:
        raise KeyError(f"overlapping tenants {list(names)} draw on CLINC150 domains {missing}, which are not loaded")
    leaving = taken - KEPT_BY_DOMAIN
    kept = [tenant.restricted(x for x in tenant.labels if (tenant.name, x) not in leaving) for tenant in domains]
    derived = []
    for name in names:
        intents = DERIVED[name]
        splits: dict[str, list] = {split: [] for split in SPLITS}
        for label, (domain, intent) in sorted(intents.items()):
            for split in SPLITS:
                splits[split] += [e._replace(label=label) for e in by_name[domain].split(split) if e.label == intent]
        derived.append(Tenant(name, tuple(sorted(intents)), splits, source=f"derived from CLINC150 ({name})"))
    return kept + derived
