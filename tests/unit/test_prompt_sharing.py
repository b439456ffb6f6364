"""Rankings as one row each (the prompt forwarded once) score as one row per completion does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flywheel_demo.model import build_tiny_model
from flywheel_learner import prompt_sharing, reward
from flywheel_learner.losses import ranking_loss
from flywheel_model import llama, loading, scoring

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


RANKINGS = [
    ("<|user|>\nq1\n<|assistant|>\n", [["yes"], ["maybe", "perhaps"], ["no"]]),
    ("<|user|>\na longer question two\n<|assistant|>\n", [["a long answer here"], ["short"]]),
    ("q3 ", [["same"], ["same!"]]),  # completions that share their first response tokens
]


def test_the_shared_prefix_stops_where_the_first_response_starts() -> None:
    ranking = [([1, 2, 3, 4, 5], 3, 0), ([1, 2, 3, 4, 6], 3, 1)]
    assert prompt_sharing.shared_prefix(ranking) == 3  # 4 is shared, but it is a response token
    assert prompt_sharing.shared_prefix([([1, 2, 9], 2, 0), ([1, 7, 9], 2, 1)]) == 1
    assert prompt_sharing.shared_prefix([([5, 2], 1, 0), ([6, 2], 1, 1)]) == 0


@pytest.mark.parametrize("max_length", [64, 6])  # 6 cuts prompts from the left, unequally
def test_rewards_and_gradients_equal_one_row_per_completion(tiny_dir: Path, max_length) -> None:
    model, tok = loading.load_base(tiny_dir)
    config = reward.RewardConfig(r=4, alpha=8)
    peft = reward.add_reward_adapter(model, config, "reward")
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    head = scoring.ScoreHead(peft.config.hidden_size, likelihood=0.7)
    encoded = reward.encode_rankings(tok, RANKINGS, max_length)
    flat = reward.collate_rankings(encoded, tok.pad_token_id)
    shared = prompt_sharing.collate(encoded, tok.pad_token_id)
    assert shared.input_ids.shape[0] == len(RANKINGS)  # one row per ranking
    assert shared.tiers.tolist() == flat.tiers.tolist()
    assert shared.group.tolist() == flat.group.tolist()
    params = [p for p in peft.parameters() if p.requires_grad] + list(head.parameters())
    got = prompt_sharing.score(peft, llama.read(peft), head, shared)
    want = reward.score_batch(peft, head, flat)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    g_got = torch.autograd.grad(ranking_loss(got, shared.tiers, shared.group), params)
    g_want = torch.autograd.grad(ranking_loss(want, flat.tiers, flat.group), params)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()) + 1e-6, rtol=1e-3)


def test_the_fit_shares_prompts_and_learns_as_without(tiny_dir: Path, monkeypatch) -> None:
    config = reward.RewardConfig(steps=8, lr=1e-2, r=4, alpha=8, batch_rankings=4, warmup=1)
    data = RANKINGS * 4
    calls = []
    shared_score = prompt_sharing.score
    monkeypatch.setattr(prompt_sharing, "score", lambda *a: calls.append(1) or shared_score(*a))
    model, tok = loading.load_base(tiny_dir)
    with_sharing = reward.fit_reward_model(model, tok, data, config, progress=False)
    assert len(calls) == config.steps

    def refuse(model: object) -> None:
        raise llama.Unsupported("not here")

    monkeypatch.setattr(llama, "read", refuse)
    model, tok = loading.load_base(tiny_dir)
    without = reward.fit_reward_model(model, tok, data, config, progress=False)
    assert len(calls) == config.steps  # this fit took one row per completion
    assert with_sharing.train_loss == pytest.approx(without.train_loss, rel=1e-3)
