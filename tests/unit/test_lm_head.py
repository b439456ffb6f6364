"""The LM head in bounded chunks: the same log-probabilities and gradients as whole logits,
fewer bytes kept for the backward, and only where it reproduces the family's own logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flywheel_demo.model import chat_prompt
from flywheel_learner.ppo import ppo_step
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
from flywheel_model import adapters, lm_head
from flywheel_model.precision import FLOAT32_CPU
from tests.e2e.test_families import FAMILIES
from tests.unit import test_ppo
from tests.unit.test_checkpointing import saved_bytes
from tests.unit.test_ppo import CONFIG, ptx_batch

pytestmark = pytest.mark.unit

base_dir, reward_dir = test_ppo.base_dir, test_ppo.reward_dir


def test_chunks_give_the_whole_logits_log_probabilities_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 500, bias=False)
    states = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 500, (40,))

    def whole() -> torch.Tensor:
        logp = torch.log_softmax(head(states) / 0.7, dim=-1)
        return logp.gather(-1, targets[:, None]).squeeze(-1)

    def chunked() -> torch.Tensor:
        return lm_head.token_logprobs(head, states, targets, temperature=0.7)

    results = []
    for run in (whole, chunked):
        monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", 3000)  # 6 rows a chunk: 7 chunks
        value, kept = saved_bytes(run)
        (value * torch.arange(40.0)).sum().backward()
        results.append((value.detach(), states.grad.clone(), kept))
        states.grad = None
    (v0, g0, kept0), (v1, g1, kept1) = results
    assert torch.allclose(v0, v1, atol=1e-6) and torch.allclose(g0, g1, atol=1e-6)
    assert kept1 < kept0 / 5  # states and targets, not 40 x 500 logits


@pytest.mark.parametrize(
    ("model_type", "reproduces"),
    [("llama", True), ("gemma2", True), ("gpt2", True), ("cohere", False)],
)
def test_the_head_is_used_only_where_it_gives_the_forwards_logits(
    model_type: str, reproduces: bool
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, n_embd=32, n_layer=1, n_head=2)  # fmt: skip
    config = AutoConfig.for_model(model_type, vocab_size=64, pad_token_id=0, **small)
    if model_type == "gemma2":
        config.final_logit_softcapping = 2.0  # small, so that capping changes the logits
    if model_type == "cohere":
        config.logit_scale = 0.5  # logits scaled in the forward: a head alone cannot know
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = lm_head.head_of(model)
    assert lm_head.reproduces_forward(model, head, FLOAT32_CPU.autocast) is reproduces


def test_a_ppo_step_through_the_chunked_head_is_the_one_through_the_forwards_logits(
    base_dir: Path, reward_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", 4096)  # several chunks on the tiny vocabulary
    config = dataclasses.replace(CONFIG, max_new_tokens=6)
    results = []
    for chunked in (False, True):
        models = SharedBaseModels.build(base_dir, reward_dir, config)
        assert models._head is not None
        if not chunked:
            models._head = None
        prompts = [chat_prompt(models.tokenizer, i) for i in ("add: 1 + 2", "sort: cba")]
        torch.manual_seed(0)
        stats = ppo_step(models, make_optimizer(models, config), prompts, ptx_batch(models),
                         config, config.kl_controller())  # fmt: skip
        results.append((stats, {n: p.detach().clone() for n, p in models.peft.named_parameters()}))
    (plain, plain_params), (chunk, chunk_params) = results
    for name in ("reward_mean", "kl_mean", "ptx_loss", "policy_loss", "value_loss"):
        assert getattr(chunk, name) == pytest.approx(getattr(plain, name), rel=1e-5, abs=1e-7)
    for name, p in plain_params.items():
        assert torch.allclose(chunk_params[name], p, atol=1e-6), name


def test_cross_entropy_of_a_chunk_is_reduced_in_float32() -> None:
    head = torch.nn.Linear(8, 50, bias=False).to(torch.bfloat16)
    states = torch.randn(5, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (5,))
    got = lm_head.token_logprobs(head, states, targets)
    want = -F.cross_entropy(head(states).float(), targets, reduction="none")
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_final_states_are_the_forwards_last_hidden_states_in_every_family(family: str) -> None:
    """The decoder stack alone gives what the whole model reports as its final hidden states
    (the states its head reads), with a LoRA adapter on and padding in the mask."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, _, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, vocab_size=96, pad_token_id=0, **extra)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    lora = LoraConfig(r=4, target_modules=adapters.peft_targets(adapters.ALL_LINEAR, base),
                      init_lora_weights=False)  # fmt: skip
    model = get_peft_model(base, lora).eval()
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        mine = lm_head.final_states(model, input_ids=ids, attention_mask=mask)
    assert torch.allclose(mine, whole.hidden_states[-1], atol=1e-6)


def test_the_value_model_never_runs_the_lm_head(base_dir: Path, reward_dir: Path) -> None:
    """Values read hidden states only. A causal LM's forward ran its head on the last position
    anyway, and on CPU in bfloat16 that matmul copied the head's weight once per row."""
    models = SharedBaseModels.build(base_dir, reward_dir, CONFIG)
    calls: list[int] = []
    head = models.peft.get_base_model().get_output_embeddings()
    head.register_forward_hook(lambda *_: calls.append(1))
    ids = models.tokenizer([chat_prompt(models.tokenizer, "reverse: abc")] * 2,
                           return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.no_grad():
        values = models.values(ids, torch.ones_like(ids), ids.shape[1] - 2)
    assert values.shape == (2, 2) and calls == []
