"""Serve a bundle over stdin/stdout: one JSON query per line in, one JSON answer per line out, in order.

    echo '{"text": "what is my balance", "tenant": "banking"}' | python -m moe.serving outputs/bundle --budget-mb 64

A query is `{"text": "...", "tenant": "..." (optional)}`. Output line N answers input line N: a line that is not
such a query (blank lines included), or names an unknown tenant, gets `{"error": "...", "line": N}`; the server
goes on with the next.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import TextIO

from moe.serving.runtime import Server


def parse_query(line: str) -> tuple[str, str | None]:
    if not line.strip():
        raise ValueError("empty line")
    try:
        query = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(query, dict):
        raise ValueError(f"expected a JSON object, got {type(query).__name__}")
    text, tenant = query.get("text"), query.get("tenant")
    if not isinstance(text, str) or not text.strip():
        raise ValueError('"text" must be a non-blank string')
    if tenant is not None and not isinstance(tenant, str):
        raise ValueError('"tenant" must be a string or null')
    return text, tenant


def chunks(lines: TextIO, size: int) -> Iterator[list[tuple[int, str]]]:
    """Numbered lines, `size` at a time (1: answer each line as soon as it arrives)."""
    chunk = []
    for number, line in enumerate(lines, start=1):
        chunk.append((number, line))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def answer_chunk(server: Server, chunk: list[tuple[int, str]]) -> list[dict]:
    """Answers in input order; one bad query spoils only its own line."""
    results: list[dict | None] = [None] * len(chunk)
    good = []
    for i, (number, line) in enumerate(chunk):
        try:
            text, tenant = parse_query(line)
            server.model.tenant_ids([tenant])  # KeyError names the known tenants
            good.append((i, text, tenant))
        except (ValueError, KeyError) as error:
            results[i] = {"error": str(error.args[0] if isinstance(error, KeyError) else error), "line": number}
    if good:
        for (i, _, _), answer in zip(
            good, server.predict([t for _, t, _ in good], [n for _, _, n in good]), strict=True
        ):
            results[i] = answer.to_dict()
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", help="bundle folder written by scripts/export.py")
    parser.add_argument("--budget-mb", type=float, default=256.0, help="expert weights resident at most (MiB)")
    parser.add_argument("--batch", type=int, default=1, help="lines answered together (1: each as it arrives)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    server = Server(args.bundle, budget_bytes=int(args.budget_mb * 2**20), device=args.device)
    for chunk in chunks(sys.stdin, max(1, args.batch)):
        for result in answer_chunk(server, chunk):
            sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
