"""Bad input gets a clear error and changes nothing, on both transports.

Every case asserts the status (HTTP) or code (gRPC), that the message says what is wrong, the
offending field where the server names one (HTTP `error.param`, gRPC `field` trailing metadata,
surfaced by the client as `.field`), and that the store's row counts are the same before and
after. A replayed idempotency key returns the first result and stores nothing new.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from flywheel_client import Conflict, FlywheelError, NotFound

pytestmark = pytest.mark.integration

LIMIT = (
    255  # min(max_tokens_limit 512, the tiny model's 256 positions - 1), as GetServerInfo reports
)
MAX_TEXT_CHARS = 32_768
HTTP_TO_GRPC = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
}
# Long enough in tokens to exceed the prompt budget of the tiny model (256 positions), short
# enough in characters to pass the 32k character check.
TOO_MANY_TOKENS = " ".join(f"w{i}q{i * 7 % 13}z" for i in range(600))


@contextlib.contextmanager
def store_unchanged(server: Any) -> Iterator[None]:
    before = server.counts()
    yield
    assert server.counts() == before, "a rejected request changed the store"


@contextlib.contextmanager
def rejected(server: Any, code: str, *substrings: str, field: str | None = None) -> Iterator[None]:
    """The block raises a server-side client error with `code`, naming `field` and `substrings`,
    and the store is unchanged."""
    with store_unchanged(server), pytest.raises(FlywheelError) as info:
        yield
    e = info.value
    assert e.code == code, repr(e)  # code None would mean the client refused it, not the server
    for s in substrings:
        assert s in e.message, repr(e)
    if field is not None:
        assert e.field == field, repr(e)


def check_http(
    server: Any, path: str, body: Any, status: int, substrings: tuple[str, ...], param: str | None
) -> dict:
    with store_unchanged(server):
        got, doc = server.post(path, body)
    assert got == status, doc
    error = doc["error"]
    assert error["code"] == status
    for s in substrings:
        assert s in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


# -- completion ids issued for the ranking cases -------------------------------------------------


@pytest.fixture(scope="module")
def issued(server: Any) -> dict[str, Any]:
    """Completions of two different prompts: A0..A3 of prompt PA, B0..B1 of prompt PB."""
    from flywheel_client import FlywheelClient

    with FlywheelClient(server.grpc) as client:
        a = client.generate("reverse: abc", n=4, max_tokens=4, seed=11)
        b = client.generate("sort: dcba", n=2, max_tokens=4, seed=12)
    ids: dict[str, Any] = {f"A{i}": c.id for i, c in enumerate(a.completions)}
    ids |= {f"B{i}": c.id for i, c in enumerate(b.completions)}
    ids["PA"] = a.prompt_id  # a real id this service issued, but of a prompt, not a completion
    # Shaped exactly like ours ("cmpl-" + 24 hex) but never issued by this server.
    ids["LOOKALIKE"] = f"cmpl-{uuid.uuid4().hex[:24]}"
    return ids


def resolve(ranking: Any, ids: dict[str, Any]) -> Any:
    if isinstance(ranking, str):
        return ids.get(ranking, ranking)
    return [resolve(item, ids) for item in ranking]


# -- rankings --------------------------------------------------------------------------------

# (case id, ranking with placeholders, HTTP status, message substrings, field)
RANKING_CASES = [
    (
        "unknown-id",
        ["cmpl-doesnotexist", "A0"],
        404,
        ("unknown completion id", "cmpl-doesnotexist"),
        "ranking",
    ),
    (
        "all-unknown",
        ["cmpl-doesnotexist", "cmpl-neverissued"],
        404,
        ("cmpl-doesnotexist", "cmpl-neverissued"),
        "ranking",
    ),
    (
        "foreign-lookalike-id",
        ["A0", "LOOKALIKE"],
        404,
        ("unknown completion id", "LOOKALIKE"),
        "ranking",
    ),
    ("foreign-prompt-id", ["PA", "A0"], 404, ("unknown completion id", "PA"), "ranking"),
    ("ranking-of-one", ["A0"], 400, ("at least 2",), "ranking"),
    ("one-tier-of-one", [["A0"]], 400, ("at least 2",), "ranking"),
    ("empty-ranking", [], 400, ("at least 2",), "ranking"),
    ("all-tied", [["A0", "A1"]], 400, ("at least two tiers",), "ranking"),
    ("different-prompts", ["A0", "B0"], 400, ("different prompts",), "ranking"),
    ("different-prompts-tied", [["A0", "B0"], "A1"], 400, ("different prompts",), "ranking"),
    ("duplicate-id", ["A0", "A0"], 400, ("more than once", "A0"), "ranking"),
    ("duplicate-across-tiers", ["A0", ["A0", "A1"]], 400, ("more than once", "A0"), "ranking"),
    ("duplicate-within-tier", [["A1", "A1"], "A0"], 400, ("more than once", "A1"), "ranking"),
    ("too-many-ids", [f"cmpl-{i:024x}" for i in range(65)], 400, ("at most 64",), "ranking"),
]


def _ranking_params() -> list[Any]:
    return [pytest.param(*case[1:], id=case[0]) for case in RANKING_CASES]


def _expect(substrings: tuple[str, ...], ids: dict[str, Any]) -> tuple[str, ...]:
    return tuple(ids.get(s, s) for s in substrings)


@pytest.mark.parametrize(("ranking", "status", "substrings", "field"), _ranking_params())
def test_bad_ranking_http(server, issued, ranking, status, substrings, field):
    error = check_http(
        server,
        "/v1/feedback",
        {"ranking": resolve(ranking, issued), "labeler": "bad-input"},
        status,
        _expect(substrings, issued),
        field,
    )
    if status == 404:  # only the unknown ids are named, never the ones the server issued
        assert not any(issued[k] in error["message"] for k in issued if k[0] in "AB")


@pytest.mark.parametrize(("ranking", "status", "substrings", "field"), _ranking_params())
def test_bad_ranking_grpc(server, grpc_client, issued, ranking, status, substrings, field):
    with rejected(server, HTTP_TO_GRPC[status], *_expect(substrings, issued), field=field):
        grpc_client.rank(resolve(ranking, issued), labeler="bad-input")


@pytest.mark.parametrize(
    ("body", "substrings", "field"),
    [
        pytest.param(
            {"labeler": ""}, ("labeler must not be empty",), "labeler", id="empty-labeler"
        ),
        pytest.param(
            {"labeler": "   "}, ("labeler must not be empty",), "labeler", id="blank-labeler"
        ),
        pytest.param({"labeler": "x" * 201}, ("at most 200",), "labeler", id="long-labeler"),
        pytest.param(
            {"idempotency_key": "k" * 201}, ("at most 200",), "idempotency_key", id="long-key"
        ),
    ],
)
def test_bad_ranking_labels(server, grpc_client, issued, body, substrings, field):
    ranking = [issued["A0"], issued["A1"]]
    check_http(
        server,
        "/v1/feedback",
        {"ranking": ranking, "labeler": "bad-input", **body},
        400,
        substrings,
        field,
    )
    with rejected(server, "INVALID_ARGUMENT", *substrings, field=field):
        grpc_client.rank(ranking, **{"labeler": "bad-input", **body})


# -- generation ------------------------------------------------------------------------------

BASE = {"prompt": "reverse: abc", "max_tokens": 4}

# (case id, fields over BASE, HTTP status, message substrings, field)
GENERATE_CASES = [
    (
        "max_tokens=0",
        {"max_tokens": 0},
        400,
        ("max_tokens must be between 1 and 255", "got 0"),
        "max_tokens",
    ),
    (
        "max_tokens=-1",
        {"max_tokens": -1},
        400,
        ("max_tokens must be between 1 and 255", "got -1"),
        "max_tokens",
    ),
    (
        "max_tokens=limit+1",
        {"max_tokens": LIMIT + 1},
        400,
        ("max_tokens must be between 1 and 255", "got 256"),
        "max_tokens",
    ),
    (
        "temperature<0",
        {"temperature": -0.5},
        400,
        ("temperature must be between 0 and 10", "-0.5"),
        "temperature",
    ),
    ("top_p=0", {"top_p": 0.0}, 400, ("top_p must be in (0, 1]",), "top_p"),
    ("empty-stop", {"stop": [""]}, 400, ("each stop string must be 1 to 64 characters",), "stop"),
    ("seed-too-big", {"seed": 1 << 63}, 400, ("seed must be between 0 and 2**63 - 1",), "seed"),
    ("empty-prompt", {"prompt": ""}, 400, ("prompt must not be empty",), "prompt"),
    ("blank-prompt", {"prompt": "   "}, 400, ("prompt must not be empty",), "prompt"),
    (
        "empty-chat-content",
        {"messages": [{"role": "user", "content": ""}]},
        400,
        ("messages[0].content must not be empty",),
        "messages[0].content",
    ),
    (
        "blank-chat-content",
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "   "},
            ]
        },
        400,
        ("messages[1].content must not be empty",),
        "messages[1].content",
    ),
    (
        "bad-chat-role",
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        ("messages[0].role must be one of",),
        "messages",
    ),
    ("unknown-model", {"model": "policy-v99"}, 404, ("'policy-v99' is not loaded",), "model"),
    ("bad-model-id", {"model": "gpt-4"}, 404, ("'gpt-4' is not a model id",), "model"),
    ("reward-as-policy", {"model": "reward"}, 400, ("must name a policy model",), "model"),
    ("n-over-limit", {"n": 17}, 400, ("n must be between 1 and 16",), "n"),
    (
        "prompt-too-many-chars",
        {"prompt": "x" * (MAX_TEXT_CHARS + 1)},
        400,
        ("at most 32768 characters",),
        "prompt",
    ),
    ("prompt-too-many-tokens", {"prompt": TOO_MANY_TOKENS}, 400, ("tokens",), "prompt"),
]


def _generate_params() -> list[Any]:
    return [pytest.param(*case[1:], id=case[0]) for case in GENERATE_CASES]


def _http_generate(fields: dict[str, Any], stream: bool) -> tuple[str, dict[str, Any]]:
    body = {**BASE, **fields, "stream": stream}
    if "messages" in fields:
        del body["prompt"]
        return "/v1/chat/completions", body
    return "/v1/completions", body


def _grpc_generate(client: Any, fields: dict[str, Any], *, stream: bool) -> None:
    kwargs = {**BASE, **fields}
    prompt = kwargs.pop("prompt")
    if "messages" in kwargs:
        prompt = None
    if "model" in kwargs:
        kwargs["policy"] = kwargs.pop("model")
    if stream:
        list(client.generate_stream(prompt, **kwargs))
    else:
        client.generate(prompt, **kwargs)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("fields", "status", "substrings", "field"), _generate_params())
def test_bad_generate_http(server, fields, status, substrings, field, stream):
    check_http(server, *_http_generate(fields, stream), status, substrings, field)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("fields", "status", "substrings", "field"), _generate_params())
def test_bad_generate_grpc(server, grpc_client, fields, status, substrings, field, stream):
    if field == "model":
        # The gRPC request's field is `policy`; the server names the concept, `model`.
        with store_unchanged(server), pytest.raises(FlywheelError) as info:
            _grpc_generate(grpc_client, fields, stream=stream)
        e = info.value
        assert e.code == HTTP_TO_GRPC[status] and all(s in e.message for s in substrings), repr(e)
        assert e.field in ("model", "policy"), repr(e)
        return
    with rejected(server, HTTP_TO_GRPC[status], *substrings, field=field):
        _grpc_generate(grpc_client, fields, stream=stream)


def test_max_tokens_beyond_model_context_names_max_tokens(server, grpc_client):
    # 300 <= max_tokens_limit, so it passes validation.sampling, but 300 tokens never fit the
    # tiny model's 256 positions whatever the prompt: max_tokens is the offending field.
    body = {"prompt": "reverse: abc", "max_tokens": 300}
    error = check_http(server, "/v1/completions", body, 400, (), None)
    with store_unchanged(server), pytest.raises(FlywheelError) as info:
        grpc_client.generate("reverse: abc", max_tokens=300)
    assert error["param"] == "max_tokens", error
    assert "-" not in error["message"].split("at most")[-1], error  # no negative budget
    assert info.value.code == "INVALID_ARGUMENT" and info.value.field == "max_tokens", repr(
        info.value
    )


# -- comparison and demonstrations (the other prompt-taking calls) ---------------------------


@pytest.mark.parametrize(
    ("fields", "substrings", "field"),
    [
        pytest.param({"k": 1}, ("k must be between 2 and 16",), "k", id="k=1"),
        pytest.param({"k": 17}, ("k must be between 2 and 16",), "k", id="k=17"),
        pytest.param({"prompt": "  "}, ("prompt must not be empty",), "prompt", id="blank-prompt"),
        pytest.param(
            {"max_tokens": 0},
            ("max_tokens must be between 1 and 255",),
            "max_tokens",
            id="max_tokens=0",
        ),
        pytest.param(
            {"temperature": -0.5},
            ("temperature must be between 0 and 10",),
            "temperature",
            id="temperature<0",
        ),
    ],
)
def test_bad_compare(server, grpc_client, fields, substrings, field):
    body = {"prompt": "add: 1 + 2", "k": 2, "max_tokens": 4, **fields}
    check_http(server, "/v1/compare", body, 400, substrings, field)
    prompt = body.pop("prompt")
    with rejected(server, "INVALID_ARGUMENT", *substrings, field=field):
        grpc_client.compare(prompt, **body)


def test_compare_unknown_policy(server, grpc_client):
    body = {
        "prompt": "add: 1 + 2",
        "k": 2,
        "max_tokens": 4,
        "policies": ["policy-v0", "policy-v99"],
    }
    check_http(server, "/v1/compare", body, 404, ("'policy-v99' is not loaded",), "policies")
    with rejected(server, "NOT_FOUND", "'policy-v99' is not loaded", field="policies"):
        grpc_client.compare("add: 1 + 2", k=2, max_tokens=4, policies=["policy-v0", "policy-v99"])


@pytest.mark.parametrize(
    ("fields", "substrings", "field"),
    [
        pytest.param({"prompt": ""}, ("prompt must not be empty",), "prompt", id="empty-prompt"),
        pytest.param(
            {"response": "  "}, ("response must not be empty",), "response", id="blank-response"
        ),
        pytest.param(
            {"labeler": ""}, ("labeler must not be empty",), "labeler", id="empty-labeler"
        ),
    ],
)
def test_bad_demonstration(server, grpc_client, fields, substrings, field):
    body = {"prompt": "add: 1 + 2", "response": "3", "labeler": "bad-input", **fields}
    check_http(server, "/v1/demonstrations", body, 400, substrings, field)
    prompt = body.pop("prompt")
    with rejected(server, "INVALID_ARGUMENT", *substrings, field=field):
        grpc_client.demonstrate(prompt, **body)


# -- malformed JSON and wrong types (HTTP) ---------------------------------------------------

MALFORMED_JSON = [
    pytest.param(b'{"prompt": "reverse: abc", "max_tokens": ', ("not valid JSON",), id="truncated"),
    pytest.param(b"", ("not valid JSON",), id="empty-body"),
    pytest.param(b"{'prompt': 'single quotes'}", ("not valid JSON",), id="not-json"),
    pytest.param(b'{"prompt": "\x80\xff"}', ("not valid JSON",), id="invalid-utf8"),
    pytest.param(b"[1,2]", ("must be a JSON object",), id="array"),
    pytest.param(b'"reverse: abc"', ("must be a JSON object",), id="string"),
    pytest.param(b"null", ("must be a JSON object",), id="null"),
    pytest.param(b"[" * 10_000 + b"]" * 10_000, ("nested too deeply",), id="deep"),
    pytest.param(b'{"n": ' + b"1" * 100_000 + b"}", ("digits",), id="huge-integer"),
]


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/feedback", "/v1/compare"]
)
@pytest.mark.parametrize(("raw", "substrings"), MALFORMED_JSON)
def test_malformed_json(server, path, raw, substrings):
    check_http(server, path, raw, 400, substrings, "body")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        pytest.param("/v1/completions", {"prompt": "x", "n": "many"}, "n", id="n-many"),
        pytest.param(
            "/v1/completions",
            {"prompt": "x", "max_tokens": "ten"},
            "max_tokens",
            id="max_tokens-string",
        ),
        pytest.param(
            "/v1/completions",
            {"prompt": "x", "max_tokens": 1.5},
            "max_tokens",
            id="max_tokens-fraction",
        ),
        pytest.param(
            "/v1/completions",
            {"prompt": "x", "temperature": "hot"},
            "temperature",
            id="temperature-string",
        ),
        pytest.param("/v1/completions", {"prompt": 5}, "prompt", id="prompt-number"),
        pytest.param("/v1/completions", {"max_tokens": 4}, "prompt", id="prompt-missing"),
        pytest.param("/v1/chat/completions", {"messages": "hi"}, "messages", id="messages-string"),
        pytest.param(
            "/v1/feedback", {"ranking": "cmpl-x", "labeler": "t"}, "ranking", id="ranking-string"
        ),
        pytest.param(
            "/v1/feedback", {"ranking": [1, 2], "labeler": "t"}, "ranking", id="ranking-numbers"
        ),
        pytest.param(
            "/v1/feedback",
            {"ranking": ["cmpl-a", "cmpl-b"], "labeler": "t", "rank": 1},
            "rank",
            id="unknown-field",
        ),
    ],
)
def test_wrong_types(server, path, body, field):
    error = check_http(server, path, body, 422, (f"{field}:",), field)
    assert error["type"] == "invalid_request_error"


# -- oversized bodies ------------------------------------------------------------------------


def post_httpx(server: Any, path: str, content: Any) -> tuple[int, dict]:
    """httpx, as the public HttpClient and the OpenAI SDK use: it still reads the response when the
    server answers early and stops reading the body. (urllib, under `server.post`, gives up with
    BrokenPipeError instead, depending on timing, so it is not used for these cases.)"""
    import httpx

    response = httpx.post(
        server.http + path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    return response.status_code, response.json()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/feedback"])
def test_oversized_http_body(server, path):
    body = json.dumps(
        {"prompt": "x" * (1 << 20), "messages": [], "ranking": [], "labeler": "t"}
    ).encode()
    assert len(body) > 1 << 20
    with store_unchanged(server):
        status, doc = post_httpx(server, path, body)
    assert status == 413, doc
    assert "at most 1048576" in doc["error"]["message"] and doc["error"]["param"] == "body", doc


def test_oversized_chunked_http_body(server):
    """No content-length: the server counts the bytes as they arrive and stops at the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * (128 << 10)
        yield b'"}'

    with store_unchanged(server):
        status, doc = post_httpx(server, "/v1/completions", chunks())
    assert status == 413, doc
    assert "exceeds 1048576 bytes" in doc["error"]["message"] and doc["error"]["param"] == "body", (
        doc
    )


