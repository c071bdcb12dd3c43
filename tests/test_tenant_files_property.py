"""Tenant files against the readers: whatever a CSV or JSONL file holds, `read_examples` / `read_tenant_file` give
valid examples or a `TenantDataError` naming the file (and the row where one applies), never another exception."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from moe.data.files import read_examples, read_tenant_file
from moe.data.tenant import SPLITS, Example, Tenant, TenantDataError

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- files that are not UTF-8 name the file, the row and the byte --------------------------------------------

GOOD_CSV = [b"text,label", b"hello there,greet", b"bye now,leave", b"good morning,greet"]
GOOD_JSONL = [json.dumps({"text": t, "label": lab}).encode() for t, lab in [("hi", "greet"), ("bye", "leave")] * 2]


@pytest.mark.parametrize("suffix, lines", [(".csv", GOOD_CSV), (".jsonl", GOOD_JSONL)])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_byte_that_is_not_utf8_names_the_file_row_and_byte(tmp_path, suffix, lines, where, newline):
    index = {"first": 0, "middle": len(lines) // 2, "last": len(lines) - 1}[where]
    lines = list(lines)
    lines[index] = lines[index][:5] + b"\xe9" + lines[index][5:]  # Latin-1 é
    path = tmp_path / f"tenant{suffix}"
    path.write_bytes(newline.join(lines))  # the last line without a newline
    for read in (lambda: list(read_examples(path)), lambda: read_tenant_file("t", path)):
        with pytest.raises(TenantDataError) as info:
            read()
        error = info.value
        assert error.source == str(path) and error.row == index + 1
        assert str(error) == f"{path}, row {index + 1}: not UTF-8 text: byte 0xe9 at column 6"


def test_a_byte_order_mark_then_a_bad_byte(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\n\xffhi,greet\n")
    with pytest.raises(TenantDataError, match=r"row 2: not UTF-8 text: byte 0xff at column 1"):
        list(read_examples(path))


def test_a_lone_surrogate_escaped_in_json_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "hi", "label": "a"}\n{"text": "\\ud800 hi", "label": "a"}\n')
    with pytest.raises(TenantDataError, match=r"row 2: .*text.*UTF-8") as info:
        list(read_examples(path))
    assert info.value.source == str(path)


# --- the property ----------------------------------------------------------------------------------------

CHAR = st.one_of([st.characters(codec="utf-8")] * 3 + [st.sampled_from(' \t\r\n,"\x00\x85\u2028\ufeff')])
SURROGATE = st.characters(categories=["Cs"])  # not encodable as UTF-8; st.characters() seldom draws them

GOOD_PIECES = [b"text,label,split\n", b"hello there,greet,train\n", b'"bye, now",leave,val\n', b"\r\n", b"\n"]
GOOD_PIECES += [b'{"text": "a b", "label": "x", "split": "test"}\n', b'{"text": ', b'"', b",", b"\r", b"{", b"}", b"["]
GOOD_PIECES += [b"train", b"\x00", b"\xef\xbb\xbf", b"\\ud800", b"null", b"1e999", b"[" * 2000, b" "]
BAD_PIECES = [b"\xff", b"\xe9", b"\xed\xa0\x80", b"\xf0\x9f\x98"]  # not UTF-8 (the last, a truncated emoji)
GOOD = st.one_of([st.sampled_from(GOOD_PIECES)] * 2 + [st.text(CHAR, max_size=4).map(str.encode)])
BAD = st.sampled_from(BAD_PIECES) | st.binary(min_size=1, max_size=3)

TEXT = st.text(CHAR, min_size=1, max_size=12)
ODD = st.sampled_from(["", " ", "\t\r\n"]) | st.lists(CHAR | SURROGATE, min_size=1, max_size=6).map("".join)
CELL = st.one_of([TEXT] * 3 + [ODD])
SPLIT = st.one_of(st.sampled_from(SPLITS), st.sampled_from(SPLITS + (" train ", "val\r\n")), CELL)


def insert(items: list, extra: list[tuple[int, object]]) -> list:
    for at, item in extra:
        items.insert(at, item)
    return items


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy, size: int, min_size: int = 0) -> st.SearchStrategy:
    """Lists of `good` items with up to two `bad` ones slipped in (so that a good file is not a rare draw)."""
    slipped = st.lists(st.tuples(st.integers(0, size), bad), max_size=2)
    return st.builds(insert, st.lists(good, min_size=min_size, max_size=size), slipped)


CONTENT = mostly(GOOD, BAD, 30).map(b"".join)  # pieces of tenant files, sometimes with bytes that are not UTF-8
ROWS = mostly(st.tuples(TEXT, TEXT, st.sampled_from(SPLITS)), st.tuples(CELL, CELL, SPLIT), 6, min_size=1)


def assert_valid(rows: list[tuple[int, str, Example]]) -> None:
    for number, split, ex in rows:
        assert isinstance(number, int) and number >= 1 and split in SPLITS
        for value in ex:
            assert isinstance(value, str) and value and value == value.strip()
            value.encode("utf-8")  # servable: the trunk and the feature cache encode it


def assert_names_the_file(error: TenantDataError, path: Path) -> None:
    assert error.source == str(path) and str(error).startswith(f"{path}")
    lines = len(path.read_bytes().splitlines()) + 1
    assert error.row is None or 1 <= error.row <= lines, (error.row, lines)


def read_both(path: Path, split_column: str | None = "split") -> list[tuple[int, str, Example]] | TenantDataError:
    """`read_examples`' rows, or the `TenantDataError` it raised; `read_tenant_file` agrees."""
    try:
        rows = list(read_examples(path, split_column=split_column))
    except TenantDataError as error:
        event(f"TenantDataError: {error.problem.split(':')[0]}")  # --hypothesis-show-statistics
        assert_names_the_file(error, path)
        with pytest.raises(TenantDataError):
            read_tenant_file("t", path, split_column=split_column)
        return error
    event("examples")
    assert_valid(rows)
    try:
        tenant = read_tenant_file("t", path, split_column=split_column)
    except TenantDataError as error:  # no train rows, or a val/test label absent from train
        assert_names_the_file(error, path)
    else:
        assert isinstance(tenant, Tenant) and sum(len(v) for v in tenant.splits.values()) == len(rows)
    return rows


