"""The OpenAPI description at /v1/openapi.json covers every route, and the server survives
fuzzing from it: no 5xx and no dropped connection, and hostile bodies are refused in OpenAI's
error shape without touching the store.

Fuzzing is schemathesis' Python API: each operation's strategy (valid and invalid requests)
drives a bounded, derandomized Hypothesis run against a real `flywheel serve` on loopback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from flywheel_server import openapi
from flywheel_server.http_api import create_app
from tests.support import ServerProcess, server_with_reward

pytestmark = pytest.mark.integration

# Bound the work a valid generating request may ask for.
ARGS = ["--max-tokens-limit", "16", "--max-n", "4"]
EXAMPLES = 40  # per operation and strategy
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzzed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A bounded server with a live reward model, so /rewards scores rather than refuses."""
    yield from server_with_reward(tiny_model, tmp_path_factory, args=ARGS)


def served_routes() -> set[str]:
    """'METHOD /path' for every route the Starlette app serves (under /v1)."""
    app = create_app(lambda: None)
    return {
        f"{method} {route.path}"
        for route in app.routes
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
    }


def test_openapi_document_is_valid_and_describes_every_route(fuzzed: ServerProcess) -> None:
    r = httpx.get(f"{fuzzed.http}/v1/openapi.json", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.1.")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema; raises on any violation
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == served_routes()

    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path == "/openapi.json":
                assert op["security"] == [], "the description is public"
                continue
            assert op["x-flywheel-scope"] in {"generate", "feedback", "admin"}, (method, path)
            assert "security" not in op  # the document-wide bearer key applies
            for status in ("400", "401", "403", "429"):
                error = op["responses"][status]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]
                name = body["$ref"].rsplit("/", 1)[1]
                assert doc["components"]["schemas"][name]["type"] == "object"
                assert {"413", "422"} <= op["responses"].keys()
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    audit = {p["name"]: p["schema"] for p in doc["paths"]["/audit"]["get"]["parameters"]}
    assert audit["after"]["minimum"] == audit["limit"]["minimum"] == 0
    assert doc["paths"]["/policies"]["get"]["parameters"][0]["name"] == "name"


# Schemathesis knows the types, not the server's ranges: most valid-typed bodies are refused
# with a 400. The "in-range" pass moves them into range so the fuzz reaches generation too.
MODELS = {op.path: op.body for op in openapi.OPERATIONS if op.body is not None}
INTS = {
    "max_tokens": (1, 16),
    "max_completion_tokens": (1, 16),
    "n": (1, 4),
    "k": (2, 4),
    "top_k": (0, 64),
    "seed": (0, 2**31),
}
ROLES = ("system", "user", "assistant")


def in_vocab(prompt: object) -> object:
    """A token id the tiny model has (its vocabulary is over 50), or a prompt of them."""
    if isinstance(prompt, int):
        return abs(prompt) % 50
    return [in_vocab(x) for x in prompt] if isinstance(prompt, list) else prompt


def in_range(case: schemathesis.Case) -> schemathesis.Case:
    model = MODELS.get(case.path)
    if model is None or not isinstance(case.body, dict):
        return case
    body = {k: v for k, v in case.body.items() if k in model.model_fields and k != "model"}
    for name, (low, high) in INTS.items():
        if isinstance(body.get(name), int):
            body[name] = low + body[name] % (high - low + 1)
    for name in ("temperature", "top_p"):
        if isinstance(body.get(name), float):
            body[name] = abs(body[name]) % 1 or None
    if isinstance(body.get("prompt"), list):  # several texts, token ids, or lists of them
        body["prompt"] = [in_vocab(p) for p in body["prompt"][:4]] or "hi"
    if isinstance(body.get("messages"), list) and body["messages"]:
        body["messages"] = [
            {"role": ROLES[i % 3], "content": str(m.get("content", "hi"))}
            for i, m in enumerate(body["messages"])
        ]
        body.pop("prompt", None)  # exactly one of prompt and messages
    elif "prompt" in model.model_fields:
        body.pop("messages", None)
    if "labeler" in model.model_fields:
        body["labeler"] = "fuzz"
    case.body = body
    return case


