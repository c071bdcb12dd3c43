"""Serve a bundle or an expert store over stdin/stdout: one JSON query per line in, one JSON answer per line out, in
order.

    echo '{"text": "what is my balance", "tenant": "banking"}' | python -m moe.serving outputs/bundle --budget-mb 64
    python -m moe.serving experts/ --follow-s 1 < queries.jsonl     # a store, following its generations meanwhile

A query is `{"text": "...", "tenant": "..." (optional)}` in UTF-8. Output line N answers input line N: a line that
is not UTF-8 or not such a query (blank lines and blank or unencodable texts included), or names an unknown tenant,
gets `{"error": "...", "line": N}`; the server goes on with the next.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from collections.abc import Iterable, Iterator

from moe.serving.runtime import Server, text_problem


def decode_line(line: bytes, first: bool = False) -> str:
    """A line of stdin as text (the first without a BOM); ValueError names the first byte that is not UTF-8."""
    if first and line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8) :]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8: byte 0x{line[error.start]:02x} at column {error.start + 1}") from None


def parse_query(line: str) -> tuple[str, str | None]:
    if not line.strip():
        raise ValueError("empty line")
    try:
        query = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(query, dict):
        raise ValueError(f"expected a JSON object, got {type(query).__name__}")
    if unknown := sorted(set(query) - {"text", "tenant"}):  # a misspelled "tenant" must not route silently
        raise ValueError(f'unknown keys {unknown}: a query has "text" and, optionally, "tenant"')
    text, tenant = query.get("text"), query.get("tenant")
    if not isinstance(text, str) or not text.strip():
        raise ValueError('"text" must be a non-blank string')
    if problem := text_problem(text):
        raise ValueError(f'"text" is {problem}')
    if tenant is not None and not isinstance(tenant, str):
        raise ValueError('"tenant" must be a string or null')
    return text, tenant


def chunks(lines: Iterable[bytes | str], size: int) -> Iterator[list[tuple[int, bytes | str]]]:
    """Numbered lines, `size` at a time (1: answer each line as soon as it arrives)."""
    chunk = []
    for number, line in enumerate(lines, start=1):
        chunk.append((number, line))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def answer_chunk(server: Server, chunk: list[tuple[int, bytes | str]]) -> list[dict]:
    """Answers in input order; one bad query spoils only its own line. The chunk is answered by one state (one
    generation of a store followed)."""
    state = server.state
    results: list[dict | None] = [None] * len(chunk)
    good = []
    for i, (number, line) in enumerate(chunk):
        try:
            text, tenant = parse_query(decode_line(line, number == 1) if isinstance(line, bytes) else line)
            state.model.tenant_ids([tenant])  # KeyError names the known tenants
            good.append((i, text, tenant))
        except (ValueError, KeyError, RecursionError) as error:  # RecursionError: JSON nested too deep
            results[i] = {"error": str(error.args[0] if isinstance(error, KeyError) else error), "line": number}
    if good:
        for (i, _, _), answer in zip(
            good, server.predict([t for _, t, _ in good], [n for _, _, n in good], state=state), strict=True
        ):
            results[i] = answer.to_dict()
    return results  # type: ignore[return-value]


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe.serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", help="a bundle (scripts/export.py), or an expert store (folder or s3:// URL)")
    parser.add_argument("--budget-mb", type=float, default=256.0, help="expert weights resident at most (MiB)")
    parser.add_argument("--batch", type=positive_int, default=1, help="lines answered together (1: each as it arrives)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--follow-s", type=float, default=None, help="a store: poll it every so many seconds")
    args = parser.parse_args(argv)
    server = Server(args.bundle, budget_bytes=int(args.budget_mb * 2**20), device=args.device, follow_s=args.follow_s)
    for chunk in chunks(sys.stdin.buffer, args.batch):  # bytes: each line is decoded on its own
        for result in answer_chunk(server, chunk):
            sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
