import random
from pathlib import Path

import pytest
import torch

from flywheel_demo.model import build_tiny_model, chat_prompt
from flywheel_demo.task import demonstrations
from flywheel_learner.sft import SFTConfig, collate, encode_pair, response_nll, sft
from flywheel_model import loading

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny(tiny_dir: Path):
    return loading.load_base(tiny_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", -1, "lr must be > 0, got -1"),
        ("steps", 0, "steps must be >= 1, got 0"),
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("warmup", 10, r"warmup must be in \[0, steps=5\), got 10"),
    ],
)
def test_config_rejects_bad_values(field: str, value: float, message: str) -> None:
    kwargs = {"steps": 5, field: value}
    with pytest.raises(ValueError, match=message):
        SFTConfig(**kwargs)


def test_only_response_and_eos_are_trained_on(tiny) -> None:
    _, tokenizer = tiny
    prompt = chat_prompt(tokenizer, "reverse: abc")
    encoded = encode_pair(tokenizer, prompt, "cba", max_length=64)
    input_ids, attention, response = collate([encoded, encode_pair(tokenizer, prompt, "c", 64)], 0)
    assert tokenizer.decode(input_ids[0, response[0]]) == "cba<|eos|>"
    assert tokenizer.decode(input_ids[1, response[1]]) == "c<|eos|>"
    assert attention[1].sum() == len(encoded.ids) - 2  # right padding


def test_long_prompts_lose_their_beginning_not_the_response(tiny) -> None:
    _, tokenizer = tiny
    encoded = encode_pair(tokenizer, "x" * 50 + "abc\n", "cba", max_length=8)
    assert tokenizer.decode(encoded.ids) == "abc\ncba<|eos|>"
    assert encoded.response_start == 4


def test_sft_reduces_the_response_loss(tiny) -> None:
    model, tokenizer = tiny
    pairs = [(chat_prompt(tokenizer, i), r) for i, r in demonstrations(random.Random(0), 64, 1.0)]
    batch = collate([encode_pair(tokenizer, p, r, 64) for p, r in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        before = response_nll(model, *batch).item()
    result = sft(
        model,
        tokenizer,
        pairs,
        SFTConfig(steps=15, batch_size=16, lr=1e-2, warmup=2),
        progress=False,
    )
    with torch.no_grad():
        after = response_nll(model, *batch).item()
    assert result.steps == 15 and result.seconds > 0
    assert after < before - 0.5


def test_sft_trains_only_the_lora_adapter_of_a_peft_model(tiny) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    base_weight = model.model.embed_tokens.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora_b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    pairs = [(chat_prompt(tokenizer, "add: 1 + 2"), "3")]
    sft(peft_model, tokenizer, pairs, SFTConfig(steps=3, batch_size=2, warmup=0), progress=False)
    assert torch.equal(model.model.embed_tokens.weight, base_weight)
    assert lora_b.abs().sum().item() > 0


def test_sft_needs_pairs(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="at least one"):
        sft(model, tokenizer, [], SFTConfig(steps=1, warmup=0), progress=False)
