"""Serving input is checked at the edge: `Server.predict` takes any iterable of strings and refuses blank or
unencodable texts naming every bad index; `max_batch` and `--batch` must be positive integers; the command line
reads bytes and answers every line it can, in order (a line that is not UTF-8, or not a servable query, gets an
error line)."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys

import pytest

from moe.serving import Server
from moe.serving.__main__ import main
from tests.helpers import ROOT, child_env

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # the session's tiny run

TEXTS = ["please play song", "tell me balance money", "rain umbrella"]


@pytest.fixture(scope="module")
def server(tiny_run):
    return Server(tiny_run.bundle)


def serve(bundle, stdin: bytes, *flags: str) -> subprocess.CompletedProcess:
    """`python -m moe.serving BUNDLE` fed raw bytes, with stdin declared UTF-8."""
    env = child_env() | {"PYTHONIOENCODING": "utf-8"}
    command = [sys.executable, "-m", "moe.serving", str(bundle), *flags]
    return subprocess.run(command, cwd=ROOT, env=env, input=stdin, capture_output=True, timeout=120)


def test_predict_takes_any_iterable_of_strings(server):
    expected = server.predict(TEXTS)
    assert server.predict(text for text in TEXTS) == expected
    assert server.predict(tuple(TEXTS)) == expected
    assert server.predict(iter(TEXTS), tenant=iter(["music", None, None]))[0].tenant == "music"
    assert server.predict([]) == [] and server.predict(iter([])) == []


@pytest.mark.parametrize("bad", ["", "   ", "\t\n", "\ud800 balance", "balance \udfff"])
def test_a_blank_or_unencodable_text_is_refused_naming_its_index(server, bad):
    with pytest.raises(ValueError, match=r"texts\[1\]") as info:
        server.predict(["please play song", bad])
    assert "texts[0]" not in str(info.value)
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        server.predict(text for text in [bad])


def test_every_bad_index_is_named_before_anything_is_encoded(server, monkeypatch):
    encoded = []  # every batch of texts that reached the trunk
    encode = server.trunk.encode
    monkeypatch.setattr(
        server.trunk, "encode", lambda texts, *a, **k: encoded.append(list(texts)) or encode(texts, *a, **k)
    )
    server.predict(["play", "stop"])
    assert encoded == [["play", "stop"]]  # the patched encoder is the one predict reaches
    encoded.clear()
    with pytest.raises(ValueError) as info:
        server.predict(["", "play", "\ud800", " ", "stop"])
    message = str(info.value)
    assert all(f"texts[{i}]" in message for i in (0, 2, 3)), message
    assert "texts[1]" not in message and "texts[4]" not in message
    assert "blank" in message and "UTF-8" in message
    with pytest.raises(TypeError, match=r"texts\[1\].*texts\[3\]"):
        server.predict(["play", 3, "stop", None])
    with pytest.raises(TypeError, match="not a single string"):
        server.predict("play some jazz")
    with pytest.raises(TypeError, match="iterable"):
        server.predict(42)
    with pytest.raises(KeyError, match="nobody"):
        server.predict(["play", "stop"], tenant="nobody")
    assert encoded == []


@pytest.mark.parametrize("max_batch", [0, -1, 2.0, "8", True, None])
def test_max_batch_must_be_a_positive_integer(tiny_run, max_batch):
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        Server(tiny_run.bundle, max_batch=max_batch)


def test_a_small_max_batch_answers_as_one_batch(tiny_run, server):
    one, all_ = Server(tiny_run.bundle, max_batch=1).predict(TEXTS), server.predict(TEXTS)
    assert [a.intent for a in one] == [a.intent for a in all_]  # scores differ in the last bits, by batch size
    assert [a.score for a in one] == pytest.approx([a.score for a in all_])


def test_command_line_answers_every_line_it_can(tiny_run, server):
    good = [
        {"text": "please play song"},
        {"text": "tell me balance money", "tenant": "bank"},
        {"text": "hot sunny", "tenant": None},
        {"text": "pause silence"},
    ]
    lines = [
        json.dumps(good[0]).encode(),
        b'{"text": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
        json.dumps(good[1]).encode(),
        b'{"text": "\\ud800 balance"}',  # valid JSON, a lone surrogate
        b'{"text": "  "}',
        json.dumps(good[2]).encode(),
        b"\xff\xfe",
        json.dumps(good[3]).encode(),
    ]
    stdin = codecs.BOM_UTF8 + b"\n".join(lines)  # a byte order mark first; the last line without a newline
    for flags in ([], ["--batch", "3"]):
        done = serve(tiny_run.bundle, stdin, *flags)
        assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        out = [json.loads(line) for line in done.stdout.decode().splitlines()]
        assert len(out) == len(lines)
        for i, query in zip((0, 2, 5, 7), good, strict=True):
            expected = server.predict([query["text"]], query.get("tenant"))[0].to_dict()
            runners = [r | {"gate_prob": pytest.approx(r["gate_prob"])} for r in expected["runners_up"]]
            approx = {"score": pytest.approx(expected["score"]), "runners_up": runners}
            assert out[i] == expected | approx  # batches differ in the last bits
        assert out[1] == {"error": "not UTF-8: byte 0xe9 at column 14", "line": 2}
        assert out[3]["line"] == 4 and "UTF-8" in out[3]["error"]
        assert out[4] == {"error": '"text" must be a non-blank string', "line": 5}
        assert out[6] == {"error": "not UTF-8: byte 0xff at column 1", "line": 7}


@pytest.mark.parametrize("batch", ["0", "-2", "two", "1.5"])
def test_command_line_refuses_a_batch_that_is_not_a_positive_integer(tmp_path, batch, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--batch", batch])  # refused before the bundle is opened
    assert info.value.code == 2
    assert f"argument --batch: must be a positive integer, got '{batch}'" in capsys.readouterr().err