def test_oversized_body_through_http_client(server):
    from flywheel_client import HttpClient, InvalidArgument

    with (
        HttpClient(server.http) as client,
        store_unchanged(server),
        pytest.raises(InvalidArgument) as info,
    ):
        client.generate("x" * (1 << 20), max_tokens=4)
    assert (info.value.status, info.value.field) == (413, "body"), repr(info.value)
    assert "1048576" in info.value.message


def test_oversized_grpc_message(server):
    """Over the server's 8 MiB receive limit: grpc itself refuses it, before any handler."""
    from flywheel_client import FlywheelClient

    with (
        FlywheelClient(server.grpc) as client,
        store_unchanged(server),
        pytest.raises(FlywheelError) as info,
    ):
        client.generate("x" * (9 << 20), max_tokens=4)
    assert info.value.code == "RESOURCE_EXHAUSTED", repr(info.value)
    assert "larger than max" in info.value.message, repr(info.value)


def test_oversized_grpc_ranking(server, grpc_client):
    ids = [f"cmpl-{i:024x}-{'x' * 200}" for i in range(40_000)]  # ~9 MiB of ids
    with store_unchanged(server), pytest.raises(FlywheelError) as info:
        grpc_client.rank(ids, labeler="bad-input")
    assert info.value.code == "RESOURCE_EXHAUSTED", repr(info.value)


