"""Progress for long work: shown on a terminal, silent in logs and CI. One rule for every bar the package draws,
its own (`bar`) and Lightning's (`lightning_bar`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO

from tqdm.auto import tqdm

_OFF = {"", "0", "false", "no"}


def shows_progress(stream: IO | None = None) -> bool:
    """Whether progress goes to `stream` (default: stderr, where tqdm writes): only a terminal, and not under CI
    (any `CI` value but empty, 0, false or no; CI services set CI=true)."""
    if os.environ.get("CI", "").strip().lower() not in _OFF:
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def bar(iterable: Iterable | None = None, desc: str = "", unit: str = "it", total=None, enabled: bool = True):
    """A tqdm bar over `iterable` (or updated by hand: `total`), drawn only where `shows_progress` says;
    `enabled=False`: a caller that asked for none."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=not (enabled and shows_progress()))


def lightning_bar() -> bool:
    """`enable_progress_bar` for a Lightning Trainer: epochs and steps, by the same rule (Lightning's bar writes to
    stdout)."""
    return shows_progress(sys.stdout)
