"""The gRPC transport: wire <-> service calls, with one error boundary and auth per method.

Handlers are built from the service descriptors with a deserializer that never raises, so a
malformed message becomes INVALID_ARGUMENT naming the message type (grpc's own handling would
report INTERNAL).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message as pb_message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flywheel_proto.v1 import flywheel_pb2 as pb
from flywheel_server import domain, errors, metrics
from flywheel_server.auth import Authenticator
from flywheel_server.engine_api import TokenLogprob
from flywheel_server.generation import PromptInput
from flywheel_server.lifecycle import PublishHeader
from flywheel_server.service import FlywheelService
from flywheel_server.validation import RawSampling

log = logging.getLogger(__name__)

STATUS: list[tuple[type[errors.FlywheelError], grpc.StatusCode]] = [
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StalledClient, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]
SCOPES = {"Inference": "generate", "Feedback": "feedback", "Learner": "admin"}
SERVICE_NAMES = [pb.DESCRIPTOR.services_by_name[s].full_name for s in SCOPES]
MAX_MESSAGE_BYTES = 8 << 20


def status_of(e: errors.FlywheelError) -> grpc.StatusCode:
    return next(code for cls, code in STATUS if isinstance(e, cls))


@dataclass(frozen=True)
class Malformed:
    type_name: str
    error: str


def _parser(cls: type[pb_message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as e:  # DecodeError and friends
            return Malformed(cls.DESCRIPTOR.full_name, str(e) or type(e).__name__)

    return parse


def _check(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise errors.InvalidRequest(f"request is not a valid {request.type_name}: {request.error}")
    return request


async def _abort(context: grpc.aio.ServicerContext, e: errors.FlywheelError) -> None:
    metrics.rejected(e)
    # The offending field travels as trailing metadata, so clients can point at it; so does
    # how long an overloaded or rate-limited caller should wait, in seconds.
    trailing = [("field", e.field)] if e.field else []
    if isinstance(e, errors.Overloaded):
        trailing.append(("retry-after", f"{e.retry_after:.3f}"))
    await context.abort(status_of(e), e.message, trailing_metadata=tuple(trailing))


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


async def _write(context: grpc.aio.ServicerContext, item: Any, timeout_s: float) -> None:
    """Send one message of a server stream, or fail if the client has not made room for it
    (read anything) within timeout_s: a stalled client would hold the stream forever."""
    try:
        await asyncio.wait_for(context.write(item), timeout_s)
    except TimeoutError:
        metrics.STALLED_STREAMS.labels("grpc").inc()
        raise errors.StalledClient(
            f"the client read nothing for {timeout_s:g} s; the stream was cut off"
        ) from None


def _guard(
    fn: Callable[..., Any],
    auth: Authenticator,
    scope: str,
    request_stream: bool,
    write_timeout_s: float,
) -> Callable[..., Any]:
    """Auth, malformed-input check and error mapping around one handler (unary or streaming).
    A streaming handler's messages are written with a write timeout (`_write`)."""

    @contextlib.asynccontextmanager
    async def boundary(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        clock = metrics.start_request("grpc", fn.__name__)
        try:
            yield
        except errors.FlywheelError as e:
            clock.finish(status_of(e).name)
            await _abort(context, e)
        except (asyncio.CancelledError, GeneratorExit):
            clock.finish(grpc.StatusCode.CANCELLED.name)
            raise
        except BaseException:
            clock.finish(grpc.StatusCode.UNKNOWN.name)  # what grpc answers for an uncaught error
            raise
        else:
            clock.finish(grpc.StatusCode.OK.name)

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            async with boundary(context):
                auth.check(_authorization(context), scope)
                # closed at once when a write fails or the call is cancelled: that ends the
                # generation behind it
                async with contextlib.aclosing(fn(_check(request), context)) as items:
                    async for item in items:
                        await _write(context, item, write_timeout_s)

        return stream

    @functools.wraps(fn)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with boundary(context):
            caller = auth.check(_authorization(context), scope)
            if request_stream:
                return await fn(request, context)
            request = _check(request)
            if "labeler" in request.DESCRIPTOR.fields_by_name:  # feedback: whose it is
                request.labeler = auth.labeler(caller, request.labeler)
            return await fn(request, context)

    return unary


def handlers(
    servicer: Any, auth: Authenticator, write_timeout_s: float
) -> list[grpc.GenericRpcHandler]:
    out = []
    for short, scope in SCOPES.items():
        service = pb.DESCRIPTOR.services_by_name[short]
        methods = {}
        for m in service.methods:
            fn = _guard(getattr(servicer, m.name), auth, scope, m.client_streaming, write_timeout_s)
            parse = _parser(getattr(pb, m.input_type.name))
            serialize = getattr(pb, m.output_type.name).SerializeToString
            if m.client_streaming:
                make = grpc.stream_unary_rpc_method_handler
            elif m.server_streaming:
                make = grpc.unary_stream_rpc_method_handler
            else:
                make = grpc.unary_unary_rpc_method_handler
            methods[m.name] = make(fn, request_deserializer=parse, response_serializer=serialize)
        out.append(grpc.method_handlers_generic_handler(service.full_name, methods))
    return out


# -- wire <-> domain ---------------------------------------------------------------------------


def prompt_input(p: pb.Prompt) -> PromptInput:
    kind = p.WhichOneof("kind")
    if kind == "text":
        return PromptInput(text=p.text)
    if kind == "chat":
        return PromptInput(
            messages=[{"role": m.role, "content": m.content} for m in p.chat.messages]
        )
    raise errors.InvalidRequest("prompt must hold text or chat messages", field="prompt")


def raw_sampling(s: pb.SamplingParams) -> RawSampling:
    opt = lambda name: getattr(s, name) if s.HasField(name) else None  # noqa: E731
    return RawSampling(
        opt("temperature"),
        opt("top_p"),
        opt("top_k"),
        opt("max_tokens"),
        list(s.stop),
        opt("seed"),
        opt("min_tokens"),
        opt("ignore_eos"),
        opt("presence_penalty"),
        opt("frequency_penalty"),
        {str(token): bias for token, bias in s.logit_bias.items()},
        opt("logprobs"),
    )


def logprobs_pb(entries: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=e.token, logprob=e.logprob, token_id=max(e.token_id, 0),
            top=[pb.TopLogprob(token=t, logprob=lp) for t, lp in e.top],
        )
        for e in entries
    ]  # fmt: skip


