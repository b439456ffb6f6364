"""The torch engine on CPU with a tiny model: determinism, limits, stop strings, streaming,
admission and adapter loading (including the adapters it must refuse)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flywheel_server.domain import Sampling
from flywheel_server.engine_api import EngineRequest, TokenEvent
from flywheel_server.errors import AdapterNotFound, AdapterRefused, Overloaded
from flywheel_server.torch_engine import TorchEngine, merge_events
from tests.support import make_adapter

pytestmark = [
    pytest.mark.unit,
    # transformers renamed a property that peft still reads.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

PROMPT = "Hello"
TOKENS = 12


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel_demo.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("engine-model") / "tiny", seed=0)


@pytest.fixture(scope="module", params=["lean", "generic"])
def decoder(request: pytest.FixtureRequest) -> str:
    """Every engine test runs on both decoders: the lean Llama one and transformers' forward."""
    return str(request.param)


def open_engine(model_dir: Path, decoder: str, **options: Any) -> TorchEngine:
    choice = "auto" if decoder == "lean" else decoder
    e = TorchEngine(model_dir, device="cpu", decoder=choice, **options)
    assert e.decoder == decoder
    return e


@pytest.fixture(scope="module")
def engine(model_dir: Path, decoder: str) -> Iterator[TorchEngine]:
    """Shared by the tests that never load an adapter."""
    e = open_engine(model_dir, decoder)
    yield e
    e.close()


@pytest.fixture
def fresh_engine(model_dir: Path, decoder: str) -> Iterator[TorchEngine]:
    """For tests that load adapters or change admission (construction is cheap)."""
    e = open_engine(model_dir, decoder)
    yield e
    e.close()


@pytest.fixture(scope="module")
def adapter_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(model_dir, tmp_path_factory.mktemp("adapters") / "policy-v1")


def copy_adapter(adapter_dir: Path, out: Path) -> Path:
    shutil.copytree(adapter_dir, out)
    return out


