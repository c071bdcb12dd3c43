"""An HTTP service on Ray Serve: `Server.predict` behind JSON requests, with Serve's request batching and its model
multiplexing keyed by tenant.

    python -m moe.serving.http outputs/bundle_clinc150 --port 8000        # one replica on this machine
    python -m moe.serving.http experts/ --follow-s 1                       # a store, followed as it learns
    curl -s localhost:8000/predict -H 'content-type: application/json' -H 'serve_multiplexed_model_id: banking' \
        -d '{"text": "what is my balance", "tenant": "banking"}'

Routes: `POST /predict` takes one query `{"text": ..., "tenant": ...}` (tenant absent or null: the gate chooses), a
batch `{"queries": [...]}` or a list of queries, and answers as `Server.predict` does (`Answer.to_dict()`: one
answer, `{"answers": [...]}` or a list, in order); `GET /health`; `GET /stats`, the answering replica's pager
(resident experts, hit rate per tier, bytes) and batching counters; `/docs` and `/openapi.json`. A bad body, wrong
types, a blank, unencodable or oversized text, too many queries or an unknown tenant get a 4xx whose `detail`
names every problem found; nothing is answered unless the whole request is good.

Over an expert store (a folder or an `s3://` URL) each replica follows the store's generations
(`moe.serving.follow`): it polls every `follow_s` seconds and swaps to a new generation whole, so a grown tenant is
answered, a hibernated or retired one gets 404 naming it, a rollback serves the old version, within about
`follow_s` plus a rebuild, without a restart; each request is answered by the generation it started with.
`/health`, `/tenants` and `/stats` name the generation served.

Queries from concurrent requests are answered together (`@serve.batch`). The optional request header
`serve_multiplexed_model_id: TENANT` routes a request to a replica that already holds that tenant's expert
(`@serve.multiplexed`: loading a tenant prefetches its expert into the pager); the body still says what each query
asks, and the batch stays mixed: queries of many tenants are answered in one forward, whatever header each request
carried. Or, with `--router hash`, Serve's consistent-hash request router (`ConsistentHashRouter`) sends every
request carrying the header `x-session-id: TENANT` to the replica that tenant hashes to, with no tenant loaded per
request and nothing in the batch keyed by it (`HASH_HEADER`). On a Ray cluster the same code runs N replicas
(`--replicas N`, or `conf/serve/moe_http.yaml`).

Keys (`--keys-file keys.json`, made with `python -m moe.serving.keys add --tenants a,b`): every request but
`/health`, `/docs` and `/openapi.json` presents `Authorization: Bearer KEY`; a query naming a tenant outside its
key's tenants gets 403, the same whether or not that tenant exists; a query naming none is routed among its key's
tenants only (in the same mixed batch); `/stats` and `/tenants` need an admin key. Metrics: `moe.serving.metrics`,
on Ray's metrics export port (`--metrics-port`).
"""

# No `from __future__ import annotations`: Serve's ingress hands FastAPI the routes' annotations as they are.
import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Hashable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, Literal

import ray
from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, NonNegativeFloat, PositiveFloat, PositiveInt
from ray import serve
from ray.serve import Application

from moe import __version__
from moe.inference import GateSettings, IndexSettings, read_bundle
from moe.serving import keys as api_keys
from moe.serving import metrics as service_metrics
from moe.serving.follow import ServingState, is_bundle
from moe.serving.runtime import ExpertUnavailable, Server, text_problem
from moe.serving.schema import AnswerOut, Batch, BatchAnswers, PredictBody, Problem, Query
from moe.store import ShardError, is_url, open_store
from moe.store.bundle import MANIFEST

log = logging.getLogger("ray.serve")  # in a replica, Serve writes this logger to the replica's log
APP_NAME = "moe"
MULTIPLEX_HEADER = "serve_multiplexed_model_id"
HASH_HEADER = "x-session-id"  # the `hash` router's key (Serve's session header, RAY_SERVE_SESSION_ID_HEADER_KEY)
HASH_ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"  # Ray 2.60+, experimental
REPLICA_HEADER = "x-moe-replica"  # on every answer: the replica that gave it
GENERATION_HEADER = "x-moe-generation"  # on every answer and refusal of /predict over a store: the generation it read
MAX_PROBLEMS = 10  # problems named in one refusal; the rest are counted


