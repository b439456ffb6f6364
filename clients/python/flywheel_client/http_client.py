"""HTTP clients for the OpenAI-compatible routes and Flywheel's JSON routes:
`HttpClient` (sync) and `AsyncHttpClient`, over httpx.

The request bodies and response decoders below are shared; the two classes differ only in
how they send. Error responses and connection failures become typed `FlywheelError`s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

import httpx

from flywheel_client import types as t
from flywheel_client.errors import FlywheelError, InvalidArgument, Unavailable, from_http_error
from flywheel_client.ranking import RankingArg, as_tiers

DEFAULT_BASE_URL = "http://127.0.0.1:3000"
LIVE_POLICY = "policy"
Messages = Sequence[Mapping[str, str]]
Json = dict[str, Any]

# -- request bodies ------------------------------------------------------------------------------


def _prompt_fields(prompt: str | None, messages: Messages | None) -> Json:
    if (prompt is None) == (messages is None):
        raise InvalidArgument(
            "give either a prompt or messages, not both or neither", field="prompt"
        )
    return {"prompt": prompt} if messages is None else {"messages": [dict(m) for m in messages]}


def _sampling_fields(
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    min_tokens: int | None = None,
    ignore_eos: bool | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: Mapping[int, float] | None = None,
    logprobs: int | None = None,
    chat: bool = False,
) -> Json:
    """Only the fields given, so the server's defaults apply to the rest. `logprobs` as the
    route spells it: completions `logprobs: N`, chat `logprobs: true, top_logprobs: N`."""
    fields: Json = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "stop": [stop] if isinstance(stop, str) else (None if stop is None else list(stop)),
        "seed": seed,
        "min_tokens": min_tokens,
        "ignore_eos": ignore_eos,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "logit_bias": None if logit_bias is None else {str(t): b for t, b in logit_bias.items()},
    }
    if logprobs is not None:
        fields |= {"logprobs": True, "top_logprobs": logprobs} if chat else {"logprobs": logprobs}
    return {k: v for k, v in fields.items() if v is not None}


def _generate_request(
    prompt: str | None,
    messages: Messages | None,
    n: int,
    policy: str,
    options: t.SamplingOptions,
    stream: bool,
) -> tuple[str, Json]:
    path = "/v1/completions" if messages is None else "/v1/chat/completions"
    body = {
        "model": policy or LIVE_POLICY,
        **_prompt_fields(prompt, messages),
        "n": n,
        **_sampling_fields(**options, chat=messages is not None),
        "stream": stream,
    }
    return path, body


def _ranking_body(ranking: RankingArg, labeler: str, idempotency_key: str | None) -> Json:
    tiers = [tier[0] if len(tier) == 1 else list(tier) for tier in as_tiers(ranking)]
    return {"ranking": tiers, "labeler": labeler, "idempotency_key": _key(idempotency_key)}


def _key(idempotency_key: str | None) -> str:
    # A fresh key per call: a caller that retries must pass the same key explicitly.
    return idempotency_key or str(uuid.uuid4())


# -- response decoders ---------------------------------------------------------------------------


def _text(choice: Json) -> str:
    if "text" in choice:
        return choice["text"] or ""
    part = choice.get("message") or choice.get("delta") or {}
    return part.get("content") or ""


def _logprobs(choice: Json) -> tuple[t.TokenLogprob, ...]:
    """Either route's shape (completions: parallel lists; chat: a list of entries)."""
    lp = choice.get("logprobs") or {}
    if "content" in lp:
        return tuple(
            t.TokenLogprob(e["token"], e["logprob"],
                           tuple((x["token"], x["logprob"]) for x in e.get("top_logprobs") or ()))
            for e in lp["content"] or ()
        )  # fmt: skip
    columns = lp.get("tokens") or (), lp.get("token_logprobs") or (), lp.get("top_logprobs") or ()
    return tuple(
        t.TokenLogprob(token, logprob, tuple((top or {}).items()))
        for token, logprob, top in zip(*columns, strict=True)
    )


def _generation(body: Json) -> t.Generation:
    choices = body.get("choices", [])
    usage = body.get("usage") or {}
    # OpenAI usage is per request; it is one completion's count only when there is one.
    single = usage.get("completion_tokens", 0) if len(choices) == 1 else 0
    completions = tuple(
        t.Completion(
            id=c.get("completion_id", ""),
            index=c.get("index", 0),
            text=_text(c),
            finish_reason=c.get("finish_reason") or "",
            policy=c.get("policy", body.get("model", "")),
            prompt_tokens=usage.get("prompt_tokens", 0),
            completion_tokens=c.get("completion_tokens", single),
            logprobs=_logprobs(c),
        )
        for c in choices
    )
    return t.Generation(prompt_id=body.get("prompt_id", ""), completions=completions)