# -- malformed protobuf (gRPC) ---------------------------------------------------------------

GARBAGE = [
    pytest.param(b"\xff\xff\xff", id="bad-varint"),
    pytest.param(b"\x0a\x10abc", id="truncated-field"),
    pytest.param(b"\x0f", id="bad-wire-type"),
    # 10,000 unknown groups, each inside the last: past protobuf's recursion limit (100)
    pytest.param(b"\x7b" * 10_000 + b"\x7c" * 10_000, id="nested-past-the-recursion-limit"),
]
METHODS = [
    pytest.param(
        "/flywheel.v1.Inference/Generate", "flywheel.v1.GenerateRequest", False, id="Generate"
    ),
    pytest.param(
        "/flywheel.v1.Inference/GenerateStream",
        "flywheel.v1.GenerateRequest",
        True,
        id="GenerateStream",
    ),
    pytest.param(
        "/flywheel.v1.Inference/Compare", "flywheel.v1.CompareRequest", False, id="Compare"
    ),
    pytest.param("/flywheel.v1.Inference/Score", "flywheel.v1.ScoreRequest", False, id="Score"),
    pytest.param(
        "/flywheel.v1.Feedback/SubmitRanking",
        "flywheel.v1.RankingRequest",
        False,
        id="SubmitRanking",
    ),
    pytest.param(
        "/flywheel.v1.Feedback/SubmitDemonstration",
        "flywheel.v1.DemonstrationRequest",
        False,
        id="SubmitDemonstration",
    ),
]