@pytest.fixture(scope="module")
def base_greedy(model_dir: Path, engine: TorchEngine) -> tuple[list[int], str]:
    """Greedy completion of PROMPT by transformers' own generate loop: the oracle for the engine."""
    from flywheel_model import loading

    model, tokenizer = loading.load_base(model_dir)
    ids = torch.tensor([engine.encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


# -- helpers ------------------------------------------------------------------------------------


def request(
    engine: TorchEngine, prompt: str = PROMPT, *, n: int = 1, adapter: str | None = None, **sampling
) -> EngineRequest:
    sampling.setdefault("max_tokens", TOKENS)
    return EngineRequest(tuple(engine.encode(prompt)), n, Sampling(**sampling), adapter)


async def events(engine: TorchEngine, req: EngineRequest) -> list[TokenEvent]:
    return [e async for e in engine.generate(req)]


def texts(evs: list[TokenEvent], n: int = 1) -> list[str]:
    return ["".join(e.delta for e in evs if e.index == i) for i in range(n)]


def finals(evs: list[TokenEvent], n: int = 1) -> list[TokenEvent]:
    """The one finishing event of each row, checking it is that row's last event."""
    out = []
    for i in range(n):
        row = [e for e in evs if e.index == i]
        assert [e.finish_reason is not None for e in row] == [False] * (len(row) - 1) + [True]
        out.append(row[-1])
    return out


async def greedy_text(engine: TorchEngine, adapter: str | None = None) -> str:
    return texts(await events(engine, request(engine, adapter=adapter, temperature=0)))[0]


# -- generation ------------------------------------------------------------------------------


async def test_greedy_matches_transformers_generate(
    engine: TorchEngine, base_greedy: tuple[list[int], str]
) -> None:
    tokens, text = base_greedy
    assert engine.tokenizer.eos_token_id not in tokens  # so the engine must stop on length
    evs = await events(engine, request(engine, temperature=0))
    assert texts(evs) == [text]
    (last,) = finals(evs)
    assert (last.finish_reason, last.completion_tokens) == ("length", TOKENS)


async def test_temperature_0_gives_the_same_text_twice_and_on_every_row(
    engine: TorchEngine,
) -> None:
    first = texts(await events(engine, request(engine, n=2, temperature=0)), 2)
    second = texts(await events(engine, request(engine, temperature=0)))
    assert first[0] != ""
    assert first == [second[0], second[0]]


async def test_a_seed_makes_sampling_reproducible(engine: TorchEngine) -> None:
    def req(seed: int) -> EngineRequest:
        return request(engine, n=2, temperature=1.0, seed=seed)

    a = texts(await events(engine, req(1)), 2)
    b = texts(await events(engine, req(1)), 2)
    c = texts(await events(engine, req(2)), 2)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # each row has its own generator


@pytest.mark.parametrize("max_tokens", [1, 5])
async def test_max_tokens_is_respected(
    engine: TorchEngine, base_greedy: tuple[list[int], str], max_tokens: int
) -> None:
    tokens, _ = base_greedy
    evs = await events(engine, request(engine, temperature=0, max_tokens=max_tokens))
    (last,) = finals(evs)
    assert (last.finish_reason, last.completion_tokens) == ("length", max_tokens)
    expected = engine.tokenizer.decode(tokens[:max_tokens], skip_special_tokens=True)
    assert texts(evs) == [expected]


async def test_sampled_rows_finish_by_length_or_eos(engine: TorchEngine) -> None:
    n, limit = 4, 6
    evs = await events(engine, request(engine, n=n, temperature=1.0, seed=5, max_tokens=limit))
    for last in finals(evs, n):
        assert 0 <= last.completion_tokens <= limit
        if last.finish_reason == "length":
            assert last.completion_tokens == limit
        else:
            assert last.finish_reason == "stop"
            assert last.completion_tokens < limit


SAMPLED = {"temperature": 1.0, "top_k": 8, "seed": 1, "max_tokens": 16}


def stop_candidates(text: str) -> list[tuple[int, str]]:
    """Printable two-character strings of text, at their first occurrence, from index 2 on."""
    out = []
    for i in range(2, len(text) - 1):
        s = text[i : i + 2]
        if s.isascii() and s.isprintable() and text.find(s) == i:
            out.append((i, s))
    return out


async def test_a_stop_string_truncates_before_it(engine: TorchEngine) -> None:
    full = texts(await events(engine, request(engine, **SAMPLED)))[0]
    candidates = stop_candidates(full)
    assert candidates, f"no printable stop candidate in {full!r}"
    at, stop = candidates[0]

    evs = await events(engine, request(engine, **{**SAMPLED, "stop": (stop,)}))
    (last,) = finals(evs)
    assert texts(evs) == [full[:at]]
    assert last.finish_reason == "stop"
    assert last.completion_tokens < SAMPLED["max_tokens"]
    assert all(stop not in e.delta for e in evs)


async def test_the_earliest_of_several_stops_wins(engine: TorchEngine) -> None:
    full = texts(await events(engine, request(engine, **SAMPLED)))[0]
    candidates = stop_candidates(full)
    assert len(candidates) >= 2, f"need two stop candidates in {full!r}"
    (early_at, early), (_, late) = candidates[0], candidates[-1]
    # The later stop is listed first: the cut is still at the earlier one.
    evs = await events(engine, request(engine, **{**SAMPLED, "stop": (late, "never-there", early)}))
    assert texts(evs) == [full[:early_at]]
    assert finals(evs)[0].finish_reason == "stop"


async def test_streamed_deltas_add_up_to_the_final_text(
    engine: TorchEngine, base_greedy: tuple[list[int], str]
) -> None:
    tokens, text = base_greedy
    evs = await events(engine, request(engine, temperature=0))
    assert len(evs) > 1  # streamed, not one final event
    assert "".join(e.delta for e in evs) == text
    # completion_tokens counts up as the stream goes.
    counts = [e.completion_tokens for e in evs]
    assert counts == sorted(counts)
    assert counts[-1] == len(tokens)


async def test_n_rows_stream_interleaved_and_each_finishes_once(engine: TorchEngine) -> None:
    evs = await events(engine, request(engine, n=3, temperature=1.0, seed=3, max_tokens=4))
    assert {e.index for e in evs} == {0, 1, 2}
    assert len(finals(evs, 3)) == 3


# -- admission ----------------------------------------------------------------------------------


async def test_overloaded_when_max_pending_is_exceeded(model_dir: Path) -> None:
    engine = TorchEngine(model_dir, device="cpu", max_pending=1)
    try:
        first, second = await asyncio.gather(
            events(engine, request(engine, temperature=0, max_tokens=32)),
            events(engine, request(engine, temperature=0, max_tokens=32)),
            return_exceptions=True,
        )
        assert isinstance(first, list)
        assert finals(first)[0].completion_tokens > 0
        assert isinstance(second, Overloaded)
        assert second.message == "the server is at capacity (1 requests admitted); retry later"
        # The slot is released once the first finishes.
        third = await events(engine, request(engine, temperature=0, max_tokens=2))
        assert finals(third)[0].completion_tokens == 2
    finally:
        engine.close()


# -- adapters --------------------------------------------------------------------------------------


async def test_a_loaded_adapter_changes_output_and_the_base_stays_the_same(
    fresh_engine: TorchEngine, adapter_dir: Path, base_greedy: tuple[list[int], str]
) -> None:
    _, base = base_greedy
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    assert fresh_engine.adapters == ["policy-v1"]
    tuned = await greedy_text(fresh_engine, "policy-v1")
    assert tuned != base
    assert await greedy_text(fresh_engine, None) == base
    assert await greedy_text(fresh_engine, "policy-v1") == tuned
    # Loading the same id again is a no-op.
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    assert fresh_engine.adapters == ["policy-v1"]
    assert await greedy_text(fresh_engine, "policy-v1") == tuned


async def test_unload_restores_the_bare_base(
    fresh_engine: TorchEngine, adapter_dir: Path, base_greedy: tuple[list[int], str]
) -> None:
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    await fresh_engine.unload_adapter("policy-v1")
    assert fresh_engine.adapters == []
    assert fresh_engine.peft is None
    assert await greedy_text(fresh_engine) == base_greedy[1]
    await fresh_engine.unload_adapter("policy-v1")  # idempotent


async def test_a_directory_that_is_not_an_adapter_is_refused(
    fresh_engine: TorchEngine, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AdapterRefused) as info:
        await fresh_engine.load_adapter("policy-v1", tmp_path, reward=False)
    assert info.value.message == (
        f"{tmp_path} is not a PEFT adapter: it needs adapter_config.json and adapter_model.safetensors"
    )
    assert fresh_engine.adapters == []


async def test_an_adapter_for_another_base_model_is_refused(
    fresh_engine: TorchEngine, adapter_dir: Path, tmp_path: Path
) -> None:
    other = copy_adapter(adapter_dir, tmp_path / "other")
    (other / "flywheel.json").write_text(json.dumps({"base_model": "other"}))
    with pytest.raises(AdapterRefused) as info:
        await fresh_engine.load_adapter("policy-v2", other, reward=False)
    assert info.value.message == (
        f"adapter policy-v2 was trained on base model other, not on {fresh_engine.base_model}"
    )
    assert fresh_engine.adapters == []


def nan_adapter(adapter_dir: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    bad = copy_adapter(adapter_dir, out)
    weights = load_file(str(bad / "adapter_model.safetensors"))
    names = [k for k in weights if "lora_B" in k]
    assert names
    for k in names:
        weights[k] = torch.full_like(weights[k], float("nan"))
    save_file(weights, str(bad / "adapter_model.safetensors"))
    return bad


async def test_an_adapter_with_nan_weights_is_refused_and_the_base_still_serves(
    fresh_engine: TorchEngine, adapter_dir: Path, tmp_path: Path, base_greedy: tuple[list[int], str]
) -> None:
    bad = nan_adapter(adapter_dir, tmp_path / "nan")
    with pytest.raises(AdapterRefused) as info:
        await fresh_engine.load_adapter("policy-v3", bad, reward=False)
    assert info.value.message == "adapter policy-v3 gives non-finite logits"
    assert fresh_engine.adapters == []
    assert await greedy_text(fresh_engine) == base_greedy[1]


async def test_a_nan_adapter_next_to_a_good_one_leaves_the_good_one_serving(
    fresh_engine: TorchEngine, adapter_dir: Path, tmp_path: Path, base_greedy: tuple[list[int], str]
) -> None:
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    tuned = await greedy_text(fresh_engine, "policy-v1")
    with pytest.raises(AdapterRefused, match="non-finite"):
        await fresh_engine.load_adapter(
            "policy-v2", nan_adapter(adapter_dir, tmp_path / "nan"), reward=False
        )
    assert fresh_engine.adapters == ["policy-v1"]
    assert await greedy_text(fresh_engine, "policy-v1") == tuned
    assert await greedy_text(fresh_engine) == base_greedy[1]


async def test_a_request_for_an_adapter_that_is_not_loaded_fails_when_others_are(
    fresh_engine: TorchEngine, adapter_dir: Path
) -> None:
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    with pytest.raises(AdapterNotFound, match="policy-v7"):
        await greedy_text(fresh_engine, "policy-v7")


async def test_a_request_for_an_adapter_fails_when_none_is_loaded(
    fresh_engine: TorchEngine,
) -> None:
    with pytest.raises(Exception, match="policy-v7"):  # any error naming the id will do
        await greedy_text(fresh_engine, "policy-v7")


async def test_an_adapter_with_unreadable_weights_is_refused_and_the_base_is_untouched(
    fresh_engine: TorchEngine, adapter_dir: Path, tmp_path: Path, base_greedy: tuple[list[int], str]
) -> None:
    bad = copy_adapter(adapter_dir, tmp_path / "corrupt")
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterRefused, match=r"^adapter policy-v4 could not be loaded: "):
        await fresh_engine.load_adapter("policy-v4", bad, reward=False)
    assert fresh_engine.adapters == []
    assert await greedy_text(fresh_engine) == base_greedy[1]


async def test_a_dora_adapter_is_refused_with_a_reason_and_the_base_still_serves(
    fresh_engine: TorchEngine, model_dir: Path, tmp_path: Path, base_greedy: tuple[list[int], str]
) -> None:
    """Neither decoder runs DoRA per row (nor does peft's mixed-adapter batch)."""
    dora = make_adapter(model_dir, tmp_path / "dora", dora=True)
    with pytest.raises(AdapterRefused, match="DoRA"):
        await fresh_engine.load_adapter("policy-v5", dora, reward=False)
    assert fresh_engine.adapters == []
    assert await greedy_text(fresh_engine) == base_greedy[1]


def with_whole_module(adapter_dir: Path, out: Path, module: str, weight: torch.Tensor) -> Path:
    """A copy of the adapter that also trains `module` in full (PEFT modules_to_save)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, out)
    weights = load_file(str(out / "adapter_model.safetensors"))
    weights[f"base_model.model.{module}.weight"] = weight.contiguous()
    save_file(weights, str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": [module]}))
    return out


async def test_a_policy_with_its_own_final_norm_is_served_by_the_lean_decoder(
    fresh_engine: TorchEngine,
    decoder: str,
    adapter_dir: Path,
    tmp_path: Path,
    base_greedy: tuple[list[int], str],
) -> None:
    base_norm = fresh_engine.model.model.norm.weight.detach()
    torch.manual_seed(0)
    own = base_norm * torch.empty_like(base_norm).uniform_(0.2, 3.0)
    normed = with_whole_module(adapter_dir, tmp_path / "normed", "model.norm", own)
    if decoder == "generic":  # peft cannot swap a norm per row of a mixed batch
        with pytest.raises(AdapterRefused, match="only the lean decoder applies"):
            await fresh_engine.load_adapter("policy-v2", normed, reward=False)
        assert fresh_engine.adapters == []
        return
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    await fresh_engine.load_adapter("policy-v2", normed, reward=False)
    assert torch.equal(fresh_engine.final_norms["policy-v2"], own)
    assert not fresh_engine.peft.peft_config["policy-v2"].modules_to_save  # peft: LoRA only
    lora_only = await greedy_text(fresh_engine, "policy-v1")
    assert await greedy_text(fresh_engine, "policy-v2") != lora_only  # same LoRA, its own norm
    assert await greedy_text(fresh_engine) == base_greedy[1]
    assert torch.equal(fresh_engine.model.model.norm.weight, base_norm)
    await fresh_engine.unload_adapter("policy-v2")
    assert "policy-v2" not in fresh_engine.final_norms


async def test_an_adapter_that_trains_another_whole_module_is_refused(
    fresh_engine: TorchEngine, adapter_dir: Path, tmp_path: Path
) -> None:
    head = fresh_engine.model.lm_head.weight.detach()
    whole = with_whole_module(adapter_dir, tmp_path / "head", "lm_head", head)
    with pytest.raises(AdapterRefused, match=r"trains whole modules \['lm_head'\]"):
        await fresh_engine.load_adapter("policy-v3", whole, reward=False)
    assert fresh_engine.adapters == []


async def test_a_model_the_lean_decoder_cannot_run_is_decoded_by_transformers(
    model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    engine = TorchEngine(tmp_path / "gpt2", device="cpu")
    try:
        assert engine.decoder == "generic"
        ids = torch.tensor([engine.encode(PROMPT)])
        with torch.no_grad():
            out = engine.model.generate(
                input_ids=ids, do_sample=False, max_new_tokens=TOKENS, min_new_tokens=TOKENS
            )
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert await greedy_text(engine) == expected
    finally:
        engine.close()


# -- delivery ---------------------------------------------------------------------------------


def test_merged_events_join_each_completions_deltas_in_order() -> None:
    events = [
        TokenEvent(0, "a", None, 1),
        TokenEvent(1, "x", None, 1),
        TokenEvent(0, "b", None, 2),
        TokenEvent(0, "c", "stop", 3),
    ]
    assert merge_events(events) == [TokenEvent(0, "abc", "stop", 3), TokenEvent(1, "x", None, 1)]


async def test_within_the_stream_interval_tokens_wait_but_the_first_and_the_end_do_not(
    model_dir: Path, decoder: str
) -> None:
    """An interval longer than the whole request: one delivery for the first tokens, one at the
    end with everything else (the consumer may find both at once), and nothing is lost."""
    e = open_engine(model_dir, decoder, stream_interval_s=600.0)
    try:
        req = request(e, n=2, temperature=0, max_tokens=TOKENS)

        async def collect() -> list[list[TokenEvent]]:
            return [batch async for batch in e.generate_batches(req)]

        deliveries = await asyncio.wait_for(collect(), timeout=120)  # the end is not held back
        one_by_one = await events(e, req)
    finally:
        e.close()
    assert 1 <= len(deliveries) <= 2
    for batch in deliveries:
        assert sorted(ev.index for ev in batch) == sorted({ev.index for ev in batch})
    merged = [ev for batch in deliveries for ev in batch]
    assert texts(merged, 2) == texts(one_by_one, 2)
    assert [ev.completion_tokens for ev in finals(merged, 2)] == [TOKENS, TOKENS]


async def test_ignore_eos_and_min_tokens_hold_off_the_end(engine: TorchEngine) -> None:
    """As benchmarks ask: with ignore_eos every row runs to max_tokens; with min_tokens none
    ends before it. The same seed without them ends some rows early, so the knobs are what
    held the end off."""
    n, limit = 64, 12
    hot = {"n": n, "temperature": 10.0, "seed": 3, "max_tokens": limit}  # near uniform draws
    free = finals(await events(engine, request(engine, **hot)), n)
    assert any(e.finish_reason == "stop" and e.completion_tokens < 6 for e in free)
    held = await events(engine, request(engine, **hot, ignore_eos=True))
    assert {(e.finish_reason, e.completion_tokens) for e in finals(held, n)} == {("length", limit)}
    floor = await events(engine, request(engine, **hot, min_tokens=6))
    assert all(e.completion_tokens >= 6 for e in finals(floor, n))


async def test_logit_bias_and_penalties_steer_decoding(
    engine: TorchEngine, base_greedy: tuple[list[int], str]
) -> None:
    tokens, text = base_greedy
    favourite = tokens[0]
    forced = request(engine, temperature=0, max_tokens=6, logit_bias=((favourite, 100.0),))
    assert texts(await events(engine, forced)) == [
        engine.tokenizer.decode([favourite] * 6, skip_special_tokens=True)
    ]
    banned = request(engine, temperature=0, logit_bias=((favourite, -100.0),))
    assert favourite not in engine.encode(texts(await events(engine, banned))[0])
    # The base's greedy answer repeats a token; penalised, it may not repeat the same way.
    assert len(set(tokens)) < len(tokens)
    penalised = request(engine, temperature=0, presence_penalty=2.0, frequency_penalty=2.0)
    assert texts(await events(engine, penalised)) != [text]


async def test_a_bfloat16_engine_serves_the_base_and_an_adapter(
    model_dir: Path, decoder: str, adapter_dir: Path
) -> None:
    """--dtype bfloat16: the weights in bf16 (the adapter's float32 LoRA cast to them); rows
    decode to full length, with and without the adapter, and the adapter changes the answer."""
    e = open_engine(model_dir, decoder, dtype="bfloat16")
    try:
        assert e.dtype == torch.bfloat16
        assert next(e.model.parameters()).dtype == torch.bfloat16
        await e.load_adapter("policy-v1", adapter_dir, reward=False)
        for adapter in (None, "policy-v1"):
            req = request(e, n=2, adapter=adapter, temperature=1.0, seed=1, ignore_eos=True)
            assert [f.completion_tokens for f in finals(await events(e, req), 2)] == [TOKENS] * 2
        assert await greedy_text(e, "policy-v1") != await greedy_text(e, None)
    finally:
        e.close()


def assert_entries_match_a_forward(
    engine: TorchEngine, adapter: str | None, ids: list[int], start: int, entries: list[Any]
) -> None:
    """entries[i] is token ids[start + i] with its log-probability and its 3 best alternatives,
    as transformers' forward of ids under the adapter gives them."""
    tokens = torch.tensor([ids])
    with torch.inference_mode():
        logits = engine.loaded.forward([adapter], input_ids=tokens).logits[0]
    logp = logits[start - 1 : -1].float().log_softmax(-1)
    want = logp.gather(-1, tokens[0, start:, None]).squeeze(-1)
    got = torch.tensor([x.logprob for x in entries])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    top, top_ids = logp.topk(3, dim=-1)
    for x, lps, tids in zip(entries, top.tolist(), top_ids.tolist(), strict=True):
        assert [t for t, _ in x.top] == [engine.tokenizer.decode([t]) for t in tids]
        torch.testing.assert_close([lp for _, lp in x.top], lps, atol=1e-4, rtol=1e-4)


async def test_logprobs_equal_a_transformers_forward_under_each_adapter(
    fresh_engine: TorchEngine, adapter_dir: Path
) -> None:
    """Each token's log-probability is the model's own (not the tempered, penalised one the
    sampler drew from), under the row's adapter, with its top alternatives in order."""
    await fresh_engine.load_adapter("policy-v1", adapter_dir, reward=False)
    prompt = list(fresh_engine.encode(PROMPT))
    for adapter in (None, "policy-v1"):
        req = request(
            fresh_engine, adapter=adapter, n=2, temperature=2.0, seed=5, logprobs=3,
            frequency_penalty=1.5,
        )  # fmt: skip
        evs = await events(fresh_engine, req)
        for i in range(2):
            entries = [x for e in evs if e.index == i for x in e.logprobs]
            last = finals(evs, 2)[i]
            ended = last.finish_reason == "stop"  # by the end-of-sequence token: its entry too
            assert len(entries) == last.completion_tokens + ended  # one per sampled token
            assert "".join(x.token for x in entries).startswith(texts(evs, 2)[i])
            ids = prompt + [x.token_id for x in entries]
            assert_entries_match_a_forward(fresh_engine, adapter, ids, len(prompt), entries)


async def test_prompt_logprobs_equal_a_transformers_forward_under_each_adapter(
    fresh_engine: TorchEngine, adapter_dir: Path
) -> None:
    """echo's entries: each prompt token after the first, its log-probability given those
    before it under the adapter, with its alternatives; computed between the decode steps of
    running rows, which go on as if alone."""
    e = fresh_engine
    await e.load_adapter("policy-v1", adapter_dir, reward=False)
    prompt = tuple(e.encode("Hello there, general Kenobi"))
    running = request(e, n=3, adapter="policy-v1", temperature=0, ignore_eos=True, max_tokens=40)
    busy = asyncio.create_task(events(e, running))
    got = {a: await e.prompt_logprobs(prompt, a, 3) for a in (None, "policy-v1")}
    assert texts(await busy, 3) == texts(await events(e, running), 3)
    for adapter, entries in got.items():
        assert [x.token_id for x in entries] == list(prompt[1:])
        assert_entries_match_a_forward(e, adapter, list(prompt), 1, entries)
    assert got[None] != got["policy-v1"]


async def test_the_end_of_sequence_token_has_its_entry(engine: TorchEngine) -> None:
    """Every sampled token has an entry, the end's too (it adds no text): a client that asks
    for one token after an echoed prompt (lm-eval) finds exactly one entry after the prompt."""
    eos = engine.tokenizer.eos_token_id
    req = request(engine, temperature=0, logprobs=1, min_tokens=2, logit_bias=((eos, 100.0),))
    evs = await events(engine, req)
    [last] = finals(evs)
    entries = [x for ev in evs for x in ev.logprobs]
    assert (last.finish_reason, last.completion_tokens) == ("stop", 2)
    assert [x.token_id for x in entries][2:] == [eos]


async def test_no_logprobs_unless_asked(engine: TorchEngine) -> None:
    evs = await events(engine, request(engine, temperature=0))
    assert all(e.logprobs == () for e in evs)
    evs = await events(engine, request(engine, temperature=0, logprobs=0))
    assert all(x.top == () for e in evs for x in e.logprobs)
    assert sum(len(e.logprobs) for e in evs) == TOKENS