def _chunks(event: Json) -> list[t.Chunk]:
    if "error" in event:  # reported in-band: the 200 status was sent before the failure
        raise from_http_error(None, event)
    return [
        t.Chunk(
            prompt_id=event.get("prompt_id", ""),
            completion_id=c.get("completion_id", ""),
            index=c.get("index", 0),
            delta=_text(c),
            finish_reason=c.get("finish_reason") or "",
            policy=c.get("policy", event.get("model", "")),
            logprobs=_logprobs(c),
        )
        for c in event.get("choices", [])
    ]


_DONE = object()


def _sse_data(line: str) -> Json | object | None:
    """The JSON of a `data:` line, `_DONE` for `data: [DONE]`, None for other lines."""
    if not line.startswith("data:"):
        return None  # blank separators, comments (":"), event names
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return _DONE
    return _decode(payload)


def _decode(text: str) -> Json:
    try:
        body = json.loads(text)
    except ValueError as e:
        raise FlywheelError(f"the server sent something that is not JSON: {text[:200]!r}") from e
    if not isinstance(body, dict):
        raise FlywheelError(f"the server sent JSON that is not an object: {text[:200]!r}")
    return body


def _comparison(body: Json) -> t.Comparison:
    candidates = tuple(
        t.Completion(
            id=c.get("completion_id", ""),
            index=c.get("index", 0),
            text=c.get("text", ""),
            finish_reason=c.get("finish_reason") or "",
            policy=c.get("policy", ""),
        )
        for c in body.get("candidates", [])
    )
    return t.Comparison(prompt_id=body.get("prompt_id", ""), candidates=candidates)


def _scores(body: Json) -> t.Scores:
    return t.Scores(scores=tuple(body.get("scores", [])), reward_model=body.get("model", ""))


def _ranking_receipt(body: Json) -> t.RankingReceipt:
    return t.RankingReceipt(
        ranking_id=body.get("ranking_id", ""),
        prompt_id=body.get("prompt_id", ""),
        pairs=body.get("pairs", 0),
        duplicate=bool(body.get("duplicate", False)),
    )


def _demonstration_receipt(body: Json) -> t.DemonstrationReceipt:
    return t.DemonstrationReceipt(
        demonstration_id=body.get("demonstration_id", ""),
        duplicate=bool(body.get("duplicate", False)),
    )


def _versions(body: Json) -> t.Versions:
    versions = tuple(
        t.AdapterVersion(
            id=v.get("id", ""),
            name=v.get("name", ""),
            version=v.get("version", 0),
            state=v.get("state", ""),
            sha256=v.get("sha256", ""),
            created_at=v.get("created_at", 0.0),
            metrics=dict(v.get("metrics") or {}),
            base_model=v.get("base_model", ""),
        )
        for v in body.get("versions", [])
    )
    challenge = body.get("challenge")
    return t.Versions(
        versions=versions,
        live=dict(body.get("live") or {}),
        challenge=None if not challenge else _challenge_tally(challenge),
    )


def _challenge_tally(c: Json) -> t.ChallengeTally:
    return t.ChallengeTally(
        challenger=c.get("challenger", ""),
        champion=c.get("champion", ""),
        outcome=c.get("outcome", ""),
        rankings=c.get("rankings", 0),
        wins=c.get("wins", 0),
        losses=c.get("losses", 0),
        ties=c.get("ties", 0),
        win_rate=c.get("win_rate", 0.0),
        lower=c.get("lower", 0.0),
        upper=c.get("upper", 1.0),
        share=c.get("share", 0.0),
        confidence=c.get("confidence", 0.0),
        promote_above=c.get("promote_above", 0.0),
        retire_below=c.get("retire_below", 0.0),
        min_rankings=c.get("min_rankings", 0),
        started_at=c.get("started_at", 0.0),
        ended_at=c.get("ended_at"),
    )


def _name(name: str) -> Json | None:
    return {"name": name} if name else None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _unreachable(base_url: str, e: httpx.TransportError) -> Unavailable:
    return Unavailable(f"cannot reach {base_url}: {e or type(e).__name__}")


# -- clients -------------------------------------------------------------------------------------


