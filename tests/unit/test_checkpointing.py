"""--gradient-checkpointing: the same update with fewer activations kept for the backward, on the
lean forward and on transformers' (which the learner runs in eval mode, where transformers' own
checkpointing is off)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from flywheel_demo.model import chat_prompt
from flywheel_learner.ppo import ppo_step
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
from flywheel_learner.reward import RewardConfig, add_reward_adapter, ranking_step
from flywheel_model import adapters, checkpointing, llama, loading, scoring
from tests.e2e.test_families import FAMILIES
from tests.unit import test_ppo
from tests.unit.test_ppo import CONFIG, ptx_batch

pytestmark = pytest.mark.unit

base_dir, reward_dir = test_ppo.base_dir, test_ppo.reward_dir  # the same tiny model and RM


def saved_bytes(run: Callable[[], Any]) -> tuple[Any, int]:
    """run()'s result and the bytes autograd kept for its backward outside checkpointed layers
    (a checkpointed layer keeps its input only; torch's own hooks take the rest)."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return run(), kept


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])
def test_a_checkpointed_reward_step_is_the_plain_one_with_fewer_activations_kept(
    base_dir: Path, lean: bool
) -> None:
    results = []
    for on in (False, True):
        model, tokenizer = loading.load_base(base_dir)
        if on:
            assert checkpointing.enable(model) == model.config.num_hidden_layers
        torch.manual_seed(0)
        peft = add_reward_adapter(model, RewardConfig(r=4, alpha=8), "reward")
        head = scoring.ScoreHead(model.config.hidden_size)
        rankings = [
            (chat_prompt(tokenizer, "reverse: abc"), [["cba"], ["abc" * 10], ["x"]]),
            (chat_prompt(tokenizer, "capitalise: hi"), [["HI"], ["hi"], ["Hi"]]),
        ]
        encoded = scoring.encode_rankings(tokenizer, rankings, 256)
        weights = llama.read(peft) if lean else None
        assert weights is None or weights.checkpoint is on
        pad = scoring.padding_id(tokenizer)
        loss, kept = saved_bytes(functools.partial(ranking_step, peft, head, weights, encoded, pad))
        params = [p for p in peft.parameters() if p.requires_grad] + list(head.parameters())
        results.append((loss, [p.grad.clone() for p in params if p.grad is not None], kept))
    (loss0, grads0, kept0), (loss1, grads1, kept1) = results
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert len(grads0) == len(grads1) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads0, grads1, strict=True))
    assert kept1 < kept0 / 2


def test_a_checkpointed_ppo_step_is_the_plain_one(base_dir: Path, reward_dir: Path) -> None:
    results = []
    for on in (False, True):
        config = dataclasses.replace(CONFIG, max_new_tokens=6, gradient_checkpointing=on)
        models = SharedBaseModels.build(base_dir, reward_dir, config)
        assert checkpointing.enabled(models.peft) is on
        prompts = [chat_prompt(models.tokenizer, i) for i in ("add: 1 + 2", "sort: cba")]
        ids = models.tokenizer(prompts[0], return_tensors="pt").input_ids
        _, kept = saved_bytes(
            functools.partial(models.policy_logprobs, ids, torch.ones_like(ids), 1)
        )
        torch.manual_seed(0)
        stats = ppo_step(models, make_optimizer(models, config), prompts, ptx_batch(models),
                         config, config.kl_controller())  # fmt: skip
        params = {n: p.detach().clone() for n, p in models.peft.named_parameters()}
        results.append((stats, params, kept))
    (plain, plain_params, kept0), (checked, checked_params, kept1) = results
    for name in ("reward_mean", "kl_mean", "ptx_loss", "policy_loss", "value_loss"):
        assert getattr(checked, name) == pytest.approx(getattr(plain, name), rel=1e-5, abs=1e-7)
    for name, p in plain_params.items():
        assert torch.allclose(checked_params[name], p, atol=1e-6), name
    assert kept1 < kept0 / 2


def test_a_model_without_decoder_layers_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="Linear model has no decoder layers"):
        checkpointing.enable(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_checkpoints_through_transformers_forward_in_eval_mode(family: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, _, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, vocab_size=96, pad_token_id=0, **extra)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config).eval()
        if on:
            checkpointing.enable(base)
        lora = LoraConfig(r=4, target_modules=adapters.peft_targets(adapters.ALL_LINEAR, base),
                          init_lora_weights=False)  # fmt: skip
        model = get_peft_model(base, lora).eval()

        def loss(model: Any = model) -> torch.Tensor:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            return out.loss.detach()

        value, kept = saved_bytes(loss)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((value, grads, kept))
    (loss0, grads0, kept0), (loss1, grads1, kept1) = results
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-6)
    assert len(grads0) == len(grads1) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads0, grads1, strict=True))
    assert kept1 < kept0
