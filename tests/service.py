"""Talking to a running HTTP service in tests: a free port, a JSON call, and one replica of the app started on Ray
Serve for a test module."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: Any = None, headers: dict | None = None, key: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON) of a GET (no body) or a POST (JSON of `body`, or its bytes as they are); `key`: an API
    key, sent as a bearer token."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    auth = {"authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, data, {"content-type": "application/json"} | auth | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextmanager
def serving(settings: dict, **ray_options) -> Iterator[str]:
    """The app with `settings` on Ray Serve (one Ray instance, two CPUs) at a free port; yields its base URL."""
    import ray
    from ray import serve

    from moe.serving.http import build_app

    for attempt in (1, 2):  # on an overloaded machine Serve's proxy actor may die as it starts: one more start
        port = free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, **ray_options)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(settings), name="moe", route_prefix="/")
            break
        except ray.exceptions.RayActorError:
            serve.shutdown()
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def same(answer: dict, expected: dict) -> bool:
    """Equal but for the float32 rounding that batch composition brings (as `Server.predict` by batch size)."""
    floats = [answer["score"]] + [r["gate_prob"] for r in answer["runners_up"]]
    wanted = [expected["score"]] + [r["gate_prob"] for r in expected["runners_up"]]
    rest = [{k: v for k, v in a.items() if k != "score"} for a in (answer, expected)]
    for r in rest:
        r["runners_up"] = [t["tenant"] for t in r["runners_up"]]
    return rest[0] == rest[1] and floats == pytest.approx(wanted, rel=1e-6, abs=1e-7)
