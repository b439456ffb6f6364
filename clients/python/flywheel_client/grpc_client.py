"""gRPC clients for the flywheel.v1 services: `FlywheelClient` (sync) and `AsyncFlywheelClient`.

Both are thin: arguments become requests (`_grpc_wire`), responses become
`flywheel_client.types` values, and every `grpc.RpcError` becomes a typed `FlywheelError`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import grpc.aio

from flywheel_client import _grpc_wire as wire
from flywheel_client import types as t
from flywheel_client.adapter_archive import pack_adapter, upload_chunks
from flywheel_client.errors import from_grpc_error
from flywheel_client.ranking import RankingArg, as_tiers
from flywheel_proto.v1 import flywheel_pb2 as pb
from flywheel_proto.v1 import flywheel_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
Metadata = tuple[tuple[str, str], ...]
ChannelOptions = Sequence[tuple[str, Any]]


def _metadata(api_key: str | None) -> Metadata:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _key(idempotency_key: str | None) -> str:
    # A fresh key per call: a caller that retries must pass the same key explicitly.
    return idempotency_key or str(uuid.uuid4())


def tls_credentials(
    ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: `ca` is the PEM bundle that signed its certificate (None: the
    system's roots); `cert` and `key` a client certificate, for a server that requires one
    (mutual TLS, `flywheel serve --tls-client-ca`)."""
    if (cert is None) != (key is None):
        raise ValueError("give a client certificate and its key together, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


class FlywheelClient:
    """Blocking client. Use as a context manager, or call `close()`.

    `timeout` is in seconds per call (for streams, for the whole stream); None waits forever.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        self.target = target
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._feedback = pb_grpc.FeedbackStub(self._channel)
        self._learner = pb_grpc.LearnerStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from e

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        call = method(request, timeout=self._timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_grpc_error(e) from e
        finally:
            call.cancel()  # a consumer that stops early frees the server's work

    # -- Inference ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Generation:
        """`n` completions of a text prompt or a chat. `policy`: "" = live, or "policy-vN"."""
        request = wire.generate_request(prompt, messages, n, policy, sampling)
        return wire.generation(self._call(self._inference.Generate, request))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> Iterator[t.Chunk]:
        """Deltas as they are decoded; those of the n completions interleave."""
        request = wire.generate_request(prompt, messages, n, policy, sampling)
        return map(wire.chunk, self._stream(self._inference.GenerateStream, request))

    def compare(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        k: int = 4,
        policies: Sequence[str] = (),
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Comparison:
        """K candidates to rank; with `policies`, candidate i comes from policies[i % len]."""
        request = wire.compare_request(prompt, messages, k, policies, sampling)
        return wire.comparison(self._call(self._inference.Compare, request))

    def score(self, prompt: str, completions: Sequence[str], reward_model: str = "") -> t.Scores:
        request = pb.ScoreRequest(prompt=prompt, completions=completions, reward_model=reward_model)
        return wire.scores(self._call(self._inference.Score, request))

    def versions(self, name: str = "") -> t.Versions:
        """Adapter versions of "policy", "reward", or both ("")."""
        return wire.versions(
            self._call(self._inference.ListVersions, pb.ListVersionsRequest(name=name))
        )

    # -- Feedback ----------------------------------------------------------------------------

    def rank(
        self, ranking: RankingArg, *, labeler: str, idempotency_key: str | None = None
    ) -> t.RankingReceipt:
        """Completion ids best first; a nested sequence is a tier of tied ids."""
        request = wire.ranking_request(as_tiers(ranking), labeler, _key(idempotency_key))
        return wire.ranking_receipt(self._call(self._feedback.SubmitRanking, request))

    def demonstrate(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        response: str,
        labeler: str,
        idempotency_key: str | None = None,
    ) -> t.DemonstrationReceipt:
        """An ideal response to a prompt, for supervised fine-tuning."""
        request = pb.DemonstrationRequest(
            prompt=wire.prompt(prompt, messages),
            response=response,
            labeler=labeler,
            idempotency_key=_key(idempotency_key),
        )
        return wire.demonstration_receipt(self._call(self._feedback.SubmitDemonstration, request))

    # -- Learner (admin scope) ---------------------------------------------------------------

    def iter_rankings(self, after: int = 0, limit: int = 0) -> Iterator[t.RankingRecord]:
        """Rankings with cursor > `after`, oldest first; resume from the last record's cursor."""
        request = pb.ExportRequest(after=after, limit=limit)
        return map(wire.ranking_record, self._stream(self._learner.ExportRankings, request))

    def iter_prompts(self, after: int = 0, limit: int = 0) -> Iterator[t.PromptRecord]:
        request = pb.ExportRequest(after=after, limit=limit)
        return map(wire.prompt_record, self._stream(self._learner.ExportPrompts, request))

    def iter_demonstrations(
        self, after: int = 0, limit: int = 0
    ) -> Iterator[t.DemonstrationRecord]:
        request = pb.ExportRequest(after=after, limit=limit)
        return map(
            wire.demonstration_record, self._stream(self._learner.ExportDemonstrations, request)
        )

    def export_rankings(self, after: int = 0, limit: int = 0) -> list[t.RankingRecord]:
        return list(self.iter_rankings(after, limit))

    def audit(self, after: int = 0, limit: int = 0) -> list[t.AuditRecord]:
        """The audit trail after cursor `after` (admin scope): who published, promoted, rolled
        back or challenged what, and requests refused for their key."""
        request = pb.ExportRequest(after=after, limit=limit)
        return list(map(wire.audit_record, self._stream(self._learner.ExportAudit, request)))

    def export_prompts(self, after: int = 0, limit: int = 0) -> list[t.PromptRecord]:
        return list(self.iter_prompts(after, limit))

    def export_demonstrations(self, after: int = 0, limit: int = 0) -> list[t.DemonstrationRecord]:
        return list(self.iter_demonstrations(after, limit))

    def publish_adapter(
        self,
        directory: str | Path,
        *,
        name: str,
        base_model: str,
        metrics: Mapping[str, float] | None = None,
        promote: bool = False,
        challenger: bool = False,
        chunk_size: int = 1 << 20,
    ) -> t.AdapterVersion:
        """Upload a PEFT adapter directory as a checksummed tar; the server verifies it.

        `promote` makes it live once loaded; `challenger` (a policy only, not with `promote`)
        makes it the challenger of the live policy instead, promoted or retired by the
        labelers' rankings of blind comparisons (see `versions().challenge`).
        """
        chunks = upload_chunks(
            pack_adapter(directory),
            name=name,
            base_model=base_model,
            metrics=metrics,
            promote=promote,
            challenger=challenger,
            chunk_size=chunk_size,
        )
        return wire.adapter_version(self._call(self._learner.PublishAdapter, chunks))

    def promote(self, name: str, version: int) -> t.AdapterVersion:
        request = pb.PromoteRequest(name=name, version=version)
        return wire.adapter_version(self._call(self._learner.Promote, request))

    def rollback(self, name: str) -> t.AdapterVersion:
        """Back to the version that was live before the current one."""
        request = pb.RollbackRequest(name=name)
        return wire.adapter_version(self._call(self._learner.Rollback, request))

    def challenge(self, version: int) -> t.ChallengeTally:
        """Make a loaded ready policy version the challenger of the live policy."""
        request = pb.ChallengeRequest(version=version)
        return wire.challenge_tally(self._call(self._learner.Challenge, request))

    def stop_challenge(self) -> t.ChallengeTally:
        """End the running challenge undecided (the challenger stays ready)."""
        request = pb.ChallengeRequest(stop=True)
        return wire.challenge_tally(self._call(self._learner.Challenge, request))

    def server_info(self) -> t.ServerInfo:
        return wire.server_info(self._call(self._learner.GetServerInfo, pb.ServerInfoRequest()))

    def add_prompts(self, prompts: Sequence[str]) -> t.PromptsAdded:
        """Queue prompts (user messages) for labelers; at most 1000 a call."""
        request = pb.AddPromptsRequest(prompts=list(prompts))
        response = self._call(self._learner.AddPrompts, request)
        return t.PromptsAdded(response.added, response.duplicates)


class AsyncFlywheelClient:
    """The same calls on grpc.aio; create it inside a running event loop.

    Use `async with`, or `await close()`. Streams are async iterators.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions = (),
    ) -> None:
        self.target = target
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._feedback = pb_grpc.FeedbackStub(self._channel)
        self._learner = pb_grpc.LearnerStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from e

    async def _stream(self, method: Callable[..., Any], request: Any) -> AsyncIterator[Any]:
        call = method(request, timeout=self._timeout, metadata=self._metadata)
        try:
            async for item in call:
                yield item
        except grpc.RpcError as e:
            raise from_grpc_error(e) from e
        finally:
            call.cancel()

    # -- Inference ---------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Generation:
        request = wire.generate_request(prompt, messages, n, policy, sampling)
        return wire.generation(await self._call(self._inference.Generate, request))

    async def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        n: int = 1,
        policy: str = "",
        **sampling: Unpack[t.SamplingOptions],
    ) -> AsyncIterator[t.Chunk]:
        request = wire.generate_request(prompt, messages, n, policy, sampling)
        async for item in self._stream(self._inference.GenerateStream, request):
            yield wire.chunk(item)

    async def compare(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        k: int = 4,
        policies: Sequence[str] = (),
        **sampling: Unpack[t.SamplingOptions],
    ) -> t.Comparison:
        request = wire.compare_request(prompt, messages, k, policies, sampling)
        return wire.comparison(await self._call(self._inference.Compare, request))

    async def score(
        self, prompt: str, completions: Sequence[str], reward_model: str = ""
    ) -> t.Scores:
        request = pb.ScoreRequest(prompt=prompt, completions=completions, reward_model=reward_model)
        return wire.scores(await self._call(self._inference.Score, request))

    async def versions(self, name: str = "") -> t.Versions:
        request = pb.ListVersionsRequest(name=name)
        return wire.versions(await self._call(self._inference.ListVersions, request))

    # -- Feedback ----------------------------------------------------------------------------

    async def rank(
        self, ranking: RankingArg, *, labeler: str, idempotency_key: str | None = None
    ) -> t.RankingReceipt:
        request = wire.ranking_request(as_tiers(ranking), labeler, _key(idempotency_key))
        return wire.ranking_receipt(await self._call(self._feedback.SubmitRanking, request))

    async def demonstrate(
        self,
        prompt: str | None = None,
        *,
        messages: wire.Messages | None = None,
        response: str,
        labeler: str,
        idempotency_key: str | None = None,
    ) -> t.DemonstrationReceipt:
        request = pb.DemonstrationRequest(
            prompt=wire.prompt(prompt, messages),
            response=response,
            labeler=labeler,
            idempotency_key=_key(idempotency_key),
        )
        return wire.demonstration_receipt(
            await self._call(self._feedback.SubmitDemonstration, request)
        )

    # -- Learner (admin scope) ---------------------------------------------------------------

    async def iter_rankings(self, after: int = 0, limit: int = 0) -> AsyncIterator[t.RankingRecord]:
        request = pb.ExportRequest(after=after, limit=limit)
        async for item in self._stream(self._learner.ExportRankings, request):
            yield wire.ranking_record(item)

    async def iter_prompts(self, after: int = 0, limit: int = 0) -> AsyncIterator[t.PromptRecord]:
        request = pb.ExportRequest(after=after, limit=limit)
        async for item in self._stream(self._learner.ExportPrompts, request):
            yield wire.prompt_record(item)

    async def iter_demonstrations(
        self, after: int = 0, limit: int = 0
    ) -> AsyncIterator[t.DemonstrationRecord]:
        request = pb.ExportRequest(after=after, limit=limit)
        async for item in self._stream(self._learner.ExportDemonstrations, request):
            yield wire.demonstration_record(item)

    async def export_rankings(self, after: int = 0, limit: int = 0) -> list[t.RankingRecord]:
        return [r async for r in self.iter_rankings(after, limit)]

    async def audit(self, after: int = 0, limit: int = 0) -> list[t.AuditRecord]:
        """See `FlywheelClient.audit`."""
        request = pb.ExportRequest(after=after, limit=limit)
        return [
            wire.audit_record(r) async for r in self._stream(self._learner.ExportAudit, request)
        ]

    async def export_prompts(self, after: int = 0, limit: int = 0) -> list[t.PromptRecord]:
        return [r async for r in self.iter_prompts(after, limit)]

    async def export_demonstrations(
        self, after: int = 0, limit: int = 0
    ) -> list[t.DemonstrationRecord]:
        return [r async for r in self.iter_demonstrations(after, limit)]

    async def publish_adapter(
        self,
        directory: str | Path,
        *,
        name: str,
        base_model: str,
        metrics: Mapping[str, float] | None = None,
        promote: bool = False,
        challenger: bool = False,
        chunk_size: int = 1 << 20,
    ) -> t.AdapterVersion:
        chunks = upload_chunks(
            pack_adapter(directory),
            name=name,
            base_model=base_model,
            metrics=metrics,
            promote=promote,
            challenger=challenger,
            chunk_size=chunk_size,
        )
        return wire.adapter_version(await self._call(self._learner.PublishAdapter, chunks))

    async def promote(self, name: str, version: int) -> t.AdapterVersion:
        request = pb.PromoteRequest(name=name, version=version)
        return wire.adapter_version(await self._call(self._learner.Promote, request))

    async def rollback(self, name: str) -> t.AdapterVersion:
        request = pb.RollbackRequest(name=name)
        return wire.adapter_version(await self._call(self._learner.Rollback, request))

    async def challenge(self, version: int) -> t.ChallengeTally:
        request = pb.ChallengeRequest(version=version)
        return wire.challenge_tally(await self._call(self._learner.Challenge, request))

    async def stop_challenge(self) -> t.ChallengeTally:
        request = pb.ChallengeRequest(stop=True)
        return wire.challenge_tally(await self._call(self._learner.Challenge, request))

    async def server_info(self) -> t.ServerInfo:
        request = pb.ServerInfoRequest()
        return wire.server_info(await self._call(self._learner.GetServerInfo, request))

    async def add_prompts(self, prompts: Sequence[str]) -> t.PromptsAdded:
        request = pb.AddPromptsRequest(prompts=list(prompts))
        response = await self._call(self._learner.AddPrompts, request)
        return t.PromptsAdded(response.added, response.duplicates)
