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


@pytest.mark.both_backends
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
    ended = choice["finish_reason"] == "stop"  # by the end-of-sequence token, which has its entry
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == tokens + ended > 0
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


@pytest.mark.both_backends
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


def _completion(server: ServerProcess, **body) -> dict:
    status, doc = server.post("/v1/completions", {"model": "policy", "temperature": 0} | body)
    assert status == 200, doc
    return doc


@pytest.mark.both_backends
def test_echo_gives_the_prompt_before_the_completion_with_its_logprobs(server):
    """echo: the prompt's text before the completion's, and with logprobs its tokens' entries
    first (the first token's null: nothing comes before it), text offsets running on; the
    completion's own entries as without echo; streamed, the prompt comes in the first chunk."""
    from transformers import AutoTokenizer

    prompt = "reverse: abcdef"
    ids = AutoTokenizer.from_pretrained(server.model)(prompt, add_special_tokens=False).input_ids
    plain = _completion(server, prompt=prompt, max_tokens=4, logprobs=2, ignore_eos=True)
    echoed = _completion(
        server, prompt=prompt, max_tokens=4, logprobs=2, ignore_eos=True, echo=True
    )
    [p], [e] = plain["choices"], echoed["choices"]
    assert e["text"] == prompt + p["text"]
    lp = e["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 4 and "".join(lp["tokens"]).startswith(e["text"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x < 0 for x in lp["token_logprobs"][1 : len(ids)])  # the prompt scored
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(ids) + 4)]
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert lp[key][len(ids) :] == p["logprobs"][key]
    assert _completion(server, prompt=prompt, max_tokens=2, echo=True)["choices"][0][
        "logprobs"] is None  # echo alone: the text, no logprobs  # fmt: skip

    streamed: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                 "text_offset": []}  # fmt: skip
    text = ""
    body = {"model": "policy", "prompt": prompt, "max_tokens": 4, "logprobs": 2, "temperature": 0,
            "ignore_eos": True, "echo": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.http}/v1/completions", json=body) as r:
        chunks = [
            json.loads(x[6:])["choices"][0] for x in r.iter_lines() if x.startswith("data: {")
        ]
    assert chunks[0]["text"] == prompt
    for chunk in chunks:
        text += chunk["text"]
        for key, values in (chunk["logprobs"] or {}).items():
            streamed[key] += values
    assert (text, streamed) == (e["text"], lp)

    status, doc = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "echo": True})  # fmt: skip
    assert status == 400 and doc["error"]["param"] == "echo"  # not a chat field