def strategies(operation: Any) -> dict[str, Any]:
    out = {m.value: operation.as_strategy(generation_mode=m) for m in GenerationMode}
    if operation.path in MODELS:
        out["in-range"] = operation.as_strategy().map(in_range)
    return out


def describe(e: BaseException) -> str:
    """The message, notes (schemathesis adds a curl command there) and any grouped failures."""
    parts = [str(e), *getattr(e, "__notes__", ())]
    if isinstance(e, BaseExceptionGroup):
        parts += [describe(sub) for sub in e.exceptions]
    return "\n".join(parts)


def test_fuzz_every_operation(fuzzed: ServerProcess) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed.http}/v1/openapi.json")
    base_url = f"{fuzzed.http}/v1"
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for name, strategy in strategies(operation).items():

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same requests every run: a failure reproduces
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                try:
                    response = case.call(base_url=base_url, timeout=60)
                except Exception as e:  # a dropped connection or a timeout
                    raise AssertionError(f"{case.as_curl_command()}\n{e!r}") from e
                case.validate_response(response, checks=CHECKS)  # failures carry a curl

            try:
                run()
            except (AssertionError, BaseExceptionGroup) as e:
                failures.append(f"{operation.label} ({name}): {describe(e)}")
    assert not failures, "\n\n".join(failures)
    assert calls >= len(served_routes()) * EXAMPLES  # every operation was exercised


# -- hostile bodies ------------------------------------------------------------------------------

# A body each POST route would take, which hostile values are then put into field by field.
BASES: dict[str, dict[str, Any]] = {
    "/completions": {"prompt": "hi", "max_tokens": 2, "temperature": 1.0, "top_p": 1.0},
    "/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/compare": {"prompt": "hi", "k": 2, "max_tokens": 2},
    "/rewards": {"prompt": "hi", "completions": ["a"]},
    "/feedback": {"ranking": ["cmpl-a", "cmpl-b"]},
    "/demonstrations": {"prompt": "hi", "response": "ok"},
    "/policies/promote": {"name": "policy", "version": 0},
    "/policies/rollback": {"name": "policy"},
    "/policies/challenge": {"version": 0},
}
BODY_LIMIT = 1 << 20  # the server's default max_body_bytes
HUGE = "x" * (BODY_LIMIT - 4096)  # fits the body, not any field
DEEP = 100_000  # past Python's recursion limit when parsed


def nested(depth: int) -> Any:
    doc: Any = 1
    for _ in range(depth):
        doc = [doc]
    return doc


# Values no field takes: wrong types, numbers past every limit, a string past every text limit.
BAD_VALUES: dict[str, Any] = {
    "object": {"$": [None]},
    "nested": nested(500),
    "digits": 10**4000,  # under Python's 4300-digit parse limit, over every range
    "huge": HUGE,
    "inf": math.inf,
    "nan": math.nan,
}

WHOLE_BODIES: dict[str, bytes] = {
    "empty": b"",
    "list": b"[]",
    "string": b'"prompt"',
    "number": b"42",
    "null": b"null",
    "truncated": b'{"prompt": "hi"',
    "null-bytes": b"\x00" * 64,
    "raw-null-in-string": b'{"prompt": "a\x00b"}',
    "null-key": json.dumps({"\x00": "\x00"}).encode(),
    "invalid-utf8": b'{"prompt": "\xff\xfe\xc3\x28"}',
    "deep-list": b"[" * DEEP + b"]" * DEEP,
    "deep-object": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "many-digits": b'{"n": 1' + b"0" * 5000 + b"}",  # past Python's int parse limit
    "too-large": json.dumps({"prompt": "x" * (2 * BODY_LIMIT)}).encode(),
}


def hostile_bodies(path: str) -> dict[str, bytes]:
    bodies = dict(WHOLE_BODIES)
    for field in BASES[path]:
        for name, value in BAD_VALUES.items():
            bodies[f"{field}={name}"] = json.dumps({**BASES[path], field: value}).encode()
    return bodies


