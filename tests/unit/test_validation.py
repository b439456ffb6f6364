"""Request validation: every bound, with the message a user can act on and the field it names."""

from __future__ import annotations

from typing import Any

import pytest

from flywheel_server import validation
from flywheel_server.domain import Sampling
from flywheel_server.errors import InvalidRequest
from flywheel_server.validation import RawSampling

pytestmark = pytest.mark.unit

LIMIT = 128


def refused(raw: RawSampling, *, limit: int = LIMIT) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validation.sampling(raw, max_tokens_limit=limit)
    return info.value


# -- sampling ------------------------------------------------------------------------------------


def test_sampling_defaults() -> None:
    assert validation.sampling(RawSampling(), max_tokens_limit=LIMIT) == Sampling(
        1.0, 1.0, 0, 64, (), None
    )


def test_sampling_accepts_every_bound_inclusive() -> None:
    got = validation.sampling(
        RawSampling(
            temperature=0, top_p=1, top_k=0, max_tokens=LIMIT, stop=["a", "b", "c", "d"], seed=0
        ),
        max_tokens_limit=LIMIT,
    )
    assert got == Sampling(0.0, 1.0, 0, LIMIT, ("a", "b", "c", "d"), 0)
    got = validation.sampling(
        RawSampling(temperature=10, top_p=1e-9, max_tokens=1, stop="x" * 64, seed=(1 << 63) - 1),
        max_tokens_limit=LIMIT,
    )
    assert got == Sampling(10.0, 1e-9, 0, 1, ("x" * 64,), (1 << 63) - 1)


def test_a_single_stop_string_becomes_a_tuple() -> None:
    assert validation.sampling(RawSampling(stop="END"), max_tokens_limit=LIMIT).stop == ("END",)


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        (
            RawSampling(temperature=-0.1),
            "temperature",
            "temperature must be between 0 and 10, got -0.1",
        ),
        (
            RawSampling(temperature=10.5),
            "temperature",
            "temperature must be between 0 and 10, got 10.5",
        ),
        (
            RawSampling(temperature=float("nan")),
            "temperature",
            "temperature must be between 0 and 10, got nan",
        ),
        (RawSampling(top_p=0), "top_p", "top_p must be in (0, 1], got 0"),
        (RawSampling(top_p=1.1), "top_p", "top_p must be in (0, 1], got 1.1"),
        (RawSampling(top_k=-1), "top_k", "top_k must be >= 0 (0 = off), got -1"),
        (
            RawSampling(max_tokens=0),
            "max_tokens",
            f"max_tokens must be between 1 and {LIMIT}, got 0",
        ),
        (
            RawSampling(max_tokens=LIMIT + 1),
            "max_tokens",
            f"max_tokens must be between 1 and {LIMIT}, got {LIMIT + 1}",
        ),
        (RawSampling(max_tokens=1.5), "max_tokens", "max_tokens must be an integer, got 1.5"),
        (RawSampling(max_tokens="8"), "max_tokens", "max_tokens must be an integer, got '8'"),
        (RawSampling(max_tokens=True), "max_tokens", "max_tokens must be an integer, got True"),
        (
            RawSampling(stop=["a", "b", "c", "d", "e"]),
            "stop",
            "stop may hold at most 4 strings, got 5",
        ),
        (RawSampling(stop=""), "stop", "each stop string must be 1 to 64 characters, got ''"),
        (
            RawSampling(stop=["ok", ""]),
            "stop",
            "each stop string must be 1 to 64 characters, got ''",
        ),
        (
            RawSampling(stop=["x" * 65]),
            "stop",
            f"each stop string must be 1 to 64 characters, got {'x' * 65!r}",
        ),
        (RawSampling(stop=[3]), "stop", "each stop string must be 1 to 64 characters, got 3"),
        (RawSampling(seed=-1), "seed", "seed must be between 0 and 2**63 - 1, got -1"),
        (RawSampling(seed=1 << 63), "seed", f"seed must be between 0 and 2**63 - 1, got {1 << 63}"),
    ],
)
def test_sampling_bounds(raw: RawSampling, field: str, message: str) -> None:
    e = refused(raw)
    assert e.field == field
    assert e.message == message
    assert str(e) == message


def test_omitted_max_tokens_fits_a_small_limit() -> None:
    got = validation.sampling(RawSampling(), max_tokens_limit=32)
    assert 1 <= got.max_tokens <= 32


# -- integer ----------------------------------------------------------------------------------------


def test_integer_bounds() -> None:
    assert validation.integer("n", 3, 1, 3) == 3
    with pytest.raises(InvalidRequest, match=r"^n must be between 1 and 3, got 4$") as info:
        validation.integer("n", 4, 1, 3)
    assert info.value.field == "n"


# -- ranking -------------------------------------------------------------------------------------


def test_ranking_returns_clean_tiers() -> None:
    assert validation.ranking([["a"], ["b", "c"]]) == (("a",), ("b", "c"))


