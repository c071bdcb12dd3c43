"""CLINC150 as ten tenants (its domains, 15 intents each) plus its out-of-scope queries, and optionally the tenants of
`moe.data.overlap` derived from them (which take some of the domains' intents).

Read from `$MOE_DATA_DIR/clinc150/` (or a folder given in config); otherwise the pinned public files are
downloaded once into the user cache and their sha256 checked.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe.data.overlap import with_overlapping
from moe.data.tenant import SPLITS, Example, Tenant, TenantDataError
from moe.paths import cache_dir, data_dir, file_sha256

_COMMIT = "828f8093932c8fe6ca7936c3d2e52903b1c523de"
_URL = f"https://raw.githubusercontent.com/clinc/oos-eval/{_COMMIT}/data/{{name}}"
SHA256 = {
    "data_full.json": "36923c3705a59e08fe9c3883d8bc2dd966ef93e22cb78ac41171782a698d56e0",
    "domains.json": "b947b579d3b8e74b06f93b01083d8efaff2888b43a3e362533bd88a6e1211b3a",
}


@dataclass(frozen=True)
class Clinc150:
    tenants: list[Tenant]
    out_of_scope: dict[str, list[str]]  # split -> out-of-scope query texts

    def tenant(self, name: str) -> Tenant:
        for tenant in self.tenants:
            if tenant.name == name:
                return tenant
        raise KeyError(f"unknown CLINC150 domain {name!r}; known: {[t.name for t in self.tenants]}")


def _download(name: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    tmp = target.with_suffix(f".part{os.getpid()}")
    url = _URL.format(name=name)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, tmp.open("wb") as out:
            out.write(response.read())
    except OSError as error:  # URLError, HTTPError, timeouts: offline, or the file moved
        tmp.unlink(missing_ok=True)
        raise OSError(
            f"could not download CLINC150's {name} from {url} ({error}); with no network, set MOE_DATA_DIR to a "
            "folder holding clinc150/ (see README)"
        ) from error
    if (actual := file_sha256(tmp)) != SHA256[name]:
        tmp.unlink()
        raise TenantDataError(url, f"sha256 {actual} does not match the pinned {SHA256[name]}")
    os.replace(tmp, target)
    return target


def clinc150_files(folder: str | Path | None = None) -> dict[str, Path]:
    """Paths of `data_full.json` and `domains.json`: from `folder`, `$MOE_DATA_DIR/clinc150`, or the cache."""
    if folder is None and (root := data_dir()) is not None:
        folder = root / "clinc150"
    if folder is not None:
        files = {name: Path(folder) / name for name in SHA256}
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found (CLINC150 folder {folder}; see MOE_DATA_DIR in README)")
        return files
    cached = cache_dir() / "data" / "clinc150"
    return {
        name: path
        if (path := cached / name).is_file() and file_sha256(path) == SHA256[name]
        else _download(name, cached)
        for name in SHA256
    }


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TenantDataError(path, f"bad JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    except UnicodeDecodeError as error:
        raise TenantDataError(path, f"not UTF-8: byte 0x{error.object[error.start]:02x} at {error.start}") from None


def _pairs(path: Path, data: dict, key: str) -> Iterator[tuple[int, tuple[str, str]]]:
    """(row, (text, intent)) of `data[key]` (none when absent), each checked to be a pair of strings."""
    for row, item in enumerate(data.get(key, []), start=1):
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise TenantDataError(path, f"entry {row} of {key!r} is not a [text, intent] pair", row=row)
        yield row, (item[0], item[1])


def load_clinc150(
    folder: str | Path | None = None, domains: list[str] | None = None, overlapping: Sequence[str] = ()
) -> Clinc150:
    """The ten domains as tenants (or the `domains` named), intents sorted by name within each domain, then the
    `overlapping` tenants derived from them (`moe.data.overlap`), which take some of the domains' intents."""
    files = clinc150_files(folder)
    data, domain_map = _load_json(files["data_full.json"]), _load_json(files["domains.json"])
    for name, value in (("data_full.json", data), ("domains.json", domain_map)):
        if not isinstance(value, dict):
            raise TenantDataError(files[name], "expected a JSON object at the top level")
    intent_domain = {intent: domain for domain, intents in domain_map.items() for intent in intents}
    by_domain: dict[str, dict[str, list[Example]]] = {domain: {s: [] for s in SPLITS} for domain in domain_map}
    out_of_scope: dict[str, list[str]] = {}
    for split in SPLITS:
        if split not in data:
            raise TenantDataError(files["data_full.json"], f"split {split!r} is missing")
        for row, (text, intent) in _pairs(files["data_full.json"], data, split):
            if intent not in intent_domain:
                raise TenantDataError(files["data_full.json"], f"{split}: intent {intent!r} is in no domain", row=row)
            by_domain[intent_domain[intent]][split].append(Example(text, intent))
        out_of_scope[split] = [text for _, (text, _) in _pairs(files["data_full.json"], data, f"oos_{split}")]
    names = domains or list(domain_map)
    for name in names:
        if name not in domain_map:
            raise KeyError(f"unknown CLINC150 domain {name!r}; known: {sorted(domain_map)}")
    every = {
        name: Tenant(name, tuple(sorted(intents)), by_domain[name], source=str(files["data_full.json"]))
        for name, intents in domain_map.items()
    }
    if overlapping:  # the domains give up the intents the derived tenants take (moe.data.overlap)
        every = {tenant.name: tenant for tenant in with_overlapping(list(every.values()), list(overlapping))}
        names = [*names, *overlapping]
    return Clinc150([every[name] for name in names], out_of_scope)


def clinc150_tenants(
    folder: str | Path | None = None, domains: list[str] | None = None, overlapping: Sequence[str] = ()
) -> list[Tenant]:
    """The CLINC150 domains (and overlapping tenants) as a plain tenant list (what the data configs instantiate)."""
    return load_clinc150(folder, list(domains) if domains else None, list(overlapping or ())).tenants


def clinc150_out_of_scope(split: str = "train", folder: str | Path | None = None) -> list[str]:
    """CLINC150's out-of-scope queries of one split: unlabeled texts that belong to no domain (e.g. calibration)."""
    return list(load_clinc150(folder).out_of_scope.get(split, []))
