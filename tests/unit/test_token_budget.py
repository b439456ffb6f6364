"""--max-tokens-per-microbatch: forwards bounded in tokens, and the update unchanged."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from flywheel_demo.model import chat_prompt
from flywheel_learner import token_budget
from flywheel_learner.ppo import ppo_step
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
from flywheel_learner.reward import RewardConfig, add_reward_adapter, ranking_step
from flywheel_model import llama, loading, scoring
from tests.unit import test_ppo
from tests.unit.test_ppo import CONFIG, ptx_batch

pytestmark = pytest.mark.unit

base_dir, reward_dir = test_ppo.base_dir, test_ppo.reward_dir  # the same tiny model and RM
LONG = "reverse: " + "abcdefghij" * 12  # 120 letters, one token each: the very long one
BUDGET = 200


@pytest.mark.parametrize("seed", range(5))
def test_pack_keeps_every_item_once_and_each_group_within_the_budget(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 90) for _ in range(40)] + [150]
    rows = [rng.randint(1, 3) for _ in lengths]
    for height in (None, rows):
        groups = token_budget.pack(lengths, 100, height)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            size = token_budget.padded_tokens([lengths[i] for i in g],
                                              [height[i] for i in g] if height else None)  # fmt: skip
            assert size <= 100 or len(g) == 1  # 150 tokens cannot be split: it goes alone
    assert token_budget.pack(lengths, 0) == [list(range(len(lengths)))]  # no budget


def test_a_budgeted_ppo_step_is_the_unsplit_one_in_bounded_forwards(
    base_dir: Path, reward_dir: Path
) -> None:
    config = dataclasses.replace(CONFIG, max_new_tokens=6)
    results = []
    for budget in (0, BUDGET):
        step = dataclasses.replace(config, max_tokens_per_microbatch=budget)
        models = SharedBaseModels.build(base_dir, reward_dir, step)
        prompts = [chat_prompt(models.tokenizer, i) for i in (LONG, "add: 1 + 2", "sort: cba",
                                                               "capitalise: hi")]  # fmt: skip
        seen: list[int] = []
        inputs = models._inputs  # every rollout forward (policy, reference, value) starts here

        def counted(ids, attention, inputs=inputs, seen=seen):  # type: ignore[no-untyped-def]
            seen.append(ids.numel())
            return inputs(ids, attention)

        models._inputs = counted  # type: ignore[method-assign]
        torch.manual_seed(0)
        stats = ppo_step(models, make_optimizer(models, step), prompts, ptx_batch(models), step,
                         step.kl_controller())  # fmt: skip
        params = {n: p.detach().clone() for n, p in models.peft.named_parameters()}
        results.append((stats, params, max(seen), len(seen)))
    (full, full_params, widest, calls), (split, split_params, bounded, more_calls) = results
    assert widest > BUDGET >= bounded  # unsplit, the long prompt pads every row past the budget
    assert more_calls > calls
    for name in ("reward_mean", "kl_mean", "ptx_loss", "policy_loss", "value_loss"):
        assert getattr(split, name) == pytest.approx(getattr(full, name), rel=1e-4, abs=1e-6)
    for name, p in full_params.items():
        assert torch.allclose(split_params[name], p, atol=1e-5), name


def test_a_budgeted_reward_step_is_the_unsplit_one(base_dir: Path) -> None:
    model, tokenizer = loading.load_base(base_dir)
    torch.manual_seed(0)
    peft = add_reward_adapter(model, RewardConfig(r=4, alpha=8), "reward")
    head = scoring.ScoreHead(model.config.hidden_size)
    rankings = [
        (chat_prompt(tokenizer, "reverse: abc"), [["cba"], ["abc" * 40], ["x"]]),
        (chat_prompt(tokenizer, "add: 1 + 2"), [["3"], ["4"]]),
        (chat_prompt(tokenizer, "sort: cba"), [["abc", "abc "]]),  # all tied: no pair
        (chat_prompt(tokenizer, "capitalise: hi"), [["HI"], ["hi"], ["Hi"]]),
    ]
    encoded = scoring.encode_rankings(tokenizer, rankings, 256)
    params = [p for p in peft.parameters() if p.requires_grad] + list(head.parameters())
    for weights in (llama.read(peft), None):  # prompt-sharing rows, and one row per completion
        grads = []
        for budget in (0, 80):
            for p in params:
                p.grad = None
            loss = ranking_step(peft, head, weights, encoded, scoring.padding_id(tokenizer),
                                budget)  # fmt: skip
            grads.append((loss, [p.grad.clone() for p in params if p.grad is not None]))
        (loss0, g0), (loss1, g1) = grads
        assert loss1 == pytest.approx(loss0, rel=1e-5)
        assert len(g0) == len(g1) and all(
            torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True)
        )