class HttpClient:
    """Blocking client. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(
        self, method: str, path: str, body: Json | None = None, params: Json | None = None
    ) -> Json:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e
        if response.is_error:
            raise from_http_error(response.status_code, response.content, response.headers)
        return _decode(response.text)

    def _events(self, path: str, body: Json) -> Iterator[Json]:
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.is_error:
                    raise from_http_error(response.status_code, response.read(), response.headers)
                for line in response.iter_lines():
                    data = _sse_data(line)
                    if data is _DONE:
                        return
                    if data is not None:
                        yield data  # type: ignore[misc]
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Generation:
        """Via /v1/completions, or /v1/chat/completions when `messages` are given."""
        path, body = _generate_request(prompt, messages, n, policy, sampling, stream=False)
        return _generation(self._request("POST", path, body))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> Iterator[t.Chunk]:
        path, body = _generate_request(prompt, messages, n, policy, sampling, stream=True)
        return (chunk for event in self._events(path, body) for chunk in _chunks(event))

    def compare(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        k: int = 4,
        policies: Sequence[str] = (),
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Comparison:
        body = {
            **_prompt_fields(prompt, messages),
            "k": k,
            **_sampling_fields(**sampling),
            "policies": list(policies),
        }
        return _comparison(self._request("POST", "/v1/compare", body))

    def score(self, prompt: str, completions: Sequence[str], reward_model: str = "") -> t.Scores:
        body: Json = {"prompt": prompt, "completions": list(completions)}
        if reward_model:
            body["model"] = reward_model
        return _scores(self._request("POST", "/v1/rewards", body))

    def versions(self, name: str = "") -> t.Versions:
        return _versions(self._request("GET", "/v1/policies", params=_name(name)))

    def models(self) -> list[str]:
        """Ids the OpenAI-compatible routes accept as `model`."""
        return [m["id"] for m in self._request("GET", "/v1/models").get("data", [])]

    def rank(
        self, ranking: RankingArg, *, labeler: str, idempotency_key: str | None = None
    ) -> t.RankingReceipt:
        body = _ranking_body(ranking, labeler, idempotency_key)
        return _ranking_receipt(self._request("POST", "/v1/feedback", body))

    def demonstrate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        response: str,
        labeler: str,
        idempotency_key: str | None = None,
    ) -> t.DemonstrationReceipt:
        body = {
            **_prompt_fields(prompt, messages),
            "response": response,
            "labeler": labeler,
            "idempotency_key": _key(idempotency_key),
        }
        return _demonstration_receipt(self._request("POST", "/v1/demonstrations", body))


class AsyncHttpClient:
    """The same calls on httpx.AsyncClient. Use `async with`, or `await close()`."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _request(
        self, method: str, path: str, body: Json | None = None, params: Json | None = None
    ) -> Json:
        try:
            response = await self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e
        if response.is_error:
            raise from_http_error(response.status_code, response.content, response.headers)
        return _decode(response.text)

    async def _events(self, path: str, body: Json) -> AsyncIterator[Json]:
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.is_error:
                    raise from_http_error(
                        response.status_code, await response.aread(), response.headers
                    )
                async for line in response.aiter_lines():
                    data = _sse_data(line)
                    if data is _DONE:
                        return
                    if data is not None:
                        yield data  # type: ignore[misc]
        except httpx.TransportError as e:
            raise _unreachable(self.base_url, e) from e

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Generation:
        path, body = _generate_request(prompt, messages, n, policy, sampling, stream=False)
        return _generation(await self._request("POST", path, body))

    async def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> AsyncIterator[t.Chunk]:
        path, body = _generate_request(prompt, messages, n, policy, sampling, stream=True)
        async for event in self._events(path, body):
            for chunk in _chunks(event):
                yield chunk

    async def compare(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        k: int = 4,
        policies: Sequence[str] = (),
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Comparison:
        body = {
            **_prompt_fields(prompt, messages),
            "k": k,
            **_sampling_fields(**sampling),
            "policies": list(policies),
        }
        return _comparison(await self._request("POST", "/v1/compare", body))

    async def score(
        self, prompt: str, completions: Sequence[str], reward_model: str = ""
    ) -> t.Scores:
        body: Json = {"prompt": prompt, "completions": list(completions)}
        if reward_model:
            body["model"] = reward_model
        return _scores(await self._request("POST", "/v1/rewards", body))

    async def versions(self, name: str = "") -> t.Versions:
        return _versions(await self._request("GET", "/v1/policies", params=_name(name)))

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models")).get("data", [])]

    async def rank(
        self, ranking: RankingArg, *, labeler: str, idempotency_key: str | None = None
    ) -> t.RankingReceipt:
        body = _ranking_body(ranking, labeler, idempotency_key)
        return _ranking_receipt(await self._request("POST", "/v1/feedback", body))

    async def demonstrate(
        self,
        prompt: str | None = None,
        *,
        messages: Messages | None = None,
        response: str,
        labeler: str,
        idempotency_key: str | None = None,
    ) -> t.DemonstrationReceipt:
        body = {
            **_prompt_fields(prompt, messages),
            "response": response,
            "labeler": labeler,
            "idempotency_key": _key(idempotency_key),
        }
        return _demonstration_receipt(await self._request("POST", "/v1/demonstrations", body))