def completion_pb(
    c: domain.CompletionRecord, logprobs: Sequence[TokenLogprob] = ()
) -> pb.Completion:
    return pb.Completion(
        id=c.id,
        index=c.index,
        text=c.text,
        finish_reason=c.finish_reason,
        policy=c.policy,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        logprobs=logprobs_pb(logprobs),
    )


def version_pb(v: domain.AdapterVersion) -> pb.AdapterVersion:
    return pb.AdapterVersion(
        name=v.name,
        version=v.version,
        id=v.id,
        state=v.state,
        sha256=v.sha256,
        created_at=v.created_at,
        metrics=v.metrics,
        base_model=v.base_model,
    )


def challenge_pb(status: domain.ChallengeStatus) -> pb.ChallengeTally:
    c, t, limits = status.challenge, status.tally, status.thresholds
    return pb.ChallengeTally(
        challenger=c.challenger_id,
        champion=c.champion_id,
        outcome=c.outcome,
        rankings=t.rankings,
        wins=t.wins,
        losses=t.losses,
        ties=t.ties,
        win_rate=t.win_rate,
        lower=t.lower,
        upper=t.upper,
        share=status.share,
        confidence=limits.confidence,
        promote_above=limits.promote_above,
        retire_below=limits.retire_below,
        min_rankings=limits.min_rankings,
        started_at=c.started_at,
        ended_at=c.ended_at or 0.0,
    )


