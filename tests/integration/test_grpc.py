"""The gRPC surface through the public client: health, reflection, generate, compare, score, rank."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

pytestmark = pytest.mark.integration


def test_health_answers_serving(server):
    with grpc.insecure_channel(server.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "flywheel.v1.Inference", "flywheel.v1.Feedback", "flywheel.v1.Learner"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_flywheel_services(server):
    with grpc.insecure_channel(server.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {
        "flywheel.v1.Inference",
        "flywheel.v1.Feedback",
        "flywheel.v1.Learner",
        "grpc.health.v1.Health",
    } <= names


@pytest.mark.both_backends
def test_generate_compare_score_rank(server, grpc_client):
    generation = grpc_client.generate("reverse: abc", n=3, max_tokens=6, seed=1)
    assert len(generation.completions) == 3
    assert len({c.id for c in generation.completions}) == 3
    assert all(c.policy == "policy-v0" and c.completion_tokens <= 6 for c in generation.completions)

    comparison = grpc_client.compare("add: 1 + 2", k=4, max_tokens=5)
    assert len(comparison.candidates) == 4
    assert len({c.id for c in comparison.candidates}) == 4

    scores = grpc_client.score("add: 1 + 2", ["3", "4", "12"])
    assert len(scores.scores) == 3 and scores.reward_model == "reward-v1"

    before = server.counts()
    ids = [c.id for c in comparison.candidates]
    receipt = grpc_client.rank([ids[0], [ids[1], ids[2]], ids[3]], labeler="test")
    assert receipt.prompt_id == comparison.prompt_id
    assert receipt.pairs == 1 * 3 + 2 * 1  # best beats 3; the tied pair each beat the last
    after = server.counts()
    assert after["rankings"] == before["rankings"] + 1
    assert after["ranking_items"] == before["ranking_items"] + 4


@pytest.mark.both_backends
def test_same_seed_same_text(grpc_client):
    a = grpc_client.generate("sort: dcba", n=2, max_tokens=8, seed=7, temperature=1.0)
    b = grpc_client.generate("sort: dcba", n=2, max_tokens=8, seed=7, temperature=1.0)
    assert [c.text for c in a.completions] == [c.text for c in b.completions]


@pytest.mark.both_backends
def test_stream_matches_its_completion_ids(grpc_client):
    chunks = list(grpc_client.generate_stream("capitalise: abc", n=2, max_tokens=5, seed=3))
    finished = {c.completion_id: c.finish_reason for c in chunks if c.finish_reason}
    assert len(finished) == 2 and set(finished.values()) <= {"stop", "length"}
    texts: dict[str, str] = {}
    for c in chunks:
        texts[c.completion_id] = texts.get(c.completion_id, "") + c.delta
    # A streamed completion is recorded and rankable as soon as its stream ends.
    receipt = grpc_client.rank(list(texts), labeler="stream-test")
    assert receipt.pairs == 1


@pytest.mark.both_backends
def test_logprobs_and_echo_over_grpc_equal_the_http_route(server, grpc_client):
    """The same greedy completion through both SDK transports (and both HTTP routes) carries
    the same log-probabilities; gRPC's echo scores the prompt as /v1/completions' does."""
    from flywheel_client import HttpClient
    from flywheel_proto.v1 import flywheel_pb2 as pb

    asked = {"max_tokens": 5, "temperature": 0.0, "ignore_eos": True, "logprobs": 2}
    over_grpc = grpc_client.generate("reverse: abcdef", **asked).completions[0]
    with HttpClient(server.http) as http:
        over_http = http.generate("reverse: abcdef", **asked).completions[0]
        streamed = [x for c in http.generate_stream("reverse: abcdef", **asked) for x in c.logprobs]
        chat = http.generate(messages=[{"role": "user", "content": "sort: cba"}], **asked)
    assert len(over_grpc.logprobs) == 5 and over_grpc.text == over_http.text
    for a, b in zip(over_grpc.logprobs, over_http.logprobs, strict=True):
        assert (a.token, a.top[0][0]) == (b.token, b.top[0][0])  # (HTTP's top is a dict)
        assert a.logprob == pytest.approx(b.logprob, abs=1e-6) and a.logprob == a.top[0][1]
    assert [x.token for x in streamed] == [x.token for x in over_http.logprobs]
    assert len(chat.completions[0].logprobs) == 5
    streamed_grpc = [x for c in grpc_client.generate_stream("reverse: abcdef", **asked)
                     for x in c.logprobs]  # fmt: skip
    assert [x.token for x in streamed_grpc] == [x.token for x in over_grpc.logprobs]

    request = pb.GenerateRequest(
        prompt=pb.Prompt(text="reverse: abcdef"), echo=True,
        sampling=pb.SamplingParams(max_tokens=1, temperature=0, logprobs=1),
    )  # fmt: skip
    reply = grpc_client._inference.Generate(request)  # the raw message: echo is not in the SDK
    status, doc = server.post("/v1/completions", {
        "prompt": "reverse: abcdef", "max_tokens": 1, "temperature": 0, "logprobs": 1,
        "echo": True})  # fmt: skip
    assert status == 200, doc
    entries = doc["choices"][0]["logprobs"]
    prompt = reply.prompt_logprobs
    assert [e.token for e in prompt] == entries["tokens"][: len(prompt)]
    assert not prompt[0].HasField("logprob") and entries["token_logprobs"][0] is None
    assert [e.logprob for e in prompt[1:]] == pytest.approx(
        entries["token_logprobs"][1 : len(prompt)]
    )