def not_refused(client: httpx.Client, method: str, url: str, body: bytes) -> str | None:
    """None if the server answers a 4xx in OpenAI's error shape (its code the status), else
    what it did instead."""
    headers = {"content-type": "application/json"}
    try:
        r = client.request(method, url, content=body, headers=headers)
    except httpx.HTTPError as e:  # a reset or a timeout
        return repr(e)
    try:
        error = r.json()["error"]
        shaped = set(error) == {"message", "type", "param", "code"}
        if shaped and 400 <= r.status_code < 500 and error["code"] == r.status_code:
            return None
    except (ValueError, KeyError, TypeError):
        pass
    return f"{r.status_code} {r.text[:200]}"


def test_hostile_bodies_are_refused_and_store_nothing(fuzzed: ServerProcess) -> None:
    before = fuzzed.counts()
    wrong: list[str] = []
    with httpx.Client(base_url=f"{fuzzed.http}/v1", timeout=60) as client:
        for path in BASES:
            for case, body in hostile_bodies(path).items():
                if problem := not_refused(client, "POST", path, body):
                    wrong.append(f"POST {path} {case}: {problem}")
    assert not wrong, "\n".join(wrong)
    assert fuzzed.counts() == before, "a refused request changed the store"


# Query strings the GET routes must refuse: not ASCII digits, negative, past 18 digits.
HOSTILE_QUERIES = [
    "/audit?after=-1",
    "/audit?limit=1e3",
    "/audit?after=0x10",
    "/audit?after=%20",
    "/audit?after=1%00",
    "/audit?limit=" + "9" * 19,
    "/audit?after=%C2%B2",  # "²": str.isdigit() says yes, int() says no
    "/audit?limit=%E2%91%A0",  # "①"
    "/policies?name=%00",
    "/policies?name=" + "x" * 4000,
]


def test_hostile_queries_are_refused(fuzzed: ServerProcess) -> None:
    wrong: list[str] = []
    with httpx.Client(base_url=f"{fuzzed.http}/v1", timeout=60) as client:
        for query in HOSTILE_QUERIES:
            if problem := not_refused(client, "GET", query, b""):
                wrong.append(f"GET {query[:80]}: {problem}")
    assert not wrong, "\n".join(wrong)


# Valid bodies at the edges of their ranges (fuzzing found the first): each may be served or
# refused, but never with a 5xx, a dropped connection, or an error inside a 200 stream.
TINY = 1e-46  # > 0, but 0.0 as a float32
EDGES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-top-p": ("/completions", {"prompt": "hi", "max_tokens": 2, "top_p": TINY}),
    "tiny-top-p-stream": (
        "/completions",
        {"prompt": "hi", "max_tokens": 2, "top_p": 5e-324, "stream": True},
    ),
    "chat-tiny-top-p": (
        "/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_p": TINY},
    ),
    "compare-tiny-top-p": ("/compare", {"prompt": "hi", "k": 2, "max_tokens": 2, "top_p": TINY}),
    "tiny-temperature": ("/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 5e-324}),
    "huge-top-k": ("/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 2**62}),
    "largest-seed": ("/completions", {"prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1, "n": 4}),
    "odd-unicode": (
        "/completions",
        {"prompt": "\U0001f600\x00\ufffd", "max_tokens": 2, "stop": ["\x00"]},
    ),
}


@pytest.mark.parametrize(("path", "body"), EDGES.values(), ids=EDGES.keys())
def test_edge_values_are_not_server_errors(fuzzed: ServerProcess, path: str, body: dict) -> None:
    try:
        r = httpx.post(f"{fuzzed.http}/v1{path}", json=body, timeout=60)
    except httpx.HTTPError as e:
        pytest.fail(f"POST {path} {body}: {e!r}")
    assert r.status_code < 500, f"POST {path} {body}: {r.status_code} {r.text[:200]}"
    assert 'data: {"error"' not in r.text, r.text[-300:]
