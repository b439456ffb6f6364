import math

import pytest
import torch

from flywheel_learner.losses import masked_token_nll, pairwise_accuracy, ranking_loss

pytestmark = pytest.mark.unit


def nll(margin: float) -> float:
    """-log sigmoid(margin), by hand."""
    return math.log1p(math.exp(-margin))


def test_masked_token_nll_averages_only_masked_tokens() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # (1, 3, 2)
    labels = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[False, True, True]])
    expected = (-math.log(0.1) - math.log(0.8)) / 2
    assert masked_token_nll(logits, labels, mask).item() == pytest.approx(expected, rel=1e-5)


def test_masked_token_nll_is_zero_with_an_empty_mask() -> None:
    logits = torch.zeros(2, 3, 4)
    assert (
        masked_token_nll(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)).item()
        == 0.0
    )


def test_ranking_loss_three_completions_by_hand() -> None:
    rewards = torch.tensor([2.0, 1.0, -1.0])
    tiers = torch.tensor([0, 1, 2])  # 0 > 1 > 2: pairs (0,1), (0,2), (1,2)
    group = torch.tensor([0, 0, 0])
    expected = (nll(1.0) + nll(3.0) + nll(2.0)) / 3
    assert ranking_loss(rewards, tiers, group).item() == pytest.approx(expected, rel=1e-6)


def test_ties_produce_no_pair() -> None:
    rewards = torch.tensor([0.5, 3.0, -2.0])
    tiers = torch.tensor([0, 0, 1])  # 0 and 1 tied; pairs (0,2), (1,2) only
    group = torch.zeros(3, dtype=torch.long)
    expected = (nll(2.5) + nll(5.0)) / 2
    assert ranking_loss(rewards, tiers, group).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(rewards, tiers, group) == 1.0


def test_k_way_loss_equals_the_mean_of_its_pairwise_losses() -> None:
    torch.manual_seed(0)
    rewards = torch.randn(5)
    tiers = torch.tensor([3, 0, 2, 1, 4])
    k_way = ranking_loss(rewards, tiers, torch.zeros(5, dtype=torch.long))
    pairwise = [
        ranking_loss(rewards[[i, j]], tiers[[i, j]], torch.zeros(2, dtype=torch.long))
        for i in range(5)
        for j in range(i + 1, 5)
    ]
    assert len(pairwise) == 10  # C(5, 2)
    assert k_way.item() == pytest.approx(torch.stack(pairwise).mean().item(), rel=1e-6)


def test_groups_are_averaged_separately_then_equally() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 0.0])
    tiers = torch.tensor([0, 1, 0, 1, 2, 3])
    group = torch.tensor([7, 7, 3, 3, 3, 3])  # ids need not be contiguous
    group7 = nll(1.0)
    group3 = (nll(-2.0) + nll(-1.0) + nll(0.0) + nll(1.0) + nll(2.0) + nll(1.0)) / 6
    expected = (group7 + group3) / 2
    assert ranking_loss(rewards, tiers, group).item() == pytest.approx(expected, rel=1e-6)


def test_all_tied_groups_are_left_out_and_gradients_flow() -> None:
    rewards = torch.tensor([1.0, 2.0, 0.5, -0.5], requires_grad=True)
    tiers = torch.tensor([0, 0, 0, 1])
    group = torch.tensor([0, 0, 1, 1])
    loss = ranking_loss(rewards, tiers, group)
    assert loss.item() == pytest.approx(nll(1.0), rel=1e-6)
    loss.backward()
    assert rewards.grad is not None
    assert rewards.grad[:2].abs().sum().item() == 0.0
    assert rewards.grad[2].item() < 0 < rewards.grad[3].item()


def test_no_pair_at_all_gives_zero_loss() -> None:
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = ranking_loss(rewards, torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert loss.item() == 0.0
    loss.backward()


def test_pairwise_accuracy_counts_pairs_across_groups() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 1.0, 0.0])
    tiers = torch.tensor([0, 1, 0, 1, 2])
    group = torch.tensor([0, 0, 1, 1, 1])
    # group 0: (0,1) wrong; group 1: (2,3) right, (2,4) right, (3,4) right
    assert pairwise_accuracy(rewards, tiers, group) == pytest.approx(3 / 4)
    assert math.isnan(pairwise_accuracy(rewards, torch.zeros(5), group))
