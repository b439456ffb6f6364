"""API keys: parsing the variable and the file, and the check each request goes through."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flywheel_server.auth import ApiKey, Authenticator, parse_env, parse_file
from flywheel_server.errors import PermissionDenied, RateLimited, Unauthenticated
from flywheel_server.limits import Limit, TokenBucket

pytestmark = pytest.mark.unit


# -- parse_env ------------------------------------------------------------------------------------


def test_parse_env() -> None:
    assert parse_env("k1=generate+feedback,k2=admin") == [
        ApiKey("env-1", "k1", frozenset({"generate", "feedback"})),
        ApiKey("env-2", "k2", frozenset({"admin"})),
    ]


def test_parse_env_skips_blank_entries_and_spaces() -> None:
    assert parse_env(" , k1=feedback ,, ") == [ApiKey("env-1", "k1", frozenset({"feedback"}))]
    assert parse_env("") == []


def test_parse_env_keeps_an_equals_sign_in_the_scopes_part() -> None:
    # partition splits on the first '=': "a=b=admin" is key "a" with scope "b=admin" (refused).
    with pytest.raises(ValueError, match=r"FLYWHEEL_API_KEYS entry 1: scopes must be"):
        parse_env("a=b=admin")


def test_parse_env_refuses_an_unknown_scope() -> None:
    with pytest.raises(ValueError) as info:
        parse_env("k1=generate,k2=generate+write")
    assert str(info.value) == (
        "FLYWHEEL_API_KEYS entry 2: scopes must be a non-empty list of generate, feedback, admin; "
        "got ['generate', 'write']"
    )


@pytest.mark.parametrize("value", ["k1=", "k1=+"])
def test_parse_env_refuses_empty_scopes(value: str) -> None:
    with pytest.raises(
        ValueError, match=r"^FLYWHEEL_API_KEYS entry 1: scopes must be a non-empty list"
    ):
        parse_env(value)


@pytest.mark.parametrize(("value", "entry"), [("k1", 1), ("k1=admin,k2", 2), ("=admin", 1)])
def test_parse_env_refuses_an_entry_without_key_and_equals(value: str, entry: int) -> None:
    with pytest.raises(ValueError) as info:
        parse_env(value)
    assert str(info.value) == f"FLYWHEEL_API_KEYS entry {entry} must look like KEY=scope+scope"


# -- parse_file ------------------------------------------------------------------------------------


def write(tmp_path: Path, doc: object | str) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_parse_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "keys": [
                {"name": "app", "key": "app-key-123", "scopes": ["generate", "feedback"]},
                {"key": "admin-key-456", "scopes": ["admin"]},
            ]
        },
    )
    assert parse_file(path) == [
        ApiKey("app", "app-key-123", frozenset({"generate", "feedback"})),
        ApiKey("key-1", "admin-key-456", frozenset({"admin"})),
    ]


def test_parse_file_refuses_bad_json(tmp_path: Path) -> None:
    path = write(tmp_path, '{"keys": [')
    with pytest.raises(
        ValueError, match="^" + re.escape(f"cannot read API keys from {path}: ")
    ) as info:
        parse_file(path)
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_parse_file_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^cannot read API keys from .*nope\.json"):
        parse_file(tmp_path / "nope.json")


@pytest.mark.parametrize("doc", [{"key": "x"}, [], {"keys": {"a": 1}}, {"keys": None}])
def test_parse_file_refuses_the_wrong_shape(tmp_path: Path, doc: object) -> None:
    path = write(tmp_path, doc)
    with pytest.raises(
        ValueError, match=r'must hold \{"keys": \[\{"name", "key", "scopes"\}, \.\.\.\]\}$'
    ):
        parse_file(path)


@pytest.mark.parametrize(
    "entry", [{"key": "short", "scopes": ["admin"]}, {"key": 12345678, "scopes": ["admin"]}, "k"]
)
def test_parse_file_refuses_a_short_or_missing_key(tmp_path: Path, entry: object) -> None:
    path = write(tmp_path, {"keys": [{"key": "long-enough", "scopes": ["admin"]}, entry]})
    with pytest.raises(ValueError) as info:
        parse_file(path)
    assert str(info.value) == f"{path}: keys[1].key must be a string of at least 8 characters"


def test_parse_file_accepts_an_8_character_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"keys": [{"key": "12345678", "scopes": ["feedback"]}]})
    assert parse_file(path) == [ApiKey("key-0", "12345678", frozenset({"feedback"}))]


@pytest.mark.parametrize("scopes", [None, [], ["root"], "admin"])
def test_parse_file_refuses_bad_scopes(tmp_path: Path, scopes: object) -> None:
    path = write(tmp_path, {"keys": [{"key": "long-enough", "scopes": scopes}]})
    with pytest.raises(
        ValueError, match="^" + re.escape(f"{path}: keys[0]: scopes must be a non-empty list")
    ):
        parse_file(path)


def test_load_combines_file_and_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"keys": [{"name": "app", "key": "app-key-123", "scopes": ["generate"]}]}
    )
    auth = Authenticator.load(path, {"FLYWHEEL_API_KEYS": "envkey=feedback"})
    assert [k.name for k in auth.keys] == ["app", "env-1"]
    assert Authenticator.load(None, {}).enabled is False


# -- Authenticator.check -------------------------------------------------------------------------


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(
        parse_env("gen-key=generate,fb-key=feedback,both-key=generate+feedback,root-key=admin")
    )


def test_disabled_auth_lets_everyone_in_as_anonymous() -> None:
    off = Authenticator([])
    assert off.enabled is False
    assert off.check(None, "admin") == "anonymous"
    assert off.check("Bearer whatever", "generate") == "anonymous"


@pytest.mark.parametrize("header", [None, "", "Bearer ", "Bearer    ", "   "])
def test_a_missing_key_is_unauthenticated(auth: Authenticator, header: str | None) -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.check(header, "generate")
    assert info.value.message == "missing API key: send 'authorization: Bearer <key>'"


@pytest.mark.parametrize(
    "header", ["Bearer nope", "bearer nope", "Bearer gen-key2", "Bearer gen-ke"]
)
def test_an_unknown_key_is_unauthenticated(auth: Authenticator, header: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        auth.check(header, "generate")
    assert info.value.message == "unknown API key"


def test_a_key_lacking_the_scope_is_denied(auth: Authenticator) -> None:
    with pytest.raises(PermissionDenied) as info:
        auth.check("Bearer gen-key", "feedback")
    assert info.value.message == "API key 'env-1' lacks the 'feedback' scope"
    with pytest.raises(PermissionDenied, match="API key 'env-2' lacks the 'generate' scope"):
        auth.check("Bearer fb-key", "generate")
    with pytest.raises(PermissionDenied, match="API key 'env-3' lacks the 'admin' scope"):
        auth.check("Bearer both-key", "admin")


def test_keys_with_the_scope_return_their_name(auth: Authenticator) -> None:
    assert auth.check("Bearer gen-key", "generate") == "env-1"
    assert auth.check("Bearer fb-key", "feedback") == "env-2"
    assert auth.check("Bearer both-key", "generate") == "env-3"
    assert auth.check("Bearer both-key", "feedback") == "env-3"


@pytest.mark.parametrize("scope", ["generate", "feedback", "admin"])
def test_admin_implies_every_scope(auth: Authenticator, scope: str) -> None:
    assert auth.check("Bearer root-key", scope) == "env-4"


@pytest.mark.parametrize("header", ["Bearer gen-key", "gen-key", "Bearer  gen-key ", "  gen-key"])
def test_the_bearer_prefix_is_optional_and_spaces_are_trimmed(
    auth: Authenticator, header: str
) -> None:
    assert auth.check(header, "generate") == "env-1"


def test_the_bearer_prefix_is_stripped_only_once(auth: Authenticator) -> None:
    with pytest.raises(Unauthenticated, match="unknown API key"):
        auth.check("Bearer Bearer gen-key", "generate")


# -- per-key limits ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(Limit(rate_per_s=2.0, burst=3), clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # empty: one token comes in half a second
    clock.now += 0.25
    assert bucket.take() == pytest.approx(0.25)  # a refused request spends nothing
    clock.now += 0.25
    assert bucket.take() == 0.0
    clock.now += 60.0  # an idle key saves up no more than its burst
    assert [bucket.take() for _ in range(4)][-1] > 0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"rate_per_s": 0}, "rate_per_s must be a positive number"),
        ({"rate_per_s": "fast"}, "rate_per_s must be a number"),
        ({"rate_per_s": True}, "rate_per_s must be a number"),
        ({"rate_per_s": 1, "burst": 0}, "burst must be at least 1"),
        ({"rate_per_s": 1, "burst": 1.5}, "burst must be a whole number"),
        ({"burst": 4}, "burst needs rate_per_s"),
    ],
)
def test_parse_file_refuses_a_bad_limit(
    tmp_path: Path, entry: dict[str, object], message: str
) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"key": "k" * 8, "scopes": ["generate"], **entry}]}))
    with pytest.raises(ValueError, match=re.escape(f"keys[0]: {message}")):
        parse_file(path)


def test_parse_file_reads_a_limit_with_a_default_burst(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys = [
        {"name": "a", "key": "a" * 8, "scopes": ["generate"], "rate_per_s": 2.5},
        {"name": "b", "key": "b" * 8, "scopes": ["generate"], "rate_per_s": 0.5, "burst": 4},
        {"name": "c", "key": "c" * 8, "scopes": ["generate"]},
    ]
    path.write_text(json.dumps({"keys": keys}))
    assert [k.limit for k in parse_file(path)] == [Limit(2.5, 3), Limit(0.5, 4), None]


def test_a_key_over_its_limit_is_refused_with_a_wait_and_others_are_not() -> None:
    clock = Clock()
    greedy = ApiKey("greedy", "g" * 8, frozenset({"generate"}), Limit(1.0, 2))
    polite = ApiKey("polite", "p" * 8, frozenset({"generate"}))
    auth = Authenticator([greedy, polite], clock)
    assert [auth.check("g" * 8, "generate") for _ in range(2)] == ["greedy", "greedy"]
    with pytest.raises(RateLimited, match=r"'greedy' is over its limit of 1 requests/s") as e:
        auth.check("Bearer " + "g" * 8, "generate")
    assert e.value.retry_after == pytest.approx(1.0) and e.value.key == "greedy"
    assert all(auth.check("p" * 8, "generate") == "polite" for _ in range(50))
    with pytest.raises(PermissionDenied):  # scope first: a refused scope spends no token
        auth.check("g" * 8, "admin")
    clock.now += 1.0
    assert auth.check("g" * 8, "generate") == "greedy"


def test_key_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="names must be unique"):
        Authenticator(
            [ApiKey("a", "x" * 8, frozenset({"admin"})), ApiKey("a", "y" * 8, frozenset({"admin"}))]
        )


# -- labelers bound to keys -------------------------------------------------------------------------


def test_a_keys_feedback_is_recorded_under_its_name() -> None:
    auth = Authenticator(
        [
            ApiKey("ann", "a" * 8, frozenset({"feedback"})),
            ApiKey("team", "t" * 8, frozenset({"feedback"}), sub_labelers=True),
        ]
    )
    assert (
        auth.labeler("ann", "") == auth.labeler("ann", " ") == auth.labeler("ann", "ann") == "ann"
    )
    with pytest.raises(PermissionDenied, match="'ann', not 'bob'") as e:
        auth.labeler("ann", "bob")
    assert e.value.field == "labeler"
    assert auth.labeler("team", "bob") == "team/bob"
    assert auth.labeler("team", "") == "team"
    assert Authenticator([]).labeler("anonymous", "bob") == "bob"  # auth off: as the body says


def test_parse_file_reads_sub_labelers(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry = {"key": "k" * 8, "scopes": ["feedback"], "sub_labelers": True}
    path.write_text(json.dumps({"keys": [entry]}))
    assert parse_file(path)[0].sub_labelers
    path.write_text(json.dumps({"keys": [{**entry, "sub_labelers": "yes"}]}))
    with pytest.raises(ValueError, match="sub_labelers must be true or false"):
        parse_file(path)


def test_refusals_are_tallied_by_key_and_reason_until_drained() -> None:
    auth = Authenticator(
        [ApiKey("ann", "a" * 8, frozenset({"generate"}), Limit(1.0, 1))], clock=Clock()
    )
    auth.check("a" * 8, "generate")
    for _ in range(3):
        with pytest.raises(RateLimited):
            auth.check("a" * 8, "generate")
    with pytest.raises(PermissionDenied):
        auth.check("a" * 8, "admin")
    with pytest.raises(PermissionDenied):
        auth.labeler("ann", "bob")
    with pytest.raises(Unauthenticated):
        auth.check("nope-nope", "generate")
    with pytest.raises(Unauthenticated):
        auth.check(None, "generate")
    assert auth.drain_refusals() == {
        ("ann", "RateLimited"): 3,
        ("ann", "PermissionDenied"): 2,
        ("(unknown key)", "Unauthenticated"): 1,
        ("(no key)", "Unauthenticated"): 1,
    }
    assert auth.drain_refusals() == {}


def test_key_names_may_not_hold_a_slash() -> None:
    """ "team/alice" is how a sub-labeler of key "team" is recorded: no key may take that name."""
    with pytest.raises(ValueError, match="may not contain '/'"):
        Authenticator([ApiKey("team/alice", "x" * 8, frozenset({"feedback"}))])


def test_a_token_budget_is_spent_by_what_is_asked_and_refills() -> None:
    clock = Clock()
    budget = ApiKey("bench", "b" * 8, frozenset({"generate"}), tokens=Limit(60 / 60, 60))
    auth = Authenticator([budget, ApiKey("free", "f" * 8, frozenset({"generate"}))], clock)
    auth.charge("bench", 40)
    with pytest.raises(RateLimited, match="spent its 60 tokens per minute") as e:
        auth.charge("bench", 40)  # 20 left: 20 more come in 20 s
    assert e.value.retry_after == pytest.approx(20.0) and e.value.key == "bench"
    with pytest.raises(RateLimited, match="more than API key 'bench' may ask for at once"):
        auth.charge("bench", 61)
    auth.charge("free", 10**9)  # no budget configured
    auth.charge("anonymous", 10**9)  # auth off
    clock.now += 20.0
    auth.charge("bench", 40)


def test_parse_file_reads_a_token_budget(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    entry = {"key": "k" * 8, "scopes": ["generate"], "tokens_per_min": 6000}
    path.write_text(json.dumps({"keys": [entry]}))
    assert parse_file(path)[0].tokens == Limit(100.0, 6000)
    path.write_text(json.dumps({"keys": [{**entry, "tokens_per_min": 0}]}))
    with pytest.raises(ValueError, match="tokens_per_min must be a whole number >= 1"):
        parse_file(path)
