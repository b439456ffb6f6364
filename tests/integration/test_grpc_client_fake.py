"""The gRPC clients and the CLI against an in-process server with fake servicers.

The fakes record what arrived (requests and metadata) and answer canned responses, so these
tests check the client's side of the contract only; the real server has its own tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flywheel_cli import main as cli
from flywheel_client import (
    AsyncFlywheelClient,
    Conflict,
    FlywheelClient,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)
from flywheel_proto.v1 import flywheel_pb2 as pb
from flywheel_proto.v1 import flywheel_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

API_KEY = "test-key"


@dataclass
class Recorder:
    requests: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    uploads: list[tuple[pb.AdapterHeader, bytes]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    def note(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        self.requests[method].append(request)
        self.metadata[method] = dict(context.invocation_metadata())

    def last(self, method: str) -> Any:
        return self.requests[method][-1]


def _abort_on_prompt(text: str, context: grpc.ServicerContext) -> None:
    if text == "invalid":
        context.set_trailing_metadata((("field", "sampling.max_tokens"),))
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be between 1 and 512, got 0"
        )
    if text == "busy":
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (64 waiting); retry later"
        )


def _completion(i: int, policy: str) -> pb.Completion:
    return pb.Completion(
        id=f"c-{i}",
        index=i,
        text=f"text {i}",
        finish_reason="stop",
        policy=policy,
        prompt_tokens=3,
        completion_tokens=2,
    )


class FakeInference(pb_grpc.InferenceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.GenerateResponse:
        self.rec.note("Generate", request, context)
        _abort_on_prompt(request.prompt.text, context)
        policy = request.policy or "policy-v0"
        return pb.GenerateResponse(
            prompt_id="p-1", completions=[_completion(i, policy) for i in range(request.n or 1)]
        )

    def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateChunk]:
        self.rec.note("GenerateStream", request, context)
        _abort_on_prompt(request.prompt.text, context)
        n = request.n or 1
        for delta in ("hel", "lo", " world"):
            for i in range(n):
                yield pb.GenerateChunk(
                    prompt_id="p-1",
                    completion_id=f"c-{i}",
                    index=i,
                    delta=delta,
                    policy="policy-v0",
                )
            if request.prompt.text == "fail-midway":
                context.abort(grpc.StatusCode.NOT_FOUND, "policy-v9 was unloaded")
        for i in range(n):
            yield pb.GenerateChunk(
                prompt_id="p-1",
                completion_id=f"c-{i}",
                index=i,
                finish_reason="stop",
                policy="policy-v0",
            )

    def Compare(
        self, request: pb.CompareRequest, context: grpc.ServicerContext
    ) -> pb.CompareResponse:
        self.rec.note("Compare", request, context)
        policies = list(request.policies) or ["policy-v0"]
        k = request.k or 4
        return pb.CompareResponse(
            prompt_id="p-2",
            candidates=[_completion(i, policies[i % len(policies)]) for i in range(k)],
        )

    def Score(self, request: pb.ScoreRequest, context: grpc.ServicerContext) -> pb.ScoreResponse:
        self.rec.note("Score", request, context)
        return pb.ScoreResponse(
            scores=[len(c) / 4 for c in request.completions],
            reward_model=request.reward_model or "reward-v1",
        )

    def ListVersions(
        self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListVersionsResponse:
        self.rec.note("ListVersions", request, context)
        return pb.ListVersionsResponse(
            versions=[
                pb.AdapterVersion(
                    name="policy", version=0, id="policy-v0", state="retired", sha256="0" * 64
                ),
                pb.AdapterVersion(
                    name="policy",
                    version=1,
                    id="policy-v1",
                    state="live",
                    sha256="ab" * 32,
                    created_at=1_700_000_000.0,
                    metrics={"reward": 0.25},
                    base_model="fp",
                ),
            ],
            live={"policy": "policy-v1", "reward": "reward-v1"},
            challenge=TALLY if request.name != "reward" else None,
        )


TALLY = pb.ChallengeTally(
    challenger="policy-v2",
    champion="policy-v1",
    outcome="running",
    rankings=7,
    wins=5,
    losses=1,
    ties=1,
    win_rate=11 / 14,
    lower=0.49,
    upper=0.94,
    share=0.5,
    confidence=0.95,
    promote_above=0.5,
    retire_below=0.5,
    min_rankings=10,
    started_at=1_700_000_000.0,
)


class FakeFeedback(pb_grpc.FeedbackServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def SubmitRanking(
        self, request: pb.RankingRequest, context: grpc.ServicerContext
    ) -> pb.RankingResponse:
        self.rec.note("SubmitRanking", request, context)
        for tier in request.ranking:
            if "unknown" in tier.completion_ids:
                context.abort(
                    grpc.StatusCode.NOT_FOUND, "completion 'unknown' was not issued by this server"
                )
        sizes = [len(t.completion_ids) for t in request.ranking]
        pairs = sum(a * sum(sizes[i + 1 :]) for i, a in enumerate(sizes))
        duplicate = request.idempotency_key in self.rec.keys
        self.rec.keys.add(request.idempotency_key)
        return pb.RankingResponse(
            ranking_id="r-1", prompt_id="p-1", pairs=pairs, duplicate=duplicate
        )

    def SubmitDemonstration(
        self, request: pb.DemonstrationRequest, context: grpc.ServicerContext
    ) -> pb.DemonstrationResponse:
        self.rec.note("SubmitDemonstration", request, context)
        return pb.DemonstrationResponse(demonstration_id="d-1")


RANKINGS = [
    pb.RankingRecord(
        cursor=c,
        ranking_id=f"r-{c}",
        prompt_id="p-1",
        prompt="say hi",
        labeler="ann",
        created_at=1.5,
        completions=[
            pb.RankedCompletion(completion_id="c-0", text="hi", policy="policy-v0", tier=0),
            pb.RankedCompletion(completion_id="c-1", text="bye", policy="policy-v1", tier=1),
        ],
    )
    for c in (1, 2, 3)
]


def _page(records: list[Any], request: pb.ExportRequest) -> Iterator[Any]:
    newer = [r for r in records if r.cursor > request.after]
    return iter(newer[: request.limit] if request.limit else newer)


class FakeLearner(pb_grpc.LearnerServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def ExportRankings(
        self, request: pb.ExportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RankingRecord]:
        self.rec.note("ExportRankings", request, context)
        return _page(RANKINGS, request)

    def ExportPrompts(
        self, request: pb.ExportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.PromptRecord]:
        self.rec.note("ExportPrompts", request, context)
        return _page(
            [pb.PromptRecord(cursor=c, prompt_id=f"p-{c}", prompt="q") for c in (5, 6)], request
        )

    def ExportDemonstrations(
        self, request: pb.ExportRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DemonstrationRecord]:
        self.rec.note("ExportDemonstrations", request, context)
        return _page(
            [
                pb.DemonstrationRecord(
                    cursor=9, demonstration_id="d-9", prompt="q", response="a", labeler="ann"
                )
            ],
            request,
        )

    def PublishAdapter(
        self, request_iterator: Iterator[pb.AdapterChunk], context: grpc.ServicerContext
    ) -> pb.AdapterVersion:
        first = next(request_iterator)
        self.rec.note("PublishAdapter", first, context)
        if first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first chunk must be the header")
        header = first.header
        pieces = [chunk.data for chunk in request_iterator]
        data = b"".join(pieces)
        self.rec.uploads.append((header, data))
        self.rec.requests["PublishAdapter.pieces"].append(len(pieces))
        if len(data) != header.size or hashlib.sha256(data).hexdigest() != header.sha256:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "archive size or sha256 does not match the header"
            )
        return pb.AdapterVersion(
            name=header.name,
            version=2,
            id=f"{header.name}-v2",
            state="live" if header.promote else "ready",
            sha256=header.sha256,
            metrics=header.metrics,
            base_model=header.base_model,
        )

    def Promote(
        self, request: pb.PromoteRequest, context: grpc.ServicerContext
    ) -> pb.AdapterVersion:
        self.rec.note("Promote", request, context)
        if request.version == 99:
            context.abort(grpc.StatusCode.NOT_FOUND, "policy-v99 does not exist")
        return pb.AdapterVersion(
            name=request.name,
            version=request.version,
            id=f"{request.name}-v{request.version}",
            state="live",
        )

    def Rollback(
        self, request: pb.RollbackRequest, context: grpc.ServicerContext
    ) -> pb.AdapterVersion:
        self.rec.note("Rollback", request, context)
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, f"{request.name} has no earlier live version"
        )

    def Challenge(
        self, request: pb.ChallengeRequest, context: grpc.ServicerContext
    ) -> pb.ChallengeTally:
        self.rec.note("Challenge", request, context)
        if request.stop:
            return pb.ChallengeTally(challenger="policy-v2", outcome="stopped", ended_at=2.0)
        return pb.ChallengeTally(challenger=f"policy-v{request.version}", outcome="running")

    def GetServerInfo(
        self, request: pb.ServerInfoRequest, context: grpc.ServicerContext
    ) -> pb.ServerInfo:
        self.rec.note("GetServerInfo", request, context)
        return pb.ServerInfo(
            base_model="fp", model_path="/m", max_tokens_limit=512, live={"policy": "policy-v1"}
        )


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_InferenceServicer_to_server(FakeInference(rec), server)
    pb_grpc.add_FeedbackServicer_to_server(FakeFeedback(rec), server)
    pb_grpc.add_LearnerServicer_to_server(FakeLearner(rec), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", rec
    server.stop(grace=None)


@pytest.fixture
def client(fake_server: tuple[str, Recorder]) -> Iterator[FlywheelClient]:
    with FlywheelClient(fake_server[0], api_key=API_KEY, timeout=10) as c:
        yield c


@pytest.fixture
def rec(fake_server: tuple[str, Recorder]) -> Recorder:
    return fake_server[1]


def _adapter_dir(root: Path) -> Path:
    directory = root / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (directory / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 200)  # 51 KiB
    return directory


# -- sync client ---------------------------------------------------------------------------------


def test_generate_sends_sampling_policy_and_api_key(client: FlywheelClient, rec: Recorder) -> None:
    generation = client.generate(
        "say hi",
        n=2,
        temperature=0.0,
        top_p=0.9,
        top_k=5,
        max_tokens=7,
        stop=["\n", "."],
        seed=3,
        policy="policy-v1",
    )
    request = rec.last("Generate")
    assert request.prompt.text == "say hi"
    assert (request.n, request.policy) == (2, "policy-v1")
    s = request.sampling
    assert (s.temperature, s.top_k, s.max_tokens, list(s.stop), s.seed) == (
        0.0,
        5,
        7,
        ["\n", "."],
        3,
    )
    assert s.top_p == pytest.approx(0.9)
    assert s.HasField("temperature")  # 0.0 is sent, not left to the default
    assert rec.metadata["Generate"]["authorization"] == f"Bearer {API_KEY}"

    assert generation.prompt_id == "p-1"
    assert [c.id for c in generation.completions] == ["c-0", "c-1"]
    first = generation.completions[0]
    assert (
        first.text,
        first.finish_reason,
        first.policy,
        first.prompt_tokens,
        first.completion_tokens,
    ) == (
        "text 0",
        "stop",
        "policy-v1",
        3,
        2,
    )


def test_unset_sampling_is_left_to_the_server(client: FlywheelClient, rec: Recorder) -> None:
    client.generate("say hi")
    s = rec.last("Generate").sampling
    assert not any(s.HasField(f) for f in ("temperature", "top_p", "top_k", "max_tokens", "seed"))
    assert list(s.stop) == []


def test_generate_chat_messages(client: FlywheelClient, rec: Recorder) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    client.generate(messages=messages, stop="\n")
    request = rec.last("Generate")
    assert request.prompt.WhichOneof("kind") == "chat"
    assert [(m.role, m.content) for m in request.prompt.chat.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
    ]
    assert list(request.sampling.stop) == ["\n"]


def test_prompt_and_messages_are_exclusive(client: FlywheelClient) -> None:
    with pytest.raises(InvalidArgument, match="either a prompt or messages"):
        client.generate("a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(InvalidArgument):
        client.generate()


def test_no_api_key_sends_no_authorization(fake_server: tuple[str, Recorder]) -> None:
    target, rec = fake_server
    with FlywheelClient(target, timeout=10) as anonymous:
        anonymous.versions()
    assert "authorization" not in rec.metadata["ListVersions"]


def test_generate_stream_yields_interleaved_chunks(client: FlywheelClient, rec: Recorder) -> None:
    chunks = list(client.generate_stream("say hi", n=2, max_tokens=4))
    assert rec.last("GenerateStream").n == 2
    assert rec.last("GenerateStream").sampling.max_tokens == 4
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        assert "".join(c.delta for c in mine) == "hello world"
        assert {c.completion_id for c in mine} == {f"c-{i}"}
        assert [c.finish_reason for c in mine][-1] == "stop"
        assert all(c.prompt_id == "p-1" and c.policy == "policy-v0" for c in mine)


def test_stream_error_after_some_chunks_is_typed(client: FlywheelClient) -> None:
    seen = []
    with pytest.raises(NotFound, match="unloaded") as info:
        for chunk in client.generate_stream("fail-midway"):
            seen.append(chunk.delta)
    assert seen == ["hel"]
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_compare_sends_k_and_policies(client: FlywheelClient, rec: Recorder) -> None:
    comparison = client.compare("say hi", k=3, policies=["policy-v0", "policy-v1"], temperature=0.7)
    request = rec.last("Compare")
    assert (request.k, list(request.policies)) == (3, ["policy-v0", "policy-v1"])
    assert request.sampling.temperature == pytest.approx(0.7)
    assert comparison.prompt_id == "p-2"
    assert [c.policy for c in comparison.candidates] == ["policy-v0", "policy-v1", "policy-v0"]


def test_score(client: FlywheelClient, rec: Recorder) -> None:
    scores = client.score("q", ["abcd", "ab"], reward_model="reward-v2")
    assert list(rec.last("Score").completions) == ["abcd", "ab"]
    assert scores.scores == (1.0, 0.5)
    assert scores.reward_model == "reward-v2"


def test_rank_sends_tiers_and_a_fresh_idempotency_key(
    client: FlywheelClient, rec: Recorder
) -> None:
    receipt = client.rank(["c-0", ["c-1", "c-2"], "c-3"], labeler="ann")
    request = rec.last("SubmitRanking")
    assert [list(t.completion_ids) for t in request.ranking] == [["c-0"], ["c-1", "c-2"], ["c-3"]]
    assert request.labeler == "ann"
    assert uuid.UUID(request.idempotency_key).version == 4
    assert (receipt.ranking_id, receipt.prompt_id, receipt.pairs, receipt.duplicate) == (
        "r-1",
        "p-1",
        5,
        False,
    )

    client.rank(["c-0", "c-1"], labeler="ann")
    assert rec.last("SubmitRanking").idempotency_key != request.idempotency_key


def test_rank_replayed_key_reports_duplicate(client: FlywheelClient) -> None:
    assert not client.rank(["c-0", "c-1"], labeler="ann", idempotency_key="k-42").duplicate
    assert client.rank(["c-0", "c-1"], labeler="ann", idempotency_key="k-42").duplicate


def test_demonstrate(client: FlywheelClient, rec: Recorder) -> None:
    receipt = client.demonstrate("say hi", response="hi!", labeler="ann", idempotency_key="d-key")
    request = rec.last("SubmitDemonstration")
    assert (request.prompt.text, request.response, request.labeler, request.idempotency_key) == (
        "say hi",
        "hi!",
        "ann",
        "d-key",
    )
    assert receipt.demonstration_id == "d-1"


def test_versions(client: FlywheelClient, rec: Recorder) -> None:
    versions = client.versions("policy")
    assert rec.last("ListVersions").name == "policy"
    assert versions.live == {"policy": "policy-v1", "reward": "reward-v1"}
    live = versions.versions[1]
    assert (live.id, live.state, live.version, dict(live.metrics), live.base_model) == (
        "policy-v1",
        "live",
        1,
        {"reward": 0.25},
        "fp",
    )
    c = versions.challenge
    assert c is not None
    assert (c.challenger, c.champion, c.outcome, c.ended_at) == (
        "policy-v2",
        "policy-v1",
        "running",
        None,  # 0 on the wire while it runs
    )
    assert (c.rankings, c.wins, c.losses, c.ties, c.min_rankings) == (7, 5, 1, 1, 10)
    assert (c.win_rate, c.lower, c.upper, c.confidence) == (11 / 14, 0.49, 0.94, 0.95)
    assert client.versions("reward").challenge is None


def test_publish_as_challenger_and_the_challenge_calls(
    client: FlywheelClient, rec: Recorder, tmp_path: Path
) -> None:
    version = client.publish_adapter(
        _adapter_dir(tmp_path), name="policy", base_model="fp", challenger=True
    )
    header, _ = rec.uploads[-1]
    assert (header.challenger, header.promote, version.state) == (True, False, "ready")
    started = client.challenge(3)
    assert (rec.last("Challenge").version, rec.last("Challenge").stop) == (3, False)
    assert (started.challenger, started.outcome) == ("policy-v3", "running")
    stopped = client.stop_challenge()
    assert rec.last("Challenge").stop is True
    assert (stopped.outcome, stopped.ended_at) == ("stopped", 2.0)


def test_exports_page_from_a_cursor(client: FlywheelClient, rec: Recorder) -> None:
    rankings = client.export_rankings(after=1, limit=1)
    assert (rec.last("ExportRankings").after, rec.last("ExportRankings").limit) == (1, 1)
    assert [r.cursor for r in rankings] == [2]
    assert [(c.completion_id, c.tier) for c in rankings[0].completions] == [("c-0", 0), ("c-1", 1)]
    assert [r.cursor for r in client.iter_rankings()] == [1, 2, 3]
    assert [p.prompt_id for p in client.export_prompts(after=5)] == ["p-6"]
    [demo] = client.export_demonstrations()
    assert (demo.demonstration_id, demo.response, demo.labeler) == ("d-9", "a", "ann")


def test_publish_adapter_arrives_intact_across_chunks(
    client: FlywheelClient, rec: Recorder, tmp_path: Path
) -> None:
    directory = _adapter_dir(tmp_path)
    version = client.publish_adapter(
        directory,
        name="policy",
        base_model="fp",
        metrics={"kl": 0.1},
        promote=True,
        chunk_size=8192,
    )
    header, data = rec.uploads[-1]
    assert rec.requests["PublishAdapter.pieces"][-1] > 1
    assert (header.name, header.base_model, header.promote, dict(header.metrics)) == (
        "policy",
        "fp",
        True,
        {"kl": 0.1},
    )
    assert header.size == len(data)
    assert header.sha256 == hashlib.sha256(data).hexdigest() == version.sha256
    assert (version.id, version.state) == ("policy-v2", "live")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]
        weights = tar.extractfile("adapter_model.safetensors")
        assert weights is not None
        assert weights.read() == (directory / "adapter_model.safetensors").read_bytes()
    assert rec.metadata["PublishAdapter"]["authorization"] == f"Bearer {API_KEY}"


def test_promote_rollback_and_server_info(client: FlywheelClient, rec: Recorder) -> None:
    assert client.promote("policy", 1).id == "policy-v1"
    assert (rec.last("Promote").name, rec.last("Promote").version) == ("policy", 1)
    with pytest.raises(NotFound, match="policy-v99"):
        client.promote("policy", 99)
    with pytest.raises(Conflict, match="no earlier live version") as info:
        client.rollback("reward")
    assert info.value.code == "FAILED_PRECONDITION"
    info_ = client.server_info()
    assert (info_.base_model, info_.max_tokens_limit, info_.live) == (
        "fp",
        512,
        {"policy": "policy-v1"},
    )


def test_aborted_calls_become_typed_errors(client: FlywheelClient) -> None:
    with pytest.raises(InvalidArgument, match="max_tokens must be between") as info:
        client.generate("invalid")
    assert (info.value.code, info.value.field) == ("INVALID_ARGUMENT", "sampling.max_tokens")
    assert isinstance(info.value.__cause__, grpc.RpcError)

    with pytest.raises(NotFound, match="not issued") as info:
        client.rank(["c-0", "unknown"], labeler="ann")
    assert info.value.code == "NOT_FOUND"

    with pytest.raises(Overloaded, match="queue is full") as info:
        client.generate("busy")
    assert info.value.code == "RESOURCE_EXHAUSTED"


def test_unreachable_server_is_unavailable() -> None:
    with FlywheelClient("127.0.0.1:1", timeout=5) as c, pytest.raises(Unavailable):
        c.versions()


# -- async client --------------------------------------------------------------------------------


async def test_async_client_same_calls(fake_server: tuple[str, Recorder], tmp_path: Path) -> None:
    target, rec = fake_server
    async with AsyncFlywheelClient(target, api_key=API_KEY, timeout=10) as client:
        generation = await client.generate("say hi", n=3, seed=11)
        assert len(generation.completions) == 3
        assert rec.last("Generate").sampling.seed == 11
        assert rec.metadata["Generate"]["authorization"] == f"Bearer {API_KEY}"

        deltas = [c.delta async for c in client.generate_stream("say hi")]
        assert "".join(deltas) == "hello world"

        receipt = await client.rank([["c-0", "c-1"], "c-2"], labeler="bot")
        assert receipt.pairs == 2
        assert [list(t.completion_ids) for t in rec.last("SubmitRanking").ranking] == [
            ["c-0", "c-1"],
            ["c-2"],
        ]

        version = await client.publish_adapter(
            _adapter_dir(tmp_path), name="reward", base_model="fp", chunk_size=5000
        )
        header, data = rec.uploads[-1]
        assert header.sha256 == hashlib.sha256(data).hexdigest() == version.sha256
        assert rec.requests["PublishAdapter.pieces"][-1] > 1

        assert [r.cursor async for r in client.iter_rankings(after=2)] == [3]
        assert (await client.versions()).live["policy"] == "policy-v1"
        assert (await client.versions()).challenge.wins == 5  # type: ignore[union-attr]
        assert (await client.challenge(4)).challenger == "policy-v4"
        assert (await client.stop_challenge()).outcome == "stopped"

        with pytest.raises(InvalidArgument) as info:
            await client.generate("invalid")
        assert info.value.field == "sampling.max_tokens"
        with pytest.raises(Overloaded):
            async for _ in client.generate_stream("busy"):
                pass
        with pytest.raises(NotFound):
            await client.rank(["unknown", "c-1"], labeler="bot")


# -- command line --------------------------------------------------------------------------------


def _cli(target: str, argv: list[str]) -> int:
    try:
        return cli.main([*argv, "--server", target, "--api-key", API_KEY])
    except SystemExit as e:
        return int(e.code or 0)


def test_cli_generate_prints_ids(
    fake_server: tuple[str, Recorder], capsys: pytest.CaptureFixture[str]
) -> None:
    target, rec = fake_server
    assert (
        _cli(
            target,
            ["generate", "say hi", "--n", "2", "--temperature", "0", "--stop", ".", "--stop", "!"],
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "c-0" in out and "c-1" in out and "text 1" in out
    request = rec.last("Generate")
    assert request.sampling.temperature == 0.0 and list(request.sampling.stop) == [".", "!"]
    assert rec.metadata["Generate"]["authorization"] == f"Bearer {API_KEY}"


def test_cli_generate_json_and_stream(
    fake_server: tuple[str, Recorder], capsys: pytest.CaptureFixture[str]
) -> None:
    target, rec = fake_server
    assert _cli(target, ["generate", "say hi", "--json", "--chat"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["completions"][0]["id"] == "c-0"
    assert rec.last("Generate").prompt.chat.messages[0].content == "say hi"

    assert _cli(target, ["generate", "say hi", "--stream"]) == 0
    assert "hello world" in capsys.readouterr().out

    assert _cli(target, ["generate", "say hi", "--stream", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("hello world") == 2 and "c-1" in out


def test_cli_compare_rank_score_policies(
    fake_server: tuple[str, Recorder], capsys: pytest.CaptureFixture[str]
) -> None:
    target, rec = fake_server
    assert _cli(target, ["compare", "say hi", "--k", "2", "--policies", "policy-v0,policy-v1"]) == 0
    out = capsys.readouterr().out
    assert "1. c-0" in out and "2. c-1" in out
    assert list(rec.last("Compare").policies) == ["policy-v0", "policy-v1"]

    assert (
        _cli(target, ["rank", "c-0", "c-1=c-2", "c-3", "--labeler", "ann", "--key", "cli-key"]) == 0
    )
    assert "5 pairs" in capsys.readouterr().out
    request = rec.last("SubmitRanking")
    assert [list(t.completion_ids) for t in request.ranking] == [["c-0"], ["c-1", "c-2"], ["c-3"]]
    assert (request.labeler, request.idempotency_key) == ("ann", "cli-key")

    assert _cli(target, ["score", "q", "abcd", "ab"]) == 0
    assert "+1.0000  abcd" in capsys.readouterr().out

    assert _cli(target, ["demonstrate", "q", "a"]) == 0
    assert "d-1" in capsys.readouterr().out

    assert _cli(target, ["policies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["ID", "STATE"]
    assert next(line for line in lines if line.startswith("*")).split()[1:3] == [
        "policy-v1",
        "live",
    ]
    assert lines[-1] == (
        "challenge policy-v2 vs policy-v1 (running): 7 rankings, 5-1-1 won-lost-tied, win rate "
        "0.786 [0.490, 0.940] at 95%; from 10 rankings, promotes if lower > 0.5, retires if "
        "upper < 0.5"
    )

    assert _cli(target, ["policies", "--name", "reward"]) == 0
    assert "challenge" not in capsys.readouterr().out


def test_cli_server_errors(
    fake_server: tuple[str, Recorder], capsys: pytest.CaptureFixture[str]
) -> None:
    target, _ = fake_server
    assert _cli(target, ["generate", "invalid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: max_tokens must be between") and "Traceback" not in err

    assert _cli(target, ["rank", "c-0", "unknown"]) == 1
    assert capsys.readouterr().err.startswith("error: completion 'unknown' was not issued")

    assert _cli(target, ["generate", "busy"]) == 1
    assert "queue is full" in capsys.readouterr().err


def test_cli_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("127.0.0.1:1", ["policies", "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the server at 127.0.0.1:1")
    assert "Traceback" not in err