class ServiceSettings(BaseModel):
    """What `build_app` (and the Serve config's `args`) takes."""

    model_config = ConfigDict(extra="forbid")

    bundle: str  # a bundle or an expert store (folder or URL); on a cluster, a path every node can read
    budget_mb: PositiveFloat = 256.0  # expert weights resident on the device at most, per replica (MiB)
    host_budget_mb: NonNegativeFloat = 0.0  # host-memory tier under the device, per replica (MiB)
    device: str = "cpu"
    max_text_chars: PositiveInt = 10_000  # a longer text is refused (413)
    max_queries: PositiveInt = 1024  # queries in one request at most (413)
    max_batch_size: PositiveInt = 64  # queries answered together, across requests
    batch_wait_ms: NonNegativeFloat = 30.0  # how long a batch waits to fill (scripts/results/load/batch_wait.json)
    tenants_per_replica: PositiveInt | None = None  # multiplexed tenants a replica keeps; None: what the budget holds
    replicas: PositiveInt = 1
    replica_cpus: PositiveFloat = 1.0
    verify: Literal["full", "lazy"] = "full"  # experts' files: when a replica starts, or each at its first page-in
    index: bool = False  # route queries without a tenant through an index over the gate's rows (thousands of tenants)
    keys_file: str | None = None  # API keys (`moe.serving.keys`); None: no keys asked for
    keys_poll_s: PositiveFloat = 1.0  # how often a replica looks whether the keys file changed
    metrics: bool = True  # record Prometheus metrics (`moe.serving.metrics`)
    mixed_batches: bool = True  # False: Serve splits batches by the multiplexing header, as before (to compare)
    # requests to replicas: Serve's default (power of two choices; the multiplexing header prefers a replica holding
    # its tenant), or `hash`: the x-session-id header's tenant hashed to a replica (HASH_ROUTER)
    router: Literal["default", "hash"] = "default"
    # serving a store: how often each replica polls it for a new generation, fsspec options, gate and out-of-scope rule
    follow_s: PositiveFloat = 1.0
    store_options: dict[str, Any] = {}
    top_k: PositiveInt = 2
    gate_source: Literal["trained", "statistics"] = "trained"
    oos_score: str | None = None
    threshold: float | None = None

    def server_options(self) -> dict[str, Any]:
        """What `Server` takes beyond the budgets for this source: a store's gate, rule and poll; none for a bundle."""
        if is_bundle(self.bundle, **self.store_options):
            return {}
        gate = GateSettings(self.top_k, source=self.gate_source)
        options = dict(gate=gate, oos_score=self.oos_score, threshold=self.threshold, follow_s=self.follow_s)
        return options | {"store_options": self.store_options}


class Refused(Exception):
    """A request the service will not answer: an HTTP status and a message naming every problem."""

    def __init__(self, status: int, problems: list[str]):
        more = f"; and {len(problems) - MAX_PROBLEMS} more" if len(problems) > MAX_PROBLEMS else ""
        super().__init__("; ".join(problems[:MAX_PROBLEMS]) + more)
        self.status = status
        self.headers: dict[str, str] = {}  # e.g. the generation that refused it


def field_path(loc: tuple | list) -> str:
    """A pydantic error location as the body's own path (`queries[3].text`), without `body` and the shape's tag."""
    parts = [p for p in loc[1:] if p not in ("query", "batch", "list")] if loc and loc[0] == "body" else list(loc)
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return path or "body"


SHAPES = 'a query {"text": ..., "tenant": ...}, {"queries": [...]} or a list of queries'


