"""The HTTP transport: OpenAI-compatible routes plus plain JSON routes, mounted at /v1.

Handlers parse and validate the body, call the service, and shape the answer. Errors map to
status codes in one place (`error_response`), in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flywheel_proto import datasets
from flywheel_server import errors, metrics, stats
from flywheel_server.domain import AdapterVersion, ChallengeStatus, RankingExport
from flywheel_server.engine_api import TokenLogprob
from flywheel_server.generation import Generation, GenerationStream, PromptInput, StreamEvent
from flywheel_server.labeling import LabelingTask
from flywheel_server.openai_fields import unsupported
from flywheel_server.openai_logprobs import chat_logprobs, completion_logprobs
from flywheel_server.service import FlywheelService
from flywheel_server.validation import RawSampling

STATUS: list[tuple[type[errors.FlywheelError], int, str]] = [
    (errors.InvalidRequest, 400, "invalid_request_error"),
    (errors.NotFound, 404, "not_found_error"),
    (errors.Conflict, 409, "conflict_error"),
    (errors.Overloaded, 429, "rate_limit_error"),
    (errors.Unavailable, 503, "service_unavailable_error"),
    (errors.Unauthenticated, 401, "authentication_error"),
    (errors.PermissionDenied, 403, "permission_error"),
]


DRAIN_FACTOR = 16
MAX_PROMPTS = 64  # prompts of one unary /v1/completions request (a client's batch)


class BodyTooLarge(errors.InvalidRequest):
    pass


def error_response(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status
    )


# The service names fields as the contract does; OpenAI's HTTP shape calls both "model".
HTTP_FIELDS = {"policy": "model", "reward_model": "model"}


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "²".isdigit() is True
        raise errors.InvalidRequest(
            f"{name} must be a whole number >= 0, got {raw[:40]!r}", field=name
        )
    return int(raw)


def from_error(e: errors.FlywheelError) -> JSONResponse:
    metrics.rejected(e)
    field = HTTP_FIELDS.get(e.field, e.field) if e.field else None
    message = e.message
    if field and e.field and field != e.field and message.startswith(e.field + " "):
        message = field + message[len(e.field) :]
    if isinstance(e, BodyTooLarge):
        return error_response(413, "invalid_request_error", message, field)
    status, kind = next((s, k) for cls, s, k in STATUS if isinstance(e, cls))
    response = error_response(status, kind, message, field)
    if isinstance(e, errors.Overloaded):
        response.headers["retry-after"] = str(max(1, math.ceil(e.retry_after)))  # whole seconds
    return response


# -- request bodies ----------------------------------------------------------------------------


class _Sampling(BaseModel):
    """The sampling fields of every generating request, as the service checks them."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int | None = None  # vLLM's benchmark knobs
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def raw_sampling(self) -> RawSampling:
        return RawSampling(
            self.temperature,
            self.top_p,
            self.top_k,
            self.max_tokens,
            self.stop,
            self.seed,
            self.min_tokens,
            self.ignore_eos,
            self.presence_penalty,
            self.frequency_penalty,
            self.logit_bias,
            self.wanted_logprobs(),
        )

    def wanted_logprobs(self) -> int | None:
        return None


class _OpenAI(_Sampling):
    """An OpenAI request. A field not declared here is refused by name unless it changes
    nothing in what is generated (`openai_fields.unsupported`)."""

    model_config = ConfigDict(extra="ignore")
    model: str = "policy"
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # stored with the prompt: feedback and traffic by end user


class CompletionBody(_OpenAI):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids, one or several
    logprobs: int | None = None  # each token's log-probability and this many alternatives
    echo: bool = False  # the prompt before the completion (with logprobs: its tokens' too)

    def prompts(self) -> list[PromptInput]:
        p = self.prompt
        many: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        if not 1 <= len(many) <= MAX_PROMPTS:
            raise errors.InvalidRequest(
                f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(many)}", field="prompt"
            )
        if len(many) > 1 and self.stream:
            raise errors.InvalidRequest(
                "a streamed completion takes one prompt; send the others in their own requests",
                field="prompt",
            )
        return [
            PromptInput(text=x) if isinstance(x, str) else PromptInput(token_ids=tuple(x))
            for x in many
        ]

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