@PROPERTY
@given(suffix=st.sampled_from([".csv", ".jsonl"]), content=CONTENT, split_column=st.sampled_from(["split", None]))
@example(suffix=".jsonl", content=b"[" * 100_000, split_column=None)
@example(suffix=".jsonl", content=b'{"text": "a", "label": ' + b"9" * 5000 + b"}", split_column=None)
@example(suffix=".csv", content=b'text,label\n"' + b"x" * 200_000 + b'",a\n', split_column=None)
def test_arbitrary_bytes_give_examples_or_a_tenant_data_error(tmp_path, suffix, content, split_column):
    path = tmp_path / f"tenant{suffix}"
    path.write_bytes(content)
    read_both(path, split_column)


def write_rows(path: Path, rows: list[tuple[str, str, str]], ascii_json: bool) -> list[int]:
    """Rows as CSV or JSONL (lone surrogates written as their invalid UTF-8 bytes unless JSON-escaped); returns
    the line each row ends on."""
    out, ends = io.StringIO(newline=""), []
    writer = csv.writer(out)
    if path.suffix == ".csv":
        writer.writerow(["text", "label", "split"])
    for row in rows:
        if path.suffix == ".csv":
            writer.writerow(row)
        else:
            out.write(
                json.dumps(dict(zip(("text", "label", "split"), row, strict=True)), ensure_ascii=ascii_json) + "\n"
            )
        ends.append(len(io.StringIO(out.getvalue(), newline=None).readlines()))  # \r, \n and \r\n end a line
    path.write_bytes(out.getvalue().encode("utf-8", "surrogatepass"))
    return ends


def is_bad(row: tuple[str, str, str]) -> bool:
    text, label, split = row
    encodable = not any("\ud800" <= c <= "\udfff" for value in row for c in value)
    return not (encodable and text.strip() and label.strip() and split.strip() in SPLITS)


@PROPERTY
@given(suffix=st.sampled_from([".csv", ".jsonl"]), rows=ROWS, ascii_json=st.booleans())
def test_arbitrary_text_rows_read_back_or_the_first_bad_row_is_named(tmp_path, suffix, rows, ascii_json):
    path = tmp_path / f"tenant{suffix}"
    ends = write_rows(path, rows, ascii_json)
    if suffix == ".jsonl" and ascii_json:  # JSON escapes join a high and a low surrogate into one character
        rows = [tuple(json.loads(json.dumps(value)) for value in row) for row in rows]
    result = read_both(path)
    bad = [i for i, row in enumerate(rows) if is_bad(row)]
    if not bad:
        expected = [
            (end, s.strip(), Example(t.strip(), lab.strip())) for end, (t, lab, s) in zip(ends, rows, strict=True)
        ]
        assert result == expected
        return
    assert isinstance(result, TenantDataError), f"row {bad[0]} {rows[bad[0]]!r} was accepted"
    before = ends[bad[0] - 1] if bad[0] else int(suffix == ".csv")  # the line the bad row follows (or the header)
    assert before < result.row <= ends[bad[0]], (result, before, ends[bad[0]])