def validation_problem(error: RequestValidationError, content_type: str) -> tuple[int, list[str]]:
    """400 for a body that is not JSON; 422 naming each field that is missing, extra or of the wrong type."""
    problems, status = [], 422
    for item in error.errors():
        where = field_path(item["loc"])
        if item["type"] == "json_invalid":
            status = 400
            problems.append(f"body is not JSON: {item.get('ctx', {}).get('error', item['msg'])}")
        elif item["type"] == "missing" and where == "body":
            problems.append(f"no body: send {SHAPES} as JSON")
        elif where == "body" and "json" not in content_type:
            problems.append(f"body: send {SHAPES} as JSON (content-type: application/json, not {content_type!r})")
        elif where == "body":
            problems.append(f"body: expected {SHAPES}, got {type(item.get('input')).__name__}")
        else:
            problems.append(f"{where}: {item['msg']}")  # never the input: it may be 1 MB
    return status, problems


def problem_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def generation_header(state: ServingState) -> dict[str, str]:
    """The header naming the store generation `state` is (none for a bundle)."""
    return {} if state.generation is None else {GENERATION_HEADER: str(state.generation)}


app = FastAPI(
    title="moe intent service",
    version=__version__,
    description="Sparse mixture-of-experts intent classification: one expert per tenant, paged under a byte budget.",
)


@app.exception_handler(RequestValidationError)
async def _refuse_invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
    status, problems = validation_problem(error, request.headers.get("content-type", "none"))
    return problem_response(status, str(Refused(status, problems)))


@app.exception_handler(Refused)
async def _refuse(request: Request, error: Refused) -> JSONResponse:
    return problem_response(error.status, str(error), error.headers)


ROUTES = ("/predict", "/health", "/stats", "/tenants")


@app.middleware("http")
async def _measure(request: Request, call_next):
    """Every request counted by route and status, and timed (`moe.serving.metrics`)."""
    started = time.perf_counter()
    response = await call_next(request)
    if recorder := service_metrics.replica_metrics():  # through the module: Serve hands the replica a copy of `app`
        route = request.url.path if request.url.path in ROUTES else "other"
        recorder.observe_request(route, response.status_code, time.perf_counter() - started)
    return response


@contextmanager
def mixed_batches():
    """Serve splits a `@serve.batch` by its requests' multiplexed model ids (ray-project/ray#59334); here the header
    only routes a request to a replica holding its tenant, so its queries enter the batch without it: one forward
    for every tenant's queries. (Serve's request context, a private API, for this request's tasks only.)"""
    from ray.serve import context

    current = context._get_serve_request_context()
    token = context._serve_request_context.set(dataclasses.replace(current, multiplexed_model_id=""))
    try:
        yield
    finally:
        context._serve_request_context.reset(token)


class TenantExperts:
    """What multiplexing holds per tenant: the pager keys of its experts. The weights live in the pager, which
    evicts under its own budgets; Serve forgetting a tenant (its LRU over `tenants_per_replica`) only stops routing
    that tenant's requests here first."""

    def __init__(self, tenant: str, keys: list[Hashable]):
        self.tenant, self.keys = tenant, keys


REFUSALS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": why}
    for status, why in [
        (400, "the body is not JSON"),
        (401, "no API key, or one not valid (when the service asks for keys)"),
        (403, "a tenant outside the API key's tenants (the same whether or not it exists)"),
        (404, "an unknown tenant"),
        (413, "a text or a batch over the service's limits"),
        (422, "a missing, extra or mistyped field; a blank or unencodable text"),
        (503, "the expert chosen is damaged on this server (a lazily verified bundle found it at its first use)"),
    ]
}
EXAMPLES: dict[str, Any] = {
    "tenant": {"summary": "a tenant's query", "value": {"text": "what is my balance", "tenant": "banking"}},
    "routed": {"summary": "routed: the gate chooses the tenant", "value": {"text": "play some jazz"}},
    "batch": {
        "summary": "a batch, answered in order",
        "value": {"queries": [{"text": "what is my balance", "tenant": "banking"}, {"text": "play some jazz"}]},
    },
}
HEADER_DOC = {
    "name": MULTIPLEX_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "a known tenant: routes the request to a replica that already holds its expert",
}


