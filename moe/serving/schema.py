"""The HTTP service's request and answer bodies (pydantic): what `/openapi.json` publishes and requests are checked
against. Types are strict: a number is not a text, a missing or extra field is named."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag


class Query(BaseModel):
    """One query: a text, and the tenant whose intents answer it (null or absent: the gate chooses among all)."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr = Field(description="the user's text: not blank, encodable as UTF-8, at most the service's limit")
    tenant: StrictStr | None = Field(None, description="a known tenant's name; null: routed by the gate")


class Batch(BaseModel):
    """Several queries answered together, in order."""

    model_config = ConfigDict(extra="forbid")

    queries: list[Query]


def body_kind(value: Any) -> str:
    """Which of the three bodies a request is: a list of queries, `{"queries": [...]}`, or one query."""
    if isinstance(value, list):
        return "list"
    return "batch" if isinstance(value, Batch) or (isinstance(value, dict) and "queries" in value) else "query"


# Tagged by `body_kind`, so that a bad body is reported against the shape it meant, not against all three.
PredictBody = Annotated[
    Annotated[Query, Tag("query")] | Annotated[Batch, Tag("batch")] | Annotated[list[Query], Tag("list")],
    Discriminator(body_kind),
]


class RunnerUp(BaseModel):
    tenant: str
    gate_prob: float


class AnswerOut(BaseModel):
    """One answer, as `Answer.to_dict()` writes it (the JSON-lines command's answer lines alike)."""

    tenant: str
    intent: str
    score: float = Field(description="combined score: gate weight x expert probability, summed over experts")
    out_of_scope: bool | None = Field(description="the out-of-scope score fell below the bundle's threshold")
    experts: list[str] = Field(description="tenants of the experts consulted, best first")
    runners_up: list[RunnerUp] = Field(description="the next experts when the gate was not sure")


class BatchAnswers(BaseModel):
    answers: list[AnswerOut]


class Problem(BaseModel):
    """A refused request (4xx): `detail` names every problem found, by field (`queries[3].text: ...`)."""

    detail: str