def raw_call(server: Any, method: str, payload: bytes, *, stream: bool = False) -> grpc.RpcError:
    with grpc.insecure_channel(server.grpc) as channel:
        make = channel.unary_stream if stream else channel.unary_unary
        call = make(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            reply = call(payload, timeout=30)
            if stream:
                list(reply)
    return info.value


@pytest.mark.parametrize(("method", "type_name", "stream"), METHODS)
@pytest.mark.parametrize("payload", GARBAGE)
def test_malformed_protobuf(server, method, type_name, stream, payload):
    with store_unchanged(server):
        error = raw_call(server, method, payload, stream=stream)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert f"request is not a valid {type_name}" in error.details(), error.details()


def test_a_protobuf_past_the_size_limit_is_refused_before_parsing(server):
    size = 9 << 20  # the server takes at most 8 MiB
    length = bytes(
        [(size >> 7 * i & 0x7F) | (0x80 if size >> 7 * (i + 1) else 0) for i in range(4)]
    )
    payload = b"\x0a" + length + b"x" * size  # field 1, 9 MiB long
    with store_unchanged(server):
        error = raw_call(server, "/flywheel.v1.Feedback/SubmitRanking", payload)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "larger than max" in error.details(), error.details()


@pytest.mark.parametrize(
    ("method", "substring", "field"),
    [
        pytest.param(
            "/flywheel.v1.Inference/Generate",
            "prompt must hold text or chat messages",
            "prompt",
            id="Generate",
        ),
        pytest.param(
            "/flywheel.v1.Feedback/SubmitRanking",
            "labeler must not be empty",
            "labeler",
            id="SubmitRanking",
        ),
    ],
)
def test_empty_protobuf(server, method, substring, field):
    """An empty message parses (every field at its default) and is then refused by validation."""
    with store_unchanged(server):
        error = raw_call(server, method, b"")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert substring in error.details()
    assert dict(error.trailing_metadata() or ()).get("field") == field


# -- idempotency -----------------------------------------------------------------------------


def _grew(before: dict[str, int], after: dict[str, int], **delta: int) -> bool:
    return after == {k: v + delta.get(k, 0) for k, v in before.items()}


def test_replayed_ranking_key_http(server, issued):
    key = f"bad-input-http-{uuid.uuid4().hex}"
    first_body = {
        "ranking": [issued["A0"], issued["A1"], issued["A2"]],
        "labeler": "bad-input",
        "idempotency_key": key,
    }
    before = server.counts()
    status, first = server.post("/v1/feedback", first_body)
    assert status == 201 and first["duplicate"] is False, first
    stored = server.counts()
    assert _grew(before, stored, rankings=1, ranking_items=3), (before, stored)

    status, replay = server.post("/v1/feedback", first_body)
    assert status == 200, replay
    assert replay == {**first, "duplicate": True}
    assert server.counts() == stored

    # The same key with a different (valid) ranking: still the first result, nothing new.
    for other in ([issued["A3"], issued["A1"]], [issued["B1"], issued["B0"]]):
        status, replay = server.post("/v1/feedback", {**first_body, "ranking": other})
        assert status == 200, replay
        assert replay == {**first, "duplicate": True}
        assert server.counts() == stored
    # Another labeler's use of the key is no replay of theirs: 409, nothing stored.
    status, error = server.post("/v1/feedback", {**first_body, "labeler": "someone-else"})
    assert status == 409 and error["error"]["param"] == "idempotency_key", error
    assert server.counts() == stored
    # Without auth, a labeler must still be named.
    status, error = server.post("/v1/feedback", {"ranking": first_body["ranking"]})
    assert status == 400 and error["error"]["param"] == "labeler", error


def test_replayed_ranking_key_grpc(server, grpc_client, issued):
    key = f"bad-input-grpc-{uuid.uuid4().hex}"
    before = server.counts()
    first = grpc_client.rank(
        [issued["A1"], [issued["A2"], issued["A3"]]], labeler="bad-input", idempotency_key=key
    )
    assert first.duplicate is False and first.pairs == 2
    stored = server.counts()
    assert _grew(before, stored, rankings=1, ranking_items=3), (before, stored)

    replay = grpc_client.rank(
        [issued["A1"], [issued["A2"], issued["A3"]]], labeler="bad-input", idempotency_key=key
    )
    assert (replay.ranking_id, replay.prompt_id, replay.pairs, replay.duplicate) == (
        first.ranking_id,
        first.prompt_id,
        first.pairs,
        True,
    )
    assert server.counts() == stored

    with pytest.raises(Conflict, match="another labeler"):
        grpc_client.rank([issued["A0"], issued["A3"]], labeler="someone-else", idempotency_key=key)
    for other in ([issued["A0"], issued["A3"]], [issued["B0"], issued["B1"]]):
        replay = grpc_client.rank(other, labeler="bad-input", idempotency_key=key)
        assert (replay.ranking_id, replay.prompt_id, replay.pairs, replay.duplicate) == (
            first.ranking_id,
            first.prompt_id,
            first.pairs,
            True,
        )
        assert server.counts() == stored


def test_replayed_ranking_key_across_transports(server, grpc_client, issued):
    key = f"bad-input-cross-{uuid.uuid4().hex}"
    status, first = server.post(
        "/v1/feedback",
        {"ranking": [issued["B0"], issued["B1"]], "labeler": "bad-input", "idempotency_key": key},
    )
    assert status == 201, first
    stored = server.counts()
    replay = grpc_client.rank(
        [issued["B1"], issued["B0"]], labeler="bad-input", idempotency_key=key
    )
    assert (replay.ranking_id, replay.prompt_id, replay.pairs, replay.duplicate) == (
        first["ranking_id"],
        first["prompt_id"],
        first["pairs"],
        True,
    )
    assert server.counts() == stored


def test_replayed_demonstration_key(server, grpc_client):
    key = f"bad-input-demo-{uuid.uuid4().hex}"
    body = {"prompt": "add: 2 + 2", "response": "4", "labeler": "bad-input", "idempotency_key": key}
    before = server.counts()
    status, first = server.post("/v1/demonstrations", body)
    assert status == 201 and first["duplicate"] is False, first
    stored = server.counts()
    assert _grew(before, stored, demonstrations=1), (before, stored)

    status, replay = server.post("/v1/demonstrations", {**body, "response": "five"})
    assert status == 200 and replay == {**first, "duplicate": True}, replay
    again = grpc_client.demonstrate(
        "add: 3 + 3", response="6", labeler="bad-input", idempotency_key=key
    )
    assert (again.demonstration_id, again.duplicate) == (first["demonstration_id"], True)
    assert server.counts() == stored


def test_unknown_id_is_not_found_type(server, grpc_client):
    """The typed client error for an unknown id is NotFound, with the field."""
    with store_unchanged(server), pytest.raises(NotFound) as info:
        grpc_client.rank(["cmpl-doesnotexist", "cmpl-neverissued"], labeler="bad-input")
    assert info.value.field == "ranking"


# -- OpenAI fields this server would have to ignore ----------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("extra", "field", "substring"),
    [
        pytest.param({"suffix": "!"}, "suffix", "not supported", id="suffix"),
        pytest.param({"presence_penalty": 2.5}, "presence_penalty", "between -2 and 2", id="penalty"),
        pytest.param(
            {"logit_bias": {"99999999": 5}}, "logit_bias", "token ids are 0 to", id="logit_bias"
        ),
        pytest.param({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100", id="bias"),
        pytest.param(
            {"response_format": {"type": "json_object"}}, "response_format", "not supported",
            id="response_format",
        ),
        pytest.param({"min_p": 0.2}, "min_p", "not supported", id="min_p"),
        pytest.param({"temprature": 0.5}, "temprature", "not an OpenAI field", id="typo"),
    ],
)  # fmt: skip
def test_an_unsupported_openai_field_is_refused_by_name(server, path, extra, field, substring):
    body = {"max_tokens": 2, **extra}
    body |= {"messages": [{"role": "user", "content": "sort: cba"}]} if "chat" in path else {
        "prompt": "sort: cba"}  # fmt: skip
    error = check_http(server, path, body, 400, (field, substring), field)
    assert error["type"] == "invalid_request_error"


def test_openai_fields_at_their_defaults_or_without_effect_are_taken(server):
    body = {"prompt": "sort: cba", "max_tokens": 2, "presence_penalty": 0, "logprobs": None,
            "echo": False, "logit_bias": {}, "user": "u-1", "metadata": {"a": "b"}}  # fmt: skip
    status, doc = server.post("/v1/completions", body)
    assert status == 200 and doc["choices"][0]["text"] is not None, doc