class Servicer:
    """Every flywheel.v1 method, each a few lines of conversion around one service call."""

    def __init__(self, service: FlywheelService) -> None:
        self.service = service

    # Inference
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        result = await self.service.generate(
            prompt_input(request.prompt),
            n=request.n or 1,
            sampling=raw_sampling(request.sampling),
            policy=request.policy,
            user=request.user,
            score_prompt=request.echo,
        )
        return pb.GenerateResponse(
            prompt_id=result.prompt_id,
            completions=[
                completion_pb(c, lp)
                for c, lp in zip(result.completions, result.logprobs, strict=True)
            ],
            prompt_logprobs=logprobs_pb(result.prompt_logprobs),
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateChunk]:
        stream = self.service.generate_stream(
            prompt_input(request.prompt),
            n=request.n or 1,
            sampling=raw_sampling(request.sampling),
            policy=request.policy,
            user=request.user,
            score_prompt=request.echo,
        )
        first = True
        async for e in stream:
            yield pb.GenerateChunk(
                prompt_id=e.prompt_id,
                completion_id=e.completion_id,
                index=e.index,
                delta=e.delta,
                finish_reason=e.finish_reason or "",
                policy=e.policy,
                logprobs=logprobs_pb(e.logprobs),
                prompt_logprobs=logprobs_pb(stream.prompt_logprobs if first else ()),
            )
            first = False

    async def Compare(self, request: pb.CompareRequest, context: Any) -> pb.CompareResponse:
        if request.sampling.HasField("logprobs"):
            raise errors.InvalidRequest(
                "Compare returns no logprobs; leave them out", field="logprobs"
            )
        result = await self.service.compare(
            prompt_input(request.prompt),
            k=request.k,
            sampling=raw_sampling(request.sampling),
            policies=list(request.policies),
        )
        return pb.CompareResponse(
            prompt_id=result.prompt_id, candidates=[completion_pb(c) for c in result.completions]
        )

    async def Score(self, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        scores, model = await self.service.score(
            request.prompt, list(request.completions), request.reward_model
        )
        return pb.ScoreResponse(scores=scores, reward_model=model)

    async def ListVersions(
        self, request: pb.ListVersionsRequest, context: Any
    ) -> pb.ListVersionsResponse:
        versions, live = self.service.versions(request.name)
        status = await self.service.adapters.challenge_status(request.name)
        return pb.ListVersionsResponse(
            versions=[version_pb(v) for v in versions],
            live=live,
            challenge=None if status is None else challenge_pb(status),
        )

    # Feedback
    async def SubmitRanking(self, request: pb.RankingRequest, context: Any) -> pb.RankingResponse:
        r = await self.service.rank(
            [list(t.completion_ids) for t in request.ranking],
            labeler=request.labeler,
            idempotency_key=request.idempotency_key,
        )
        return pb.RankingResponse(
            ranking_id=r.ranking_id, prompt_id=r.prompt_id, pairs=r.pairs, duplicate=r.duplicate
        )

    async def SubmitDemonstration(
        self, request: pb.DemonstrationRequest, context: Any
    ) -> pb.DemonstrationResponse:
        r = await self.service.demonstrate(
            prompt_input(request.prompt),
            request.response,
            labeler=request.labeler,
            idempotency_key=request.idempotency_key,
        )
        return pb.DemonstrationResponse(demonstration_id=r.demonstration_id, duplicate=r.duplicate)

    # Learner
    async def ExportRankings(
        self, request: pb.ExportRequest, context: Any
    ) -> AsyncIterator[pb.RankingRecord]:
        for r in await self.service.export_rankings(request.after, request.limit):
            yield pb.RankingRecord(
                cursor=r.cursor,
                ranking_id=r.ranking_id,
                prompt_id=r.prompt_id,
                prompt=r.prompt,
                labeler=r.labeler,
                created_at=r.created_at,
                user=r.user,
                chat=None
                if r.messages is None
                else pb.Chat(
                    messages=[
                        pb.ChatMessage(role=m["role"], content=m["content"]) for m in r.messages
                    ]
                ),
                completions=[
                    pb.RankedCompletion(
                        completion_id=c.completion_id, text=c.text, policy=c.policy, tier=c.tier
                    )
                    for c in r.completions
                ],
            )

    async def ExportPrompts(
        self, request: pb.ExportRequest, context: Any
    ) -> AsyncIterator[pb.PromptRecord]:
        for p in await self.service.export_prompts(request.after, request.limit):
            yield pb.PromptRecord(
                cursor=p.cursor,
                prompt_id=p.prompt_id,
                prompt=p.prompt,
                created_at=p.created_at,
                user=p.user,
            )

    async def ExportDemonstrations(
        self, request: pb.ExportRequest, context: Any
    ) -> AsyncIterator[pb.DemonstrationRecord]:
        for d in await self.service.export_demonstrations(request.after, request.limit):
            yield pb.DemonstrationRecord(
                cursor=d.cursor,
                demonstration_id=d.demonstration_id,
                prompt=d.prompt,
                response=d.response,
                labeler=d.labeler,
                created_at=d.created_at,
            )

    async def ExportAudit(
        self, request: pb.ExportRequest, context: Any
    ) -> AsyncIterator[pb.AuditRecord]:
        for e in await self.service.export_audit(request.after, request.limit):
            yield pb.AuditRecord(
                cursor=e.cursor,
                at=e.at,
                actor=e.actor,
                action=e.action,
                target=e.target,
                detail=e.detail,
            )

    async def PublishAdapter(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> pb.AdapterVersion:
        first = _check(
            await anext(request_iterator, None)
            or Malformed("flywheel.v1.AdapterChunk", "empty upload")
        )
        if first.WhichOneof("part") != "header":
            raise errors.InvalidRequest(
                "the first AdapterChunk must carry the header", field="header"
            )
        h = first.header
        header = PublishHeader(
            h.name, h.base_model, h.sha256, h.size, dict(h.metrics), h.promote, h.challenger
        )

        async def data() -> AsyncIterator[bytes]:
            async for chunk in request_iterator:
                chunk = _check(chunk)
                if chunk.WhichOneof("part") != "data":
                    raise errors.InvalidRequest(
                        "only the first AdapterChunk may carry a header", field="header"
                    )
                yield chunk.data

        return version_pb(await self.service.adapters.publish(header, data()))

    async def Promote(self, request: pb.PromoteRequest, context: Any) -> pb.AdapterVersion:
        return version_pb(await self.service.adapters.promote(request.name, request.version))

    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.AdapterVersion:
        return version_pb(await self.service.adapters.rollback(request.name))

    async def Challenge(self, request: pb.ChallengeRequest, context: Any) -> pb.ChallengeTally:
        status = await self.service.adapters.challenge(request.version or None, stop=request.stop)
        return challenge_pb(status)

    async def AddPrompts(
        self, request: pb.AddPromptsRequest, context: Any
    ) -> pb.AddPromptsResponse:
        added = await self.service.labeling.add(list(request.prompts), "file")
        return pb.AddPromptsResponse(added=added, duplicates=len(request.prompts) - added)

    async def GetServerInfo(self, request: pb.ServerInfoRequest, context: Any) -> pb.ServerInfo:
        s = self.service
        return pb.ServerInfo(
            base_model=s.engine.base_model,
            model_path=str(s.engine.model_dir),
            max_tokens_limit=s.max_tokens_limit,
            live=s.registry.live(),
        )


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with `cert`/`key`; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


async def start_grpc(
    service: FlywheelService,
    auth: Authenticator,
    host: str,
    port: int,
    tls: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    server.add_generic_rpc_handlers(
        handlers(Servicer(service), auth, service.config.write_timeout_s)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{host}:{port}"
    bound = (
        server.add_secure_port(address, tls)
        if tls is not None
        else server.add_insecure_port(address)
    )
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer
