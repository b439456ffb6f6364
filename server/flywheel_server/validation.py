"""Request validation as pure functions: each rejection names the field and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flywheel_server.domain import Sampling
from flywheel_server.errors import InvalidRequest

MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's bound
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_LABEL_CHARS = 200
MAX_TEXT_CHARS = 32_768
MAX_RANKING_IDS = 64
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RawSampling:
    """Sampling fields as they arrive; None = not given."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: str | Sequence[str] | None = None
    seed: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None  # token id (as OpenAI writes it) -> bias
    logprobs: int | None = None  # alternatives per token; None: no logprobs


def number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{field} must be a number, got {value!r}", field=field)
    return float(value)


def sampling(raw: RawSampling, *, max_tokens_limit: int, vocab_size: int = 1 << 31) -> Sampling:
    defaults = Sampling()
    temperature = (
        defaults.temperature if raw.temperature is None else number("temperature", raw.temperature)
    )
    if not math.isfinite(temperature) or not 0 <= temperature <= 10:
        raise InvalidRequest(
            f"temperature must be between 0 and 10, got {raw.temperature}", field="temperature"
        )
    top_p = defaults.top_p if raw.top_p is None else number("top_p", raw.top_p)
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {raw.top_p}", field="top_p")
    top_k = (
        defaults.top_k if raw.top_k is None else integer("top_k", raw.top_k, -(1 << 31), 1 << 31)
    )
    if top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {top_k}", field="top_k")
    max_tokens = (
        min(defaults.max_tokens, max_tokens_limit) if raw.max_tokens is None else raw.max_tokens
    )
    max_tokens = integer("max_tokens", max_tokens, 1, max_tokens_limit)
    stops = (raw.stop,) if isinstance(raw.stop, str) else tuple(raw.stop or ())
    if len(stops) > MAX_STOPS:
        raise InvalidRequest(
            f"stop may hold at most {MAX_STOPS} strings, got {len(stops)}", field="stop"
        )
    for s in stops:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise InvalidRequest(
                f"each stop string must be 1 to {MAX_STOP_CHARS} characters, got {s!r}",
                field="stop",
            )
    if raw.seed is not None and not 0 <= integer("seed", raw.seed, -(1 << 64), 1 << 64) < 1 << 63:
        raise InvalidRequest(f"seed must be between 0 and 2**63 - 1, got {raw.seed}", field="seed")
    min_tokens = (
        0 if raw.min_tokens is None else integer("min_tokens", raw.min_tokens, 0, max_tokens)
    )
    if raw.ignore_eos is not None and not isinstance(raw.ignore_eos, bool):
        raise InvalidRequest(
            f"ignore_eos must be true or false, got {raw.ignore_eos!r}", field="ignore_eos"
        )
    presence = _penalty("presence_penalty", raw.presence_penalty)
    frequency = _penalty("frequency_penalty", raw.frequency_penalty)
    logprobs = None if raw.logprobs is None else integer("logprobs", raw.logprobs, 0, MAX_LOGPROBS)
    return Sampling(
        temperature, top_p, top_k, max_tokens, stops, raw.seed, min_tokens,
        bool(raw.ignore_eos), presence, frequency, _logit_bias(raw.logit_bias, vocab_size),
        logprobs,
    )  # fmt: skip


def _penalty(field: str, value: float | None) -> float:
    penalty = 0.0 if value is None else number(field, value)
    if not -2 <= penalty <= 2:  # also refuses NaN
        raise InvalidRequest(f"{field} must be between -2 and 2, got {penalty}", field=field)
    return penalty


