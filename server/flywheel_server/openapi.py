"""The OpenAPI 3.1 description of the HTTP routes, served at `GET /v1/openapi.json`.

Request bodies are the JSON schemas of the pydantic models `http_api` parses them with: types
and required fields (value ranges are the service's checks and depend on the server's flags).
`tests/integration/test_fuzz.py` checks that every route is described and fuzzes the server
from this document.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from pydantic import BaseModel

from flywheel_server import http_api as api


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # under the server URL, /v1
    summary: str
    scope: str | None = None  # the API key scope it needs; None: public
    body: type[BaseModel] | None = None
    query: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, JSON schema)
    created: bool = False  # answers 201 when it stores something new, 200 for a replay
    stream: bool = False  # `stream: true` answers server-sent events
    jsonl: bool = False  # answers JSON Lines, not one JSON object


CURSOR = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}

OPERATIONS = (
    Operation("post", "/completions", "Complete a prompt (OpenAI shape)", "generate",
              api.CompletionBody, stream=True),
    Operation("post", "/chat/completions", "Complete a chat (OpenAI shape)", "generate",
              api.ChatBody, stream=True),
    Operation("get", "/models", "The live aliases and every loaded version", "generate"),
    Operation("get", "/policies", "Versions, the live aliases and the challenge tally",
              "generate", query=(("name", {"enum": ["policy", "reward"]}),)),
    Operation("post", "/policies/promote", "Make a loaded version live", "admin", api.PromoteBody),
    Operation("post", "/policies/rollback", "Make the previous version live again", "admin",
              api.RollbackBody),
    Operation("post", "/policies/challenge", "Start or stop a challenge of the live policy",
              "admin", api.ChallengeBody),
    Operation("post", "/compare", "K candidates for one prompt, for ranking", "generate",
              api.CompareBody),
    Operation("post", "/rewards", "One reward-model score per completion", "generate",
              api.RewardsBody),
    Operation("post", "/feedback", "Rank completions the server issued", "feedback",
              api.FeedbackBody, created=True),
    Operation("post", "/demonstrations", "A written response to a prompt", "feedback",
              api.DemonstrationBody, created=True),
    Operation("get", "/audit", "The audit trail, from a cursor", "admin",
              query=(("after", CURSOR), ("limit", CURSOR))),
    Operation("get", "/export", "A page of rankings as a JSON Lines dataset", "admin",
              query=(("format", {"enum": ["pairs", "rankings"]}), ("after", CURSOR),
                     ("limit", CURSOR)), jsonl=True),
    Operation("get", "/stats/versions", "Versions, their metrics and states, for the dashboard",
              "admin"),
    Operation("get", "/stats/labelers", "Rankings per labeler and day", "admin"),
    Operation("get", "/stats/agreement", "Labelers' agreement on shared tasks", "admin"),
    Operation("get", "/stats/ratings", "Policy versions rated from blind comparisons", "admin"),
    Operation("get", "/stats/reward-agreement", "Each labeler's agreement with the reward model",
              "admin"),
    Operation("post", "/tasks", "Queue prompts for labelers", "admin", api.AddTasksBody,
              created=True),
    Operation("post", "/tasks/next", "The labeler's next task: a prompt and its candidates",
              "feedback", api.TaskBody),
    Operation("post", "/tasks/typed", "Queue a labeler's own prompt and give it to them",
              "feedback", api.TypedTaskBody),
    Operation("post", "/tasks/skip", "Pass on a task the labeler holds", "feedback",
              api.TaskBody),
    Operation("get", "/openapi.json", "This document"),
)  # fmt: skip

ERRORS = {
    "400": "bad input, naming the field in `param`",
    "401": "missing or unknown API key",
    "403": "the key lacks the scope",
    "404": "an unknown id or version",
    "409": "the current state refuses the change",
    "429": "overloaded, or the key is over its rate; retry after `Retry-After` seconds",
    "503": "a backend the server depends on is down",
}
BODY_ERRORS = {
    "413": "the body is larger than the server's limit",
    "422": "the body does not match its schema",
}

# Before OpenAPI 3.2 an event stream's schema describes one event.
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk; `[DONE]` last"}},
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(op: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = (
        {"application/jsonl": {"schema": {"type": "string"}}}
        if op.jsonl
        else _json({"type": "object"})
    )
    if op.stream:
        ok["text/event-stream"] = {"schema": SSE_EVENT}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok}}
    if op.created:
        responses["201"] = {"description": "stored", "content": ok}
    out: dict[str, Any] = {"operationId": op.path.strip("/").replace("/", "_").replace(".", "_")}
    out |= {"summary": op.summary, "responses": responses}
    if op.scope is None:
        out["security"] = []
        return out
    out["x-flywheel-scope"] = op.scope
    errors = ERRORS | (BODY_ERRORS if op.body else {})
    error = _json({"$ref": "#/components/schemas/Error"})
    for status, why in sorted(errors.items()):
        responses[status] = {"description": why, "content": error}
    responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    if op.body is not None:
        schema = op.body.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas |= schema.pop("$defs", {})
        schemas[op.body.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{op.body.__name__}"}
        out["requestBody"] = {"required": True, "content": _json(ref)}
    if op.query:
        out["parameters"] = [
            {"name": name, "in": "query", "required": False, "schema": schema}
            for name, schema in op.query
        ]
    return out


def build(operations: tuple[Operation, ...] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing `operations` (by default every /v1 route)."""
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Flywheel",
            "version": "v1",
            "description": "OpenAI-compatible generation, feedback and policy routes. Errors use "
            "OpenAI's shape. With no API keys configured every route is open (on loopback).",
        },
        "servers": [{"url": "/v1"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


@cache
def document() -> dict[str, Any]:
    """`build()`, once per process (callers must not change it)."""
    return build()
