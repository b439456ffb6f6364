"""The lean decoder against transformers: the same logits for every row, whatever the batch does.

The oracle for a row is transformers' forward over that row's whole sequence, alone, with its own
adapter. The decoder is driven through joins, copies, steps and departures in one batch.
"""

from __future__ import annotations

import random

import pytest
import torch

from flywheel_server.llama_decoder import LlamaDecoder, unsupported_reason
from tests.support import LLAMA_SHAPES, TINY_VOCAB, tiny_causal_lm

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB = TINY_VOCAB


def tiny(model_type: str, **extra: object) -> torch.nn.Module:
    return tiny_causal_lm(model_type, **extra).eval()


def with_adapters(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    with torch.no_grad():  # random, large enough to change the logits
        for p_name, p in peft.named_parameters():
            if "lora_B" in p_name:
                p.normal_(0, 0.5)
    return peft.eval()


@torch.inference_mode()
def oracle(net: torch.nn.Module, tokens: list[int], adapter: str | None) -> torch.Tensor:
    kwargs = {"adapter_names": [adapter or "__base__"]} if hasattr(net, "peft_config") else {}
    return net(input_ids=torch.tensor([tokens]), **kwargs).logits[0, -1]


@torch.inference_mode()
def drive(net: torch.nn.Module, decoder: LlamaDecoder, adapters: list[str | None]) -> int:
    """Random joins (with copies), steps and departures; check every row's logits each time."""
    rng = random.Random(0)
    rows: list[tuple[list[int], str | None]] = []  # each row's tokens so far, and its adapter
    checked = 0

    def check(logits: torch.Tensor, which: list[tuple[list[int], str | None]]) -> None:
        nonlocal checked
        for got, (tokens, adapter) in zip(logits, which, strict=True):
            torch.testing.assert_close(got, oracle(net, tokens, adapter), atol=2e-4, rtol=1e-4)
            checked += 1

    for step in range(14):
        if step % 3 == 0:  # a few requests join, some with several copies of their prompt
            prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))] for _ in range(3)]
            copies = [rng.randint(1, 3) for _ in prompts]
            names = [rng.choice(adapters) for _ in prompts]
            logits = decoder.prefill(prompts, copies, names)
            new = [
                (list(p), a)
                for p, c, a in zip(prompts, copies, names, strict=True)
                for _ in range(c)
            ]
            check(logits, new)
            rows += new
        ids = [rng.randrange(VOCAB) for _ in rows]
        for (tokens, _), token in zip(rows, ids, strict=True):
            tokens.append(token)
        check(decoder.step(torch.tensor(ids), [a for _, a in rows]), rows)
        keep = sorted(rng.sample(range(len(rows)), k=max(1, len(rows) - rng.randint(0, 3))))
        rows = [rows[i] for i in decoder.keep(keep)]
        assert len(decoder) == len(rows)
    return checked


@pytest.mark.parametrize(("model_type", "extra"), LLAMA_SHAPES)
def test_logits_match_transformers_through_joins_steps_and_departures(model_type, extra) -> None:
    model = tiny(model_type, **extra)
    assert unsupported_reason(model) is None
    decoder = LlamaDecoder(model)
    assert drive(model, decoder, [None]) > 100


def test_rows_on_different_adapters_match_peft_each_alone() -> None:
    model = tiny("llama", num_key_value_heads=2)
    decoder = LlamaDecoder(model)  # before peft wraps the projections, as the engine does
    peft = with_adapters(model, ["policy-v1", "policy-v2"])
    decoder.read_adapters(peft)
    assert drive(peft, decoder, [None, "policy-v1", "policy-v2"]) > 100


class OwnNorm:
    """The oracle for an adapter with its own final norm: peft, with that norm swapped in."""

    def __init__(self, peft: torch.nn.Module, adapter: str, norm: torch.Tensor) -> None:
        self.peft, self.adapter, self.norm = peft, adapter, norm
        self.peft_config = peft.peft_config

    def __call__(self, *, input_ids: torch.Tensor, adapter_names: list[str]) -> object:
        weight = self.peft.get_submodule("base_model.model.model.norm").weight
        base = weight.detach().clone()
        if adapter_names == [self.adapter]:
            weight.copy_(self.norm)
        try:
            return self.peft(input_ids=input_ids, adapter_names=adapter_names)
        finally:
            weight.copy_(base)


def test_an_adapters_own_final_norm_applies_to_its_rows_only() -> None:
    model = tiny("llama", num_key_value_heads=2)
    decoder = LlamaDecoder(model)
    peft = with_adapters(model, ["policy-v1", "policy-v2"])
    norm = model.model.norm.weight.detach() * torch.linspace(0.5, 3.0, 64)
    decoder.read_adapters(peft, {"policy-v2": norm})
    assert drive(OwnNorm(peft, "policy-v2", norm), decoder, [None, "policy-v1", "policy-v2"]) > 100
    decoder.clear()
    decoder.read_adapters(peft)  # without it, policy-v2's rows use the shared norm again
    assert drive(peft, decoder, ["policy-v2"]) > 30


def test_the_cache_grows_past_its_first_size() -> None:
    model = tiny("llama")
    decoder = LlamaDecoder(model)
    with torch.inference_mode():
        decoder.prefill([[1, 2, 3]], [1], [None])
        tokens = [1, 2, 3]
        for _ in range(80):  # past the first 64 positions
            token = len(tokens) % VOCAB
            tokens.append(token)
            logits = decoder.step(torch.tensor([token]), [None])
        torch.testing.assert_close(logits[0], oracle(model, tokens, None), atol=2e-4, rtol=1e-4)
    assert decoder.keys[0].shape[1] >= len(tokens)


def test_a_row_longer_than_the_model_allows_is_an_error() -> None:
    decoder = LlamaDecoder(tiny("llama"))
    with torch.inference_mode(), pytest.raises(ValueError, match="128 positions"):
        decoder.prefill([list(range(64)) * 3], [1], [None])


@pytest.mark.parametrize(
    ("model_type", "extra", "reason"),
    [
        ("gpt2", {}, "model type 'gpt2'"),
        ("mistral", {"sliding_window": 16, "num_key_value_heads": 4}, "sliding-window"),
        ("llama", {"hidden_act": "gelu"}, "activation"),
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE type"),
    ],
)
def test_models_it_cannot_run_say_why(model_type, extra, reason) -> None:
    if model_type == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    else:
        model = tiny(model_type, **extra)
    assert reason in (unsupported_reason(model) or "")


def test_an_adapter_it_cannot_run_is_named() -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny("llama")
    decoder = LlamaDecoder(model)
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    peft = get_peft_model(model, config, adapter_name="policy-v3")
    with pytest.raises(ValueError, match="adapter policy-v3: it is a LoRA variant"):
        decoder.read_adapters(peft)