def _logit_bias(raw: Mapping[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{token id: bias} as OpenAI sends it: ids as strings, within the vocabulary, biases in
    [-100, 100], at most MAX_LOGIT_BIAS of them."""
    if not raw:
        return ()
    if not isinstance(raw, Mapping) or len(raw) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases", field="logit_bias"
        )
    out = {}
    for key, value in raw.items():
        text = str(key)
        if not (text.isascii() and text.isdigit()) or int(text) >= vocab_size:
            raise InvalidRequest(
                f"logit_bias names token {text[:20]!r}; token ids are 0 to {vocab_size - 1}",
                field="logit_bias",
            )
        bias = number("logit_bias", value)
        if not -100 <= bias <= 100:
            raise InvalidRequest(
                f"logit_bias values must be between -100 and 100, got {value}", field="logit_bias"
            )
        out[int(text)] = bias
    return tuple(sorted(out.items()))


def integer(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{field} must be an integer, got {value!r}", field=field)
    if not low <= value <= high:
        raise InvalidRequest(f"{field} must be between {low} and {high}, got {value}", field=field)
    return value


def token_ids(field: str, value: Any, vocab_size: int) -> tuple[int, ...]:
    """A prompt given as token ids: a non-empty list of ids the model has."""
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRequest(f"{field} must be a non-empty list of token ids", field=field)
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise InvalidRequest(
                f"{field}[{i}] must be a token id between 0 and {vocab_size - 1}, got {token!r:.40}",
                field=field,
            )
    return tuple(value)


def text(
    field: str, value: Any, *, max_chars: int = MAX_TEXT_CHARS, allow_empty: bool = False
) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{field} must be a string, got {type(value).__name__}", field=field)
    if not value.strip() and not allow_empty:
        raise InvalidRequest(f"{field} must not be empty", field=field)
    if len(value) > max_chars:
        raise InvalidRequest(
            f"{field} must be at most {max_chars} characters, got {len(value)}", field=field
        )
    if "\x00" in value:  # PostgreSQL text cannot hold it: refused on every store alike
        raise InvalidRequest(f"{field} must not contain NUL (\\u0000) characters", field=field)
    return value


def printable(text: str) -> str:
    """Model output as stored and sent: a NUL a model may decode to (PostgreSQL text cannot
    hold it) becomes U+FFFD, the replacement character."""
    return text.replace("\x00", "\ufffd")


def messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "messages must be a non-empty list of {role, content}", field="messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role') if isinstance(m, dict) else m!r}",
                field="messages",
            )
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts; only text ones are served
            content = "\n".join(_text_part(f"messages[{i}].content[{j}]", part)
                                 for j, part in enumerate(content))  # fmt: skip
        out.append({"role": m["role"], "content": text(f"messages[{i}].content", content)})
    return out


def _text_part(field: str, part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind != "text":
        raise InvalidRequest(
            f"{field} must be a text part {{type: text, text}}; this server serves text only, "
            f"got type {kind!r:.40}",
            field="messages",
        )
    return text(f"{field}.text", part.get("text"), allow_empty=True)


def ranking(tiers: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """Tiers best first; at least two distinct ids; no id twice."""
    cleaned = tuple(tuple(tier) for tier in tiers if len(tier))
    ids = [cid for tier in cleaned for cid in tier]
    for cid in ids:
        if not isinstance(cid, str) or not cid:
            raise InvalidRequest(
                f"ranking holds an empty or non-string id: {cid!r}", field="ranking"
            )
    if len(ids) < 2:
        raise InvalidRequest(
            f"ranking needs at least 2 completion ids, got {len(ids)}", field="ranking"
        )
    if len(ids) > MAX_RANKING_IDS:
        raise InvalidRequest(
            f"ranking may hold at most {MAX_RANKING_IDS} ids, got {len(ids)}", field="ranking"
        )
    duplicates = sorted({cid for cid in ids if ids.count(cid) > 1})
    if duplicates:
        raise InvalidRequest(
            f"ranking lists {', '.join(duplicates)} more than once", field="ranking"
        )
    if len(cleaned) < 2:
        raise InvalidRequest(
            "ranking must order at least two tiers (all ids are tied)", field="ranking"
        )
    return cleaned


def label(field: str, value: Any) -> str:
    return text(field, value, max_chars=MAX_LABEL_CHARS)
