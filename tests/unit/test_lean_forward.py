"""The lean training forward against transformers + peft: the same hidden states and gradients.

The oracle is `model(..., output_hidden_states=True).hidden_states[-1]` on right-padded rows,
compared at every real token; gradients are those of one scalar of those states with respect to
every LoRA matrix.
"""

from __future__ import annotations

import pytest
import torch

from flywheel_model import adapters, llama, scoring
from tests.support import LLAMA_SHAPES, TINY_VOCAB, tiny_causal_lm

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]

VOCAB = TINY_VOCAB
PROJECTIONS = list(llama.PROJECTIONS)
tiny = tiny_causal_lm


def with_lora(model: torch.nn.Module, name: str = "reward", **extra: object) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS, **extra)
    peft = get_peft_model(model, config, adapter_name=name)
    randomise(peft)
    return peft


def randomise(peft: torch.nn.Module) -> None:
    with torch.no_grad():  # LoRA B starts at 0: make every adapter change the states
        for p_name, p in peft.named_parameters():
            if "lora_B" in p_name:
                p.normal_(0, 0.3)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows of 3 to 11 tokens."""
    g = torch.Generator().manual_seed(1)
    lengths = [11, 3, 7, 9]
    ids = torch.randint(0, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask


def oracle(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1]


def assert_same(model: torch.nn.Module, atol: float = 1e-5) -> None:
    """Lean states and LoRA gradients equal transformers' at every real token."""
    ids, mask = batch()
    weights = llama.read(model)  # raises if the lean forward cannot run this model
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    real = mask.bool()
    got, want = llama.final_hidden(weights, ids)[real], oracle(model, ids, mask)[real]
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    if params:
        probe = torch.randn_like(want)
        for g_got, g_want in zip(
            torch.autograd.grad((got * probe).sum(), params),
            torch.autograd.grad((want * probe).sum(), params),
            strict=True,
        ):
            # float32 sums in another order: relative to the gradient's own scale
            scale = float(g_want.abs().max())
            torch.testing.assert_close(g_got, g_want, atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize(("model_type", "extra"), LLAMA_SHAPES)
def test_states_and_gradients_match_transformers_and_peft(model_type, extra) -> None:
    assert_same(with_lora(tiny(model_type, **extra)).train())


def test_the_base_alone_and_with_adapters_disabled_match() -> None:
    assert_same(tiny().eval())
    peft = with_lora(tiny())
    with peft.disable_adapter():
        assert_same(peft)


def test_the_active_adapter_is_the_one_computed_and_its_own_final_norm_is_used() -> None:
    from peft import LoraConfig

    peft = with_lora(tiny(), "reward")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=PROJECTIONS,
                        modules_to_save=[adapters.FINAL_NORM])  # fmt: skip
    peft.add_adapter("policy", config)
    randomise(peft)
    with torch.no_grad():
        peft.base_model.model.model.norm.modules_to_save["policy"].weight.mul_(3.0)
    for adapter in ("reward", "policy"):
        peft.set_adapter(adapter)
        assert_same(peft)


def test_lora_dropout_draws_as_peft_does() -> None:
    peft = with_lora(tiny(), lora_dropout=0.5).train()
    ids, mask = batch()
    torch.manual_seed(7)
    got = llama.final_hidden(llama.read(peft), ids)
    torch.manual_seed(7)
    want = oracle(peft, ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-4)


def test_shared_prompt_rows_match_each_sequence_alone() -> None:
    """One row `p | a | b` with positions and a mask equals `p + a` and `p + b` alone."""
    peft = with_lora(tiny())
    weights = llama.read(peft)
    p, a, b = [5, 6, 7], [8, 9], [10, 11, 12]
    row = torch.tensor([p + a + b])
    positions = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]])
    seg = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    mask = torch.ones(8, 8).tril().bool() & ((seg[None] == 0) | (seg[None] == seg[:, None]))
    got = llama.final_hidden(weights, row, positions, mask[None])[0]
    alone_a = llama.final_hidden(weights, torch.tensor([p + a]))[0]
    alone_b = llama.final_hidden(weights, torch.tensor([p + b]))[0]
    torch.testing.assert_close(got[:5], alone_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[5:], alone_b[3:], atol=1e-5, rtol=1e-4)


def test_what_it_cannot_run_is_refused_and_score_falls_back_to_transformers() -> None:
    from peft import LoraConfig

    dora = with_lora(tiny(), use_dora=True)
    with pytest.raises(llama.Unsupported, match="LoRA variant"):
        llama.read(dora)
    two = with_lora(tiny())
    two.add_adapter("other", LoraConfig(r=4, target_modules=PROJECTIONS))
    two.base_model.set_adapter(["reward", "other"])
    with pytest.raises(llama.Unsupported, match="2 adapters are active"):
        llama.read(two)
    merged = with_lora(tiny())
    merged.merge_adapter()
    with pytest.raises(llama.Unsupported, match="merged"):
        llama.read(merged)
    with pytest.raises(llama.Unsupported, match="sliding-window"):
        llama.read(tiny("mistral", sliding_window=4))
    # scoring.final_hidden serves them all through transformers' forward instead.
    ids, mask = batch()
    with torch.no_grad():
        for model in (dora, two, merged):
            got = scoring.final_hidden(model, ids, mask)
            torch.testing.assert_close(got, oracle(model, ids, mask))


def test_left_padded_rows_take_transformers_forward() -> None:
    """The lean forward has no padding mask, so a row padded on the left must not reach it."""
    peft = with_lora(tiny()).eval()
    ids, right = batch()
    left = right.flip(1)  # the same lengths, padding first
    with torch.no_grad():
        got = scoring.final_hidden(peft, ids, left)
        torch.testing.assert_close(got[left.bool()], oracle(peft, ids, left)[left.bool()])
        lean = llama.final_hidden(llama.read(peft), ids)
    assert not torch.allclose(lean[left.bool()], got[left.bool()], atol=1e-3)
