"""The official `openai` package against our HTTP server, and rankings that survive a restart."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.support import ServerProcess

pytestmark = pytest.mark.integration


def client_for(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


@pytest.mark.both_backends
def test_models_lists_live_alias_and_versions(server):
    ids = {m.id for m in client_for(server).models.list()}
    assert {"policy", "policy-v0", "reward", "reward-v1"} <= ids


@pytest.mark.both_backends
def test_completions_n4_carry_rankable_ids(server):
    result = client_for(server).completions.create(
        model="policy", prompt="reverse: abc", n=4, max_tokens=8
    )
    ids = [c.model_extra["completion_id"] for c in result.choices]
    assert len(result.choices) == 4 and len(set(ids)) == 4
    assert result.model == "policy-v0"
    assert result.usage.completion_tokens > 0

    status, body = server.post(
        "/v1/feedback", {"ranking": ids, "labeler": "openai-test", "idempotency_key": ids[0]}
    )
    assert status == 201, body
    assert body["pairs"] == 6 and body["duplicate"] is False


@pytest.mark.both_backends
def test_streamed_chat_n4(server):
    stream = client_for(server).chat.completions.create(
        model="policy",
        messages=[{"role": "user", "content": "sort: cba"}],
        n=4,
        max_tokens=6,
        stream=True,
    )
    texts: dict[int, str] = {}
    ids: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            ids[choice.index] = choice.model_extra["completion_id"]
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1, 2, 3]
    status, body = server.post(
        "/v1/feedback", {"ranking": [ids[0], [ids[1], ids[2]], ids[3]], "labeler": "t"}
    )
    assert status == 201 and body["pairs"] == 5


@pytest.mark.both_backends
def test_sse_ends_with_done(server):
    with httpx.stream(
        "POST",
        f"{server.http}/v1/completions",
        json={"prompt": "add: 1 + 1", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


@pytest.mark.both_backends
def test_pinned_version_and_unknown_version(server):
    c = client_for(server)
    assert c.completions.create(model="policy-v0", prompt="x", max_tokens=2).model == "policy-v0"
    with pytest.raises(openai.NotFoundError, match="policy-v42"):
        c.completions.create(model="policy-v42", prompt="x", max_tokens=2)


def test_ranking_survives_restart(tiny_model, tmp_path):
    proc = ServerProcess(tiny_model, tmp_path / "data").start()
    try:
        result = client_for(proc).completions.create(
            model="policy", prompt="add: 2 + 2", n=2, max_tokens=4
        )
        ids = [c.model_extra["completion_id"] for c in result.choices]
        status, body = proc.post(
            "/v1/feedback", {"ranking": ids, "labeler": "durable", "idempotency_key": "restart-1"}
        )
        assert status == 201
    finally:
        assert proc.stop() == 0
    restarted = ServerProcess(tiny_model, tmp_path / "data").start()
    try:
        assert restarted.counts()["rankings"] == 1
        status, replay = restarted.post(
            "/v1/feedback", {"ranking": ids, "labeler": "durable", "idempotency_key": "restart-1"}
        )
        assert (
            status == 200
            and replay["duplicate"] is True
            and replay["ranking_id"] == body["ranking_id"]
        )
        from flywheel_client import FlywheelClient

        with FlywheelClient(restarted.grpc) as client:
            exported = client.export_rankings()
        assert [r.ranking_id for r in exported] == [body["ranking_id"]]
        assert sorted(c.completion_id for c in exported[0].completions) == sorted(ids)
    finally:
        restarted.stop()


@pytest.mark.both_backends
def test_stream_usage_when_asked(server):
    stream = client_for(server).completions.create(
        model="policy",
        prompt="add: 1 + 1",
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.both_backends
def test_benchmark_knobs_ignore_eos_and_min_tokens(server):
    """What `vllm bench serve` sends so every answer is max_tokens long, on either backend."""
    chat = client_for(server).chat.completions.create(
        model="policy",
        messages=[{"role": "user", "content": "add: 2 + 2"}],
        n=2,
        max_tokens=8,
        extra_body={"ignore_eos": True, "min_tokens": 8},
    )
    assert [c.finish_reason for c in chat.choices] == ["length", "length"]
    assert chat.usage is not None and chat.usage.completion_tokens == 16
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client_for(server).completions.create(
            model="policy", prompt="x", max_tokens=4, extra_body={"min_tokens": 5}
        )


def test_the_end_user_is_stored_with_the_prompt_and_exported(server):
    from flywheel_client import FlywheelClient

    made = client_for(server).chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "add: 1 + 1"}], n=2, max_tokens=2,
        user="end-user-7",
    )  # fmt: skip
    ids = [c.model_extra["completion_id"] for c in made.choices]
    assert server.post("/v1/feedback", {"ranking": ids, "labeler": "u-test"})[0] == 201
    with FlywheelClient(server.grpc) as client:
        prompts = client.export_prompts()
        rankings = client.export_rankings()
    assert [p.user for p in prompts if p.user == "end-user-7"] == ["end-user-7"]
    assert [r.user for r in rankings if r.labeler == "u-test"] == ["end-user-7"]
    long = {"model": "policy", "prompt": "x", "max_tokens": 1, "user": "u" * 201}
    assert server.post("/v1/completions", long)[0] == 400


@pytest.mark.both_backends
def test_penalties_and_logit_bias_are_taken(server):
    result = client_for(server).completions.create(
        model="policy", prompt="reverse: abc", max_tokens=4, temperature=0,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"0": -100},
    )  # fmt: skip
    assert result.choices[0].finish_reason in ("stop", "length")


def test_completion_logprobs_unary_and_streamed(server):
    """Each token with its log-probability and alternatives; the streamed chunks carry the same
    entries as the unary answer, their text offsets running on across chunks."""
    body = {"model": "policy", "prompt": "reverse: abcdef", "max_tokens": 8, "temperature": 0,
            "logprobs": 2}  # fmt: skip
    status, doc = server.post("/v1/completions", body)
    assert status == 200, doc
    [choice] = doc["choices"]
    lp = choice["logprobs"]
    tokens = doc["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == tokens > 0
    assert "".join(lp["tokens"]).startswith(choice["text"])
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(tokens)]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert len(top) <= 2 and chosen == max(top.values()) <= 0  # greedy: the chosen is best

    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with httpx.stream("POST", f"{server.http}/v1/completions", json=body | {"stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for key, values in (json.loads(line[6:])["choices"][0]["logprobs"] or {}).items():
                    streamed[key] += values
    assert streamed == lp
    assert (
        client_for(server)
        .completions.create(model="policy", prompt="x", max_tokens=2)
        .choices[0]
        .logprobs
        is None
    )  # not asked, none given


def test_chat_logprobs_with_top_alternatives(server):
    chat = client_for(server).chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "sort: cba"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens > 0
    for entry in content:
        assert bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    stream = client_for(server).chat.completions.create(
        model="policy", messages=[{"role": "user", "content": "sort: cba"}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3, stream=True,
    )  # fmt: skip
    streamed = [e for c in stream for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client_for(server).chat.completions.create(
            model="policy", messages=[{"role": "user", "content": "x"}], top_logprobs=2
        )