@serve.deployment(name="MoeService")
@serve.ingress(app)
class MoeService:
    """One replica: a `Server` over the bundle, its queries batched, its tenants multiplexed."""

    def __init__(self, settings: ServiceSettings | dict):
        self.settings = ServiceSettings.model_validate(settings)
        s = self.settings
        started = time.perf_counter()
        budgets = int(s.budget_mb * 2**20), s.device, int(s.host_budget_mb * 2**20)
        index = IndexSettings() if s.index else None
        self.server = Server(s.bundle, *budgets, verify=s.verify, index=index, **s.server_options())
        pager = self.server.model.pager
        largest = max(pager.sizes.values(), default=1)
        self.tenants_per_replica = s.tenants_per_replica or max(
            1, min(len(self.server.state.keys_of), pager.device_budget // largest)
        )
        self._load_tenant = serve.multiplexed(max_num_models_per_replica=self.tenants_per_replica)(
            self._tenant_loader()
        )
        self._answer.set_max_batch_size(s.max_batch_size)  # type: ignore[attr-defined]
        self._answer.set_batch_wait_timeout_s(s.batch_wait_ms / 1000)  # type: ignore[attr-defined]
        self.counts = {"requests": 0, "queries": 0, "batches": 0, "largest_batch": 0, "mixed_batches": 0}
        self.tenant_loads = 0
        self.keys = api_keys.KeyFile(s.keys_file, s.keys_poll_s) if s.keys_file else None
        self.metrics = service_metrics.ServiceMetrics(lambda: self.server) if s.metrics else None
        log.info(
            f"moe replica {self.replica}: {s.bundle}, {len(self.server.tenants)} tenants (generation "
            f"{self.server.generation}), device budget {s.budget_mb} MiB, "
            f"{self.tenants_per_replica} tenants multiplexed, batches of up to {s.max_batch_size} "
            f"({time.perf_counter() - started:.2f} s)"
        )

    @property
    def replica(self) -> str:
        try:
            return serve.get_replica_context().replica_id.unique_id
        except RuntimeError:  # outside a replica
            return "local"

    def _tenant_loader(self):
        async def load_tenant(tenant: str) -> TenantExperts:
            """Make a tenant's experts resident (as far as the budgets allow) on this replica."""
            state = self.server.state
            keys = state.keys_of.get(tenant, [])
            await asyncio.to_thread(state.model.pager.prefetch, keys)
            self.tenant_loads += 1
            log.debug(f"tenant {tenant!r} multiplexed onto replica {self.replica}")
            return TenantExperts(tenant, keys)

        return load_tenant

    def authorize(self, request: Request, admin: bool = False) -> api_keys.Key | None:
        """The request's key (None when the service asks for none); 401 or 503 without a good one, 403 for a
        route that needs an admin key."""
        if self.keys is None:
            return None
        try:
            key = self.keys.authenticate(api_keys.presented(request.headers))
        except api_keys.KeyRefused as error:
            raise Refused(error.status, [str(error)]) from None
        if admin and not key.admin:
            raise Refused(403, [f"{request.url.path} needs an admin key"])
        return key

    def forbidden(self, tenant: str, key: api_keys.Key | None) -> bool:
        return key is not None and not key.may_query(tenant)

    def unknown(self, tenant: str, state: ServingState, key: api_keys.Key | None = None) -> str:
        known = sorted(t for t in state.keys_of if not self.forbidden(t, key))  # never another key's tenants
        listed = f"known tenants: {known}" if len(known) <= 20 else f"{len(known)} known tenants (GET /tenants)"
        return f"{state.not_served(tenant)}; {listed}"

    def check(
        self, queries: list[Query], prefix: str, state: ServingState, key: api_keys.Key | None = None
    ) -> list[tuple]:
        """The queries as (text, tenant, tenants routed among, state) for `_answer`, or `Refused` naming every bad
        one: first a tenant outside the key's (403, before anything says whether it exists), then oversized (413);
        tenants as `state` (the request's generation) serves them."""
        limit, too_long, bad, unknown, damaged = self.settings.max_text_chars, [], [], [], []
        if len(queries) > self.settings.max_queries:
            raise Refused(413, [f"{len(queries)} queries, more than the limit of {self.settings.max_queries}"])
        if forbidden := [
            f"{prefix.format(i)}tenant: not a tenant of this key"  # never whether the tenant exists
            for i, q in enumerate(queries)
            if q.tenant is not None and self.forbidden(q.tenant, key)
        ]:
            raise Refused(403, forbidden)
        among = key.among() if key is not None else None
        if among is not None and any(q.tenant is None for q in queries) and not among & state.keys_of.keys():
            raise Refused(404, ["no tenant of this key is served: a query without a tenant can not be routed"])
        for i, q in enumerate(queries):
            where = prefix.format(i)
            if len(q.text) > limit:
                too_long.append(f"{where}text: {len(q.text)} characters, more than the limit of {limit}")
            elif problem := text_problem(q.text):
                bad.append(f"{where}text: {problem}")
            if q.tenant is not None and q.tenant in state.model.left_out:  # damaged: the server's fault, not theirs
                damaged.append(f"{where}tenant: {state.not_served(q.tenant)}")
            elif q.tenant is not None and q.tenant not in state.keys_of:
                unknown.append(f"{where}tenant: {self.unknown(q.tenant, state, key)}")
        for status, problems in ((413, too_long), (422, bad), (404, unknown), (503, damaged)):
            if problems:
                raise Refused(status, too_long + bad + unknown + damaged)
        return [(q.text, q.tenant, among if q.tenant is None else None, state) for q in queries]

    @app.post(
        "/predict",
        response_model=AnswerOut | BatchAnswers | list[AnswerOut],
        responses=REFUSALS,
        openapi_extra={"parameters": [HEADER_DOC]},
        summary="Answer a query, {'queries': [...]}, or a list of queries",
    )
    async def predict(
        self, body: Annotated[PredictBody, Body(openapi_examples=EXAMPLES)], request: Request
    ) -> JSONResponse:
        """Answers as `Server.predict` gives them, in order; 4xx naming every problem, and then nothing answered. The
        whole request is answered by the state (the store's generation) served when it arrived."""
        key = self.authorize(request)
        state = self.server.state
        try:
            return await self._predict(body, key, state)
        except Refused as error:
            error.headers |= generation_header(state)
            raise

    async def _predict(self, body: PredictBody, key: api_keys.Key | None, state: ServingState) -> JSONResponse:
        if isinstance(body, Query):
            queries = self.check([body], "", state, key)
        elif isinstance(body, Batch):
            queries = self.check(body.queries, "queries[{}].", state, key)
        else:
            queries = self.check(body, "[{}].", state, key)
        if tenant := serve.get_multiplexed_model_id():  # Serve routed on it; load it here if it is not yet
            if self.forbidden(tenant, key):
                raise Refused(403, [f"{MULTIPLEX_HEADER} header: not a tenant of this key"])
            if tenant not in state.keys_of:
                raise Refused(404, [f"{MULTIPLEX_HEADER} header: {self.unknown(tenant, state, key)}"])
            try:
                await self._load_tenant(tenant)
            except ShardError as error:
                raise self.damaged(error) from None
        self.counts["requests"] += 1
        self.counts["queries"] += len(queries)
        try:
            with mixed_batches() if self.settings.mixed_batches else nullcontext():
                answers = await asyncio.gather(*(self._answer(query) for query in queries))
        except ShardError as error:  # the server's fault, not the request's: no path of the server's disk shown
            raise self.damaged(error) from None
        except (KeyError, TypeError, ValueError) as error:  # checked above; should Server refuse anyway, say why
            raise Refused(422, [str(error.args[0] if isinstance(error, KeyError) else error)]) from None
        if unavailable := [a for a in answers if isinstance(a, ExpertUnavailable)]:  # its own tenants' only
            log.error("replica %s: %s", self.replica, "; ".join(map(str, unavailable)))
            raise Refused(503, sorted({str(a) for a in unavailable}))
        content = (
            answers[0] if isinstance(body, Query) else {"answers": answers} if isinstance(body, Batch) else answers
        )
        return JSONResponse(content, headers={REPLICA_HEADER: self.replica} | generation_header(state))

    def damaged(self, error: ShardError) -> Refused:
        """503 for an expert whose shard failed its checks when paged in (a lazily verified bundle), naming its
        tenant; the replica logs the file and the reason."""
        log.error("replica %s: %s", self.replica, error)
        state = self.server.state
        if (key := getattr(error, "key", None)) in state.tenant_of:  # never chosen again in this state
            state.model.damaged.setdefault(key, error.reason)
        tenant = Path(error.path).parent.name
        return Refused(503, [f"the expert of tenant {tenant!r} is damaged on this server and can not answer"])

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)  # set from the settings in __init__
    async def _answer(self, queries: list[tuple]) -> list[dict]:
        """Queries of concurrent requests, for any tenants, answered together in one mixed forward, each by its
        request's state: (text, tenant, tenants routed among, state)."""
        answers = await asyncio.to_thread(self.server.predict_each, queries)  # a damaged expert fails its own only
        tenants = [q[1] for q in queries]
        self.counts["batches"] += 1
        self.counts["largest_batch"] = max(self.counts["largest_batch"], len(queries))
        self.counts["mixed_batches"] += len(set(tenants)) > 1  # queries of several tenants (or routed) in one forward
        if self.metrics:
            self.metrics.observe_batch(len(queries))
        return [a if isinstance(a, ExpertUnavailable) else a.to_dict() for a in answers]

    @app.get(
        "/health",
        summary="Liveness: the replica, its bundle and how many tenants it serves; status 'degraded' (still 200) while "
        "some tenants' experts are damaged and only the rest are answered",
    )
    async def health(self) -> dict:
        state = self.server.state
        damaged = sorted(self.server.damaged(state))
        return {
            "status": "degraded" if damaged else "ok",
            "damaged_tenants": len(damaged),
            "replica": self.replica,
            "bundle": self.settings.bundle,
            "tenants": len(state.keys_of),
            "generation": state.generation,
        }

    @app.get("/tenants", summary="The tenants served, sorted, and the store's generation (admin key, if keys are on)")
    async def tenants(self, request: Request) -> dict:
        self.authorize(request, admin=True)
        state = self.server.state
        return {"tenants": sorted(state.keys_of), "generation": state.generation}

    @app.get("/stats", summary="This replica's pager, batching and generation (an admin key, when keys are on)")
    async def stats(self, request: Request) -> dict:
        self.authorize(request, admin=True)
        state = self.server.state
        pager = state.model.pager
        summary = pager.summary()
        tiers = [t for t in summary if t != "resident"]
        looked_up = {t: summary[t]["hits"] + summary[t]["misses"] for t in tiers}
        counts = self.counts
        return {
            "replica": self.replica,
            "tenants": len(state.keys_of),
            "generation": state.generation,
            "store": self.server.following(),
            "resident_experts": {
                # a pager carried over from an earlier generation may still hold an expert this one dropped
                tier: [state.tenant_of[k] for k in pager.resident(tier) if k in state.tenant_of]
                for tier in ("device", "host")
            },
            "hit_rate": {t: summary[t]["hits"] / looked_up[t] if looked_up[t] else None for t in tiers},
            "bytes": {
                "device_resident": summary["resident"]["device_bytes"],
                "host_resident": summary["resident"]["host_bytes"],
                "device_peak": summary["resident"]["peak_device_bytes"],
                "device_budget": pager.device_budget,
                "host_budget": pager.host_budget,
                "paged_in": {t: summary[t]["bytes_in"] for t in tiers},
            },
            "damaged": self.server.damaged(state),  # tenant -> why its expert is not answered here
            "pager": summary,
            "batching": counts | {"mean_batch": counts["queries"] / counts["batches"] if counts["batches"] else 0.0},
            "multiplexing": {"tenants_per_replica": self.tenants_per_replica, "tenant_loads": self.tenant_loads},
        }