def test_ranking_drops_empty_tiers() -> None:
    assert validation.ranking([[], ["a"], [], ["b"], []]) == (("a",), ("b",))


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        ([["a"]], "ranking needs at least 2 completion ids, got 1"),
        ([["a"], []], "ranking needs at least 2 completion ids, got 1"),
        ([], "ranking needs at least 2 completion ids, got 0"),
        ([["a", "b", "c"]], "ranking must order at least two tiers (all ids are tied)"),
        ([["a"], ["b", "a"]], "ranking lists a more than once"),
        ([["b", "a"], ["c", "a", "b"]], "ranking lists a, b more than once"),
        ([["a"], [""]], "ranking holds an empty or non-string id: ''"),
        ([["a"], [7]], "ranking holds an empty or non-string id: 7"),
        ([[f"c{i}"] for i in range(65)], "ranking may hold at most 64 ids, got 65"),
    ],
)
def test_ranking_refusals(tiers: list[list[Any]], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validation.ranking(tiers)
    assert info.value.message == message
    assert info.value.field == "ranking"


def test_ranking_accepts_64_ids() -> None:
    tiers = [[f"c{i}"] for i in range(64)]
    assert len(validation.ranking(tiers)) == 64


# -- messages --------------------------------------------------------------------------------------


def test_messages_keep_role_and_content_only() -> None:
    got = validation.messages(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "x"}]
    )
    assert got == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        ("hi", "messages", "messages must be a non-empty list of {role, content}"),
        ([], "messages", "messages must be a non-empty list of {role, content}"),
        (None, "messages", "messages must be a non-empty list of {role, content}"),
        (
            [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}],
            "messages",
            "messages[1].role must be one of system, user, assistant, got 'robot'",
        ),
        (
            ["hello"],
            "messages",
            "messages[0].role must be one of system, user, assistant, got 'hello'",
        ),
        (
            [{"role": "user", "content": ""}],
            "messages[0].content",
            "messages[0].content must not be empty",
        ),
        (
            [{"role": "user"}],
            "messages[0].content",
            "messages[0].content must be a string, got NoneType",
        ),
    ],
)
def test_messages_refusals(value: Any, field: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validation.messages(value)
    assert info.value.message == message
    assert info.value.field == field


# -- text -------------------------------------------------------------------------------------------


def test_text_accepts_a_string_up_to_the_limit() -> None:
    assert validation.text("prompt", "x" * 10, max_chars=10) == "x" * 10
    assert validation.text("completions[0]", "", allow_empty=True) == ""
    assert validation.text("prompt", "x" * validation.MAX_TEXT_CHARS) == "x" * 32_768


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        ("", {}, "prompt must not be empty"),
        (" \n\t ", {}, "prompt must not be empty"),
        ("x" * 11, {"max_chars": 10}, "prompt must be at most 10 characters, got 11"),
        ("x" * 32_769, {}, "prompt must be at most 32768 characters, got 32769"),
        (5, {}, "prompt must be a string, got int"),
        (None, {"allow_empty": True}, "prompt must be a string, got NoneType"),
        (b"hi", {}, "prompt must be a string, got bytes"),
    ],
)
def test_text_refusals(value: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validation.text("prompt", value, **kwargs)
    assert info.value.message == message
    assert info.value.field == "prompt"


def test_label_is_text_of_at_most_200_characters() -> None:
    assert validation.label("labeler", "a" * 200) == "a" * 200
    with pytest.raises(InvalidRequest, match=r"^labeler must be at most 200 characters, got 201$"):
        validation.label("labeler", "a" * 201)


def test_penalties_and_logit_bias_are_checked_and_kept() -> None:
    raw = RawSampling(presence_penalty=-2, frequency_penalty=1.5, logit_bias={"7": 5, "2": -100})
    s = validation.sampling(raw, max_tokens_limit=16, vocab_size=8)
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (
        -2.0,
        1.5,
        ((2, -100.0), (7, 5.0)),
    )
    for bad, field, message in [
        (RawSampling(presence_penalty=2.01), "presence_penalty", "between -2 and 2"),
        (RawSampling(frequency_penalty=float("nan")), "frequency_penalty", "between -2 and 2"),
        (RawSampling(logit_bias={"8": 1}), "logit_bias", "token ids are 0 to 7"),
        (RawSampling(logit_bias={"-1": 1}), "logit_bias", "token ids are 0 to 7"),
        (RawSampling(logit_bias={"a": 1}), "logit_bias", "token ids are 0 to 7"),
        (RawSampling(logit_bias={"1": 100.5}), "logit_bias", "between -100 and 100"),
        (RawSampling(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "at most 300"),
    ]:
        with pytest.raises(InvalidRequest, match=message) as e:
            validation.sampling(bad, max_tokens_limit=16, vocab_size=8)
        assert e.value.field == field


def test_text_with_a_nul_is_refused_and_model_output_made_printable() -> None:
    """PostgreSQL text cannot hold NUL: input holding one is refused on every store alike,
    and a NUL a model decodes to is stored and sent as U+FFFD."""
    with pytest.raises(InvalidRequest, match="NUL") as e:
        validation.text("prompt", "a\x00b")
    assert e.value.field == "prompt"
    assert validation.printable("\x00ok\x00") == "\ufffdok\ufffd"