class ChatBody(_OpenAI):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def wanted_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise errors.InvalidRequest(
                    "top_logprobs needs logprobs: true", field="top_logprobs"
                )
            return None
        return self.top_logprobs or 0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompareBody(_Sampling):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    k: int = 4
    policies: list[str] = []


class RewardsBody(_Strict):
    prompt: str
    completions: list[str]
    model: str = ""


class FeedbackBody(_Strict):
    ranking: list[str | list[str]]
    labeler: str = ""  # with auth on: the key's name when empty (`auth.Authenticator.labeler`)
    idempotency_key: str = ""


class TaskBody(_Strict):
    labeler: str = ""  # with auth on: the key's name when empty
    task_id: str = ""  # next: this task, when it is open to the labeler; skip: required
    all_bad: bool = False  # skip: every candidate is bad (recorded, no order to learn)


class TypedTaskBody(_Strict):
    prompt: str
    labeler: str = ""


class AddTasksBody(_Strict):
    prompts: list[str]


class DemonstrationBody(_Strict):
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    response: str
    labeler: str = ""
    idempotency_key: str = ""


class PromoteBody(_Strict):
    name: Literal["policy", "reward"]
    version: int


class RollbackBody(_Strict):
    name: Literal["policy", "reward"]


class ChallengeBody(_Strict):
    version: int | None = None
    stop: bool = False


# -- the app -----------------------------------------------------------------------------------