def build_app(args: dict | ServiceSettings) -> Application:
    """The Serve application (an application builder: `import_path: moe.serving.http:build_app` with `args`)."""
    settings = ServiceSettings.model_validate(args.model_dump() if isinstance(args, BaseModel) else args)
    router = {"request_router_config": {"request_router_class": HASH_ROUTER}} if settings.router == "hash" else {}
    return MoeService.options(  # type: ignore[attr-defined]
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        max_ongoing_requests=2 * settings.max_batch_size,  # room for a batch to fill while another runs
        **router,
    ).bind(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe.serving.http", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = ServiceSettings(bundle="")
    parser.add_argument("bundle", help="a bundle (scripts/export.py), or an expert store (folder or s3:// URL)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--address", default=None, help="a running Ray cluster (`auto`); default: start one here")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the Ray instance started here")
    parser.add_argument("--budget-mb", type=float, default=defaults.budget_mb, help="device budget per replica")
    parser.add_argument("--host-budget-mb", type=float, default=defaults.host_budget_mb)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars)
    parser.add_argument("--max-queries", type=int, default=defaults.max_queries, help="queries per request")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms)
    parser.add_argument("--tenants-per-replica", type=int, default=None, help="default: what the budget holds")
    parser.add_argument("--replica-cpus", type=float, default=defaults.replica_cpus)
    parser.add_argument(
        "--verify", choices=["full", "lazy"], default=defaults.verify, help="lazy: thousands of tenants"
    )
    parser.add_argument("--index", action="store_true", help="route tenant-less queries through a gate-row index")
    parser.add_argument("--keys-file", default=None, help="API keys (python -m moe.serving.keys); default: none asked")
    parser.add_argument("--keys-poll-s", type=float, default=defaults.keys_poll_s, help="keys file re-read delay")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus export port (this machine)")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false", help="record no metrics")
    parser.add_argument(
        "--split-batches", dest="mixed_batches", action="store_false", help="batches split by the header (compare)"
    )
    parser.add_argument(
        "--router", choices=["default", "hash"], default=defaults.router, help=f"hash: {HASH_HEADER} to a replica"
    )
    parser.add_argument("--follow-s", type=float, default=defaults.follow_s, help="a store: seconds between polls")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="a store: experts the gate chooses")
    parser.add_argument("--gate-source", choices=["trained", "statistics"], default=defaults.gate_source)
    parser.add_argument("--oos-score", default=None, help="a store: the out-of-scope score (with --threshold)")
    parser.add_argument("--threshold", type=float, default=None, help="a store: the out-of-scope threshold")
    parser.add_argument(
        "--store-options", type=json.loads, default=None, help="a store at a URL: fsspec options, as JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fields = {k: v for k, v in vars(args).items() if k in ServiceSettings.model_fields and v is not None}
    try:
        bundle = args.bundle if is_url(args.bundle) else str(Path(args.bundle).resolve())  # as every replica sees it
        keys_file = str(Path(args.keys_file).resolve()) if args.keys_file else None
        settings = ServiceSettings(**fields | {"bundle": bundle, "keys_file": keys_file})
        if keys_file:
            api_keys.read_keys(keys_file)  # a bad keys file fails here, named
    except ValueError as error:
        parser.error(str(error))
    if is_bundle(settings.bundle, **settings.store_options):
        bundle = read_bundle(settings.bundle, settings.verify, damaged_ok=True)  # a bad bundle fails here, named
        for tenant, problem in sorted(bundle.damaged.items()):  # a damaged expert does not: the rest are served
            logging.getLogger(__name__).error(f"tenant {tenant} will not be served, its expert is damaged: {problem}")
    elif not (state := open_store(settings.bundle, **settings.store_options).state()).awake:
        parser.error(
            f"{settings.bundle}: neither a bundle (no {MANIFEST}) nor an expert store with an awake tenant "
            f"(generation {state.generation})"
        )
    from moe.serving import http  # the deployment by its module's name, not `__main__`'s copy

    metrics_port = {"_metrics_export_port": args.metrics_port} if args.address is None else {}  # a cluster: its own
    ray.init(address=args.address, num_cpus=args.num_cpus, include_dashboard=False, **metrics_port)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(http.build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    logging.getLogger(__name__).info(f"serving {settings.bundle} at {url}/predict ({url}/docs); Ctrl-C stops")
    if settings.metrics and args.address is None:
        logging.getLogger(__name__).info(f"Prometheus metrics at http://{args.host}:{args.metrics_port}/metrics")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