@pytest.mark.both_backends
def test_prompts_as_token_ids_and_several_prompts_in_one_request(server):
    """What lm-eval's local-completions sends: prompts as lists of token ids, several in one
    request, echoed, one token each; choice p * n + i is prompt p's completion i."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.model)
    texts = ["sort: cba", "reverse: flywheel"]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    alone = [_completion(server, prompt=t, max_tokens=1, logprobs=1, echo=True) for t in texts]
    both = _completion(server, prompt=ids, max_tokens=1, logprobs=1, echo=True, seed=1234)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    for choice, one, prompt_ids in zip(both["choices"], alone, ids, strict=True):
        [single] = one["choices"]
        assert choice["text"] == single["text"]
        assert choice["logprobs"] == single["logprobs"]
        assert len(choice["logprobs"]["token_logprobs"]) == len(prompt_ids) + 1
    assert both["usage"]["prompt_tokens"] == sum(map(len, ids))
    two = _completion(server, prompt=[ids[0]], n=2, max_tokens=2, temperature=1.0, seed=3)
    assert [c["index"] for c in two["choices"]] == [0, 1]

    vocab = len(tokenizer)
    for bad, message in [([[]], "non-empty list of token ids"), ([[1, vocab]], "prompt[1]"),
                         ([], "1 to 64 prompts"), ([ids[0]] * 65, "1 to 64 prompts")]:  # fmt: skip
        status, doc = server.post("/v1/completions", {"prompt": bad, "max_tokens": 1})
        assert status == 400 and message in doc["error"]["message"], (bad, doc)
        assert doc["error"]["param"] == "prompt"
    status, doc = server.post("/v1/completions", {"prompt": texts, "max_tokens": 1, "stream": True})
    assert status == 400 and "one prompt" in doc["error"]["message"]


def test_chat_content_as_text_parts(server):
    """Content as OpenAI's list of text parts (what vLLM's benchmark client sends) is the same
    as the joined string; any other part is refused by name."""

    def ask(content: object) -> tuple[int, dict]:
        return server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0})  # fmt: skip

    status, parts = ask([{"type": "text", "text": "sort: "}, {"type": "text", "text": "cba"}])
    assert status == 200, parts
    assert parts["choices"][0]["message"] == ask("sort: \ncba")[1]["choices"][0]["message"]
    status, doc = ask([{"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}])
    assert status == 400 and "text only" in doc["error"]["message"]


def test_logprobs_equal_a_transformers_forward_under_each_version(server, tmp_path):
    """Through HTTP, on the base (policy-v0) and on a published LoRA version: the echoed
    prompt's log-probabilities and a greedy chat answer's, unary and streamed, equal those of
    transformers + peft on the same weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel_client import FlywheelClient
    from flywheel_model import loading
    from tests.support import make_adapter

    adapter = make_adapter(server.model, tmp_path / "policy", seed=7)
    with FlywheelClient(server.grpc) as client:  # published, not promoted: the alias stays
        version = client.publish_adapter(
            adapter, name="policy", base_model=loading.base_fingerprint(server.model)
        ).id
    tokenizer = AutoTokenizer.from_pretrained(server.model)
    base = AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(server.model, dtype=torch.float32), adapter
    ).eval()
    messages = [{"role": "user", "content": "reverse: flywheel"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(rendered, add_special_tokens=False).input_ids  # as the server encodes
    prompt_ids = tokenizer("sort: dcba", add_special_tokens=False).input_ids
    for model, reference in (("policy-v0", base), (version, with_adapter)):
        doc = _completion(server, model=model, prompt=[prompt_ids], max_tokens=1, logprobs=1,
                          echo=True)  # fmt: skip
        got = doc["choices"][0]["logprobs"]["token_logprobs"]
        with torch.no_grad():
            logp = reference(input_ids=torch.tensor([prompt_ids])).logits[0].log_softmax(-1)
        want = [logp[i - 1, t].item() for i, t in enumerate(prompt_ids) if i]
        assert got[1 : len(prompt_ids)] == pytest.approx(want, abs=1e-4)
        assert got[-1] == pytest.approx(logp[-1].max().item(), abs=1e-4)  # the greedy token

        ids, want_chat = list(chat_ids), []
        for _ in range(4):  # transformers' own greedy loop
            with torch.no_grad():
                step = reference(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            token = int(step.argmax())
            want_chat.append((tokenizer.decode([token]), step[token].item()))
            ids.append(token)
        body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0,
                "ignore_eos": True, "logprobs": True}  # fmt: skip
        status, chat = server.post("/v1/chat/completions", body)
        assert status == 200, chat
        entries = [(e["token"], e["logprob"]) for e in chat["choices"][0]["logprobs"]["content"]]
        with httpx.stream("POST", f"{server.http}/v1/chat/completions",
                          json=body | {"stream": True}) as r:  # fmt: skip
            streamed = [
                (e["token"], e["logprob"])
                for line in r.iter_lines() if line.startswith("data: {")
                for choice in json.loads(line[6:])["choices"]
                for e in (choice["logprobs"] or {}).get("content", [])
            ]  # fmt: skip
        assert streamed == entries
        assert [t for t, _ in entries] == [t for t, _ in want_chat]
        assert [lp for _, lp in entries] == pytest.approx([lp for _, lp in want_chat], abs=1e-4)