def create_app(get_runtime: Callable[[], Any]) -> Starlette:
    """`get_runtime()` returns the object holding `.service` and `.auth` once the server started."""

    async def body(request: Request, model: type[BaseModel], limit: int) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"request body is {declared} bytes; at most {limit}", field="body")
        raw = bytearray()
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= limit:
                raw += chunk
            elif seen > DRAIN_FACTOR * limit:
                break
        if seen > limit:
            # Read (and drop) the rest first: answering mid-upload resets clients that send
            # the whole body before reading the reply.
            raise BodyTooLarge(f"request body exceeds {limit} bytes", field="body")
        try:
            doc = json.loads(raw)
        except RecursionError as e:
            raise errors.InvalidRequest("request body is nested too deeply", field="body") from e
        except ValueError as e:  # bad JSON or bytes, or an integer past Python's digit limit
            raise errors.InvalidRequest(f"request body is not valid JSON: {e}", field="body") from e
        if not isinstance(doc, dict):
            raise errors.InvalidRequest("request body must be a JSON object", field="body")
        if issubclass(model, _OpenAI) and (problem := unsupported(doc, model.model_fields)):
            raise errors.InvalidRequest(problem[1], field=problem[0])
        return model.model_validate(doc)

    def route(
        scope: str, model: type[BaseModel] | None = None
    ) -> Callable[..., Callable[[Request], Awaitable[Response]]]:
        def wrap(
            handler: Callable[..., Awaitable[Response]],
        ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                clock = metrics.start_request("http", request.url.path)
                try:
                    response = await handle(request)
                except BaseException:
                    clock.finish(500)
                    raise
                if isinstance(response, StreamingResponse):
                    response.body_iterator = metrics.finish_after(
                        response.body_iterator, clock, response.status_code
                    )
                else:
                    clock.finish(response.status_code)
                return response

            async def handle(request: Request) -> Response:
                runtime = get_runtime()
                try:
                    caller = runtime.auth.check(request.headers.get("authorization"), scope)
                    if model is None:
                        return await handler(runtime.service, request)
                    parsed = await body(request, model, runtime.service.config.max_body_bytes)
                    if "labeler" in type(parsed).model_fields:  # feedback: whose it is
                        labeler = runtime.auth.labeler(caller, parsed.labeler)  # type: ignore[attr-defined]
                        parsed = parsed.model_copy(update={"labeler": labeler})
                    return await handler(runtime.service, parsed)
                except ValidationError as e:
                    metrics.rejected(e)
                    first = e.errors()[0]
                    field = str(first["loc"][0]) if first["loc"] else "body"
                    got = repr(first.get("input"))[:80]
                    return error_response(
                        422, "invalid_request_error", f"{field}: {first['msg']} (got {got})", field
                    )
                except errors.FlywheelError as e:
                    return from_error(e)

            return endpoint

        return wrap

    @route("generate", CompletionBody)
    async def completions(service: FlywheelService, b: CompletionBody) -> Response:
        return await _generate(service, b, b.prompts(), chat=False)

    @route("generate", ChatBody)
    async def chat_completions(service: FlywheelService, b: ChatBody) -> Response:
        if b.max_tokens is None and b.max_completion_tokens is not None:
            b = b.model_copy(update={"max_tokens": b.max_completion_tokens})
        return await _generate(service, b, [PromptInput(messages=b.messages)], chat=True)

    @route("generate")
    async def models(service: FlywheelService, request: Request) -> Response:
        versions, live = service.versions()
        ids = [*live, *(v.id for v in versions)]
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": i, "object": "model", "created": 0, "owned_by": "flywheel"} for i in ids
                ],
            }
        )

    @route("generate")
    async def policies(service: FlywheelService, request: Request) -> Response:
        name = request.query_params.get("name", "")
        versions, live = service.versions(name)
        status = await service.adapters.challenge_status(name)
        return JSONResponse(
            {
                "live": live,
                "versions": [version_json(v) for v in versions],
                "challenge": None if status is None else challenge_json(status),
            }
        )

    @route("generate", CompareBody)
    async def compare(service: FlywheelService, b: CompareBody) -> Response:
        result = await service.compare(
            PromptInput(b.prompt, b.messages), k=b.k, sampling=b.raw_sampling(), policies=b.policies
        )
        return JSONResponse(
            {
                "prompt_id": result.prompt_id,
                "candidates": [
                    {
                        "completion_id": c.id,
                        "index": c.index,
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "policy": c.policy,
                    }
                    for c in result.completions
                ],
            }
        )

    @route("generate", RewardsBody)
    async def rewards(service: FlywheelService, b: RewardsBody) -> Response:
        scores, model = await service.score(b.prompt, b.completions, b.model)
        return JSONResponse({"scores": scores, "model": model})

    @route("feedback", FeedbackBody)
    async def feedback(service: FlywheelService, b: FeedbackBody) -> Response:
        tiers = [[item] if isinstance(item, str) else item for item in b.ranking]
        r = await service.rank(tiers, labeler=b.labeler, idempotency_key=b.idempotency_key)
        return JSONResponse(
            {
                "ranking_id": r.ranking_id,
                "prompt_id": r.prompt_id,
                "pairs": r.pairs,
                "duplicate": r.duplicate,
            },
            status_code=200 if r.duplicate else 201,
        )

    @route("feedback", DemonstrationBody)
    async def demonstrations(service: FlywheelService, b: DemonstrationBody) -> Response:
        r = await service.demonstrate(
            PromptInput(b.prompt, b.messages),
            b.response,
            labeler=b.labeler,
            idempotency_key=b.idempotency_key,
        )
        return JSONResponse(
            {"demonstration_id": r.demonstration_id, "duplicate": r.duplicate},
            status_code=200 if r.duplicate else 201,
        )

    @route("admin")
    async def stats_versions(service: FlywheelService, request: Request) -> Response:
        versions, live = service.versions()
        status = await service.adapters.challenge_status("")
        challenge = None if status is None else challenge_json(status)
        return JSONResponse(stats.versions(versions, live, challenge))

    @route("admin")
    async def stats_reward_agreement(service: FlywheelService, request: Request) -> Response:
        rankings = await asyncio.to_thread(service.store.newest_rankings, stats.REWARD_WINDOW)

        async def score(prompt: str, completions: list[str]) -> list[float]:
            return (await service.score(prompt, completions))[0]

        return JSONResponse(await stats.reward_agreement(rankings, score))

    def stats_route(
        figures: Callable[[list[RankingExport]], dict[str, Any]],
    ) -> Callable[[Request], Awaitable[Response]]:
        @route("admin")
        async def handler(service: FlywheelService, request: Request) -> Response:
            rankings = await asyncio.to_thread(service.store.newest_rankings, stats.WINDOW)
            return JSONResponse(figures(rankings))

        return handler

    @route("feedback", TaskBody)
    async def next_task(service: FlywheelService, b: TaskBody) -> Response:
        return JSONResponse({"task": task_json(await service.labeling.next(b.labeler, b.task_id))})

    @route("feedback", TypedTaskBody)
    async def typed_task(service: FlywheelService, b: TypedTaskBody) -> Response:
        return JSONResponse({"task": task_json(await service.labeling.typed(b.labeler, b.prompt))})

    @route("feedback", TaskBody)
    async def skip_task(service: FlywheelService, b: TaskBody) -> Response:
        if not b.task_id:
            raise errors.InvalidRequest("task_id is required to skip a task", field="task_id")
        claim = await service.labeling.skip(b.labeler, b.task_id, b.all_bad)
        return JSONResponse({"task_id": claim.task.id, "state": claim.state})

    @route("admin", AddTasksBody)
    async def add_tasks(service: FlywheelService, b: AddTasksBody) -> Response:
        added = await service.labeling.add(b.prompts, "file")
        return JSONResponse({"added": added, "duplicates": len(b.prompts) - added},
                            201 if added else 200)  # fmt: skip

    @route("admin", PromoteBody)
    async def promote(service: FlywheelService, b: PromoteBody) -> Response:
        return JSONResponse(version_json(await service.adapters.promote(b.name, b.version)))

    @route("admin", RollbackBody)
    async def rollback(service: FlywheelService, b: RollbackBody) -> Response:
        return JSONResponse(version_json(await service.adapters.rollback(b.name)))

    @route("admin", ChallengeBody)
    async def challenge(service: FlywheelService, b: ChallengeBody) -> Response:
        return JSONResponse(
            challenge_json(await service.adapters.challenge(b.version, stop=b.stop))
        )

    @route("admin")
    async def export(service: FlywheelService, request: Request) -> Response:
        """A page of rankings as a JSON Lines dataset (`flywheel_proto.datasets`); the cursor
        to ask for the next page after is in the `flywheel-next` header."""
        fmt = request.query_params.get("format", "pairs")
        if fmt not in datasets.FORMATS:
            raise errors.InvalidRequest(
                f"format must be one of {', '.join(datasets.FORMATS)}, got {fmt[:40]!r}",
                field="format",
            )
        after = _query_int(request, "after", 0)
        page = await service.export_rankings(after, _query_int(request, "limit", 0))
        body = "".join(datasets.jsonl(line) for line in datasets.lines(page, fmt))
        cursor = page[-1].cursor if page else after
        return Response(
            body, media_type="application/jsonl", headers={"flywheel-next": str(cursor)}
        )

    @route("admin")
    async def audit(service: FlywheelService, request: Request) -> Response:
        after = _query_int(request, "after", 0)
        entries = await service.export_audit(after, _query_int(request, "limit", 0))
        return JSONResponse(
            {
                "entries": [dataclasses.asdict(e) for e in entries],
                "next": entries[-1].cursor if entries else after,
            }
        )

    async def openapi_json(request: Request) -> Response:
        from flywheel_server import openapi  # it imports this module's request bodies

        return JSONResponse(openapi.document())

    return Starlette(
        routes=[
            Route("/completions", completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/models", models, methods=["GET"]),
            Route("/policies", policies, methods=["GET"]),
            Route("/policies/promote", promote, methods=["POST"]),
            Route("/policies/rollback", rollback, methods=["POST"]),
            Route("/policies/challenge", challenge, methods=["POST"]),
            Route("/compare", compare, methods=["POST"]),
            Route("/rewards", rewards, methods=["POST"]),
            Route("/feedback", feedback, methods=["POST"]),
            Route("/demonstrations", demonstrations, methods=["POST"]),
            Route("/audit", audit, methods=["GET"]),
            Route("/export", export, methods=["GET"]),
            Route("/stats/versions", stats_versions, methods=["GET"]),
            Route("/stats/labelers", stats_route(stats.labelers), methods=["GET"]),
            Route("/stats/agreement", stats_route(stats.agreement), methods=["GET"]),
            Route("/stats/ratings", stats_route(stats.ratings), methods=["GET"]),
            Route("/stats/reward-agreement", stats_reward_agreement, methods=["GET"]),
            Route("/tasks", add_tasks, methods=["POST"]),
            Route("/tasks/next", next_task, methods=["POST"]),
            Route("/tasks/typed", typed_task, methods=["POST"]),
            Route("/tasks/skip", skip_task, methods=["POST"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),  # public, no key needed
        ]
    )


def task_json(task: LabelingTask | None) -> dict[str, Any] | None:
    if task is None:
        return None
    claim = task.claim
    return {
        "task_id": claim.task.id,
        "prompt": claim.task.text,
        "kind": claim.task.kind,
        "source": claim.task.source,
        "shared": claim.task.copies > 1,
        "prompt_id": claim.prompt_id,
        "reserved_until": claim.reserved_until,
        "candidates": [{"completion_id": cid, "text": text} for cid, text in task.candidates],
        "ranked_today": task.ranked_today,
    }


def version_json(v: AdapterVersion) -> dict[str, Any]:
    return {
        "id": v.id,
        "name": v.name,
        "version": v.version,
        "state": v.state,
        "sha256": v.sha256,
        "created_at": v.created_at,
        "metrics": v.metrics,
        "base_model": v.base_model,
    }


def challenge_json(status: ChallengeStatus) -> dict[str, Any]:
    c, t, limits = status.challenge, status.tally, status.thresholds
    return {
        "challenger": c.challenger_id,
        "champion": c.champion_id,
        "outcome": c.outcome,
        "rankings": t.rankings,
        "wins": t.wins,
        "losses": t.losses,
        "ties": t.ties,
        "win_rate": t.win_rate,
        "lower": t.lower,
        "upper": t.upper,
        "share": status.share,
        "confidence": limits.confidence,
        "promote_above": limits.promote_above,
        "retire_below": limits.retire_below,
        "min_rankings": limits.min_rankings,
        "started_at": c.started_at,
        "ended_at": c.ended_at,
    }


# -- OpenAI shapes -----------------------------------------------------------------------------


# What `echo` puts before a completion: the prompt's text, and its tokens' entries (when
# logprobs were asked).
Echo = tuple[str, tuple[TokenLogprob, ...]]


async def _generate(
    service: FlywheelService, b: _OpenAI, prompts: list[PromptInput], *, chat: bool
) -> Response:
    echo = bool(getattr(b, "echo", False))
    streams: list[GenerationStream] = []
    try:
        for prompt in prompts:
            streams.append(
                service.generate_stream(
                    prompt, n=b.n, sampling=b.raw_sampling(), policy=b.model, user=b.user or "",
                    score_prompt=echo and b.wanted_logprobs() is not None,
                )
            )  # fmt: skip
    except BaseException:
        for s in streams:
            await s.aclose()
        raise
    if b.stream:  # one prompt (CompletionBody.prompts)
        # Pull the first events before answering, so overload and engine errors get a status code.
        (stream,) = streams
        batches = stream.batches()
        first: list[StreamEvent] = await anext(batches, [])
        usage = bool((b.stream_options or {}).get("include_usage"))
        echoed = (stream.prompt.text, stream.prompt_logprobs) if echo else None
        return StreamingResponse(
            _sse(stream, batches, first, chat=chat, usage=usage, echo=echoed),
            media_type="text/event-stream",
        )
    results = await asyncio.gather(*(s.finish() for s in streams))
    echoes = [(s.prompt.text, s.prompt_logprobs) if echo else None for s in streams]
    return JSONResponse(_completion_json(results, echoes, chat=chat))


def _completion_json(
    results: list[Generation], echoes: list[Echo | None], *, chat: bool
) -> dict[str, Any]:
    """One answer for the generations of a request's prompts; prompt p's completion i is
    choice p * n + i, as OpenAI numbers them."""
    choices = []
    for p, (result, echo) in enumerate(zip(results, echoes, strict=True)):
        n = len(result.completions)
        for c, entries in zip(result.completions, result.logprobs, strict=True):
            choice: dict[str, Any] = {
                "index": p * n + c.index,
                "finish_reason": c.finish_reason,
                "completion_id": c.id,
            }
            wanted = c.sampling.logprobs is not None
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
                choice["logprobs"] = chat_logprobs(entries) if wanted else None
            else:
                text, before = echo or ("", ())
                logprobs = completion_logprobs((*before, *entries)) if wanted else None
                choice |= {"text": text + c.text, "logprobs": logprobs}
            choices.append(choice)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    generated = sum(c.completion_tokens for r in results for c in r.completions)
    return {
        "id": results[0].prompt_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": results[0].completions[0].policy,
        "prompt_id": results[0].prompt_id,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        },
    }


_MARK = "\u0000flywheel-delta\u0000"
_MARK_JSON = json.dumps(_MARK).encode()


def _with_delta(e: StreamEvent, delta: str) -> StreamEvent:
    return dataclasses.replace(e, delta=delta)


async def _sse(
    stream: GenerationStream,
    batches: AsyncIterator[list[StreamEvent]],
    first: list[StreamEvent],
    *,
    chat: bool,
    usage: bool = False,
    echo: Echo | None = None,
) -> AsyncIterator[bytes]:
    started: set[int] = set()
    offsets: dict[int, int] = {}  # characters streamed per completion, for text_offset
    created = int(time.time())

    def chunk(e: StreamEvent) -> bytes:
        choice: dict[str, Any] = {
            "index": e.index,
            "finish_reason": e.finish_reason,
            "completion_id": e.completion_id,
        }
        if chat:
            delta: dict[str, Any] = {"content": e.delta}
            if e.index not in started:
                delta["role"] = "assistant"
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(e.logprobs) if e.logprobs else None
        else:
            offset = offsets.get(e.index, 0)
            logprobs = completion_logprobs(e.logprobs, offset) if e.logprobs else None
            choice |= {"text": e.delta, "logprobs": logprobs}
            offsets[e.index] = offset + sum(len(x.token) for x in e.logprobs)
        started.add(e.index)
        doc = {
            "id": e.prompt_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": e.policy,
            "prompt_id": e.prompt_id,
            "choices": [choice],
        }
        return f"data: {json.dumps(doc)}\n\n".encode()

    # Mid-stream chunks differ only in their text: build each completion's envelope once and
    # splice the escaped delta in (the per-token cost at high concurrency).
    envelopes: dict[int, tuple[bytes, bytes]] = {}

    def fast_chunk(e: StreamEvent) -> bytes:
        if e.finish_reason is not None or e.index not in started or e.logprobs:
            return chunk(e)
        if e.index not in envelopes:
            head, _, tail = chunk(_with_delta(e, _MARK)).partition(_MARK_JSON)
            envelopes[e.index] = head, tail
        head, tail = envelopes[e.index]
        return head + json.dumps(e.delta).encode() + tail

    try:
        if echo is not None:  # each completion starts with the prompt
            text, entries = echo
            yield b"".join(
                chunk(StreamEvent(stream.prompt.id, r.id, r.index, text, None, r.policy, entries))
                for r in stream.rows
            )
        # One write per batch of ready events: under load a write carries several tokens.
        if first:
            yield b"".join(fast_chunk(e) for e in first)
        async for batch in batches:
            yield b"".join(fast_chunk(e) for e in batch)
        if usage:  # OpenAI's stream_options.include_usage: a last chunk with no choices
            totals = _completion_json([stream.result], [None], chat=chat)
            doc = {
                "id": totals["id"],
                "object": totals["object"],
                "created": created,
                "model": totals["model"],
                "choices": [],
                "usage": totals["usage"],
            }
            yield f"data: {json.dumps(doc)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    except errors.FlywheelError as e:
        # Headers are gone; report in-band as OpenAI does, then end the stream.
        yield b"data: " + bytes(from_error(e).body) + b"\n\n"
