import math
from collections.abc import Callable

import pytest
import torch

from flywheel_learner.ppo_math import (
    AdaptiveKLController,
    Advantages,
    FixedKLController,
    gae,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_shaped_rewards,
    leave_one_out,
    masked_mean,
    masked_var,
    masked_whiten,
    microbatch_weight,
    policy_loss,
    ppo_objective,
    ppo_ptx_objective,
    ptx_loss,
    token_weighted_microbatches,
    value_loss,
)

pytestmark = pytest.mark.unit


def gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Advantages:
    """Reference GAE as a plain double loop over rows and time, to compare `gae` with.

    Same equations and shapes as `gae`; each row's response ends at its last masked position.
    """
    batch, steps = rewards.shape
    advantages = torch.zeros(batch, steps, dtype=torch.float64)
    returns = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        running = 0.0
        for t in reversed(range(steps)):
            if not bool(mask[b, t]):
                running = 0.0
                continue
            inside = t + 1 < steps and bool(mask[b, t + 1])
            next_value = float(values[b, t + 1]) if inside else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * (running if inside else 0.0)
            advantages[b, t] = running
            returns[b, t] = running + float(values[b, t])
    return Advantages(advantages.to(rewards.dtype), returns.to(rewards.dtype))


def right_padded_mask(lengths: list[int], steps: int) -> torch.Tensor:
    return torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


# --- masked statistics -------------------------------------------------------------------------


def test_masked_mean_uses_only_masked_entries_and_ignores_nan_padding() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3
    per_row = masked_mean(x, mask, dim=1)  # row 0: (1 + 2) / 2, row 1: 4 / 1
    assert torch.allclose(per_row, torch.tensor([1.5, 4.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_hand_values() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # entries 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(42 / 9 / 3)
    assert masked_var(x, mask).item() == pytest.approx(42 / 9 / 2)
    with pytest.raises(ValueError, match="at least 2 masked entries, got 1"):
        masked_var(x, torch.tensor([[True, False, False], [False, False, False]]))


def test_masked_whiten_gives_zero_mean_unit_variance_over_masked_entries() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64) * 3 + 2
    mask = right_padded_mask([9, 5, 1, 7], 9)
    whitened = masked_whiten(x, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(whitened, mask, unbiased=False).item() == pytest.approx(1.0, rel=1e-6)
    assert bool((whitened[~mask] == 0).all())
    # masked-out entries take no part: changing them changes nothing
    noisy = torch.where(mask, x, torch.full_like(x, 1e6))
    assert torch.equal(masked_whiten(noisy, mask), whitened)


def test_masked_whiten_without_shift_keeps_the_mean() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 6, dtype=torch.float64) + 5
    mask = right_padded_mask([6, 2, 4], 6)
    scaled = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(scaled, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(scaled, mask, unbiased=False).item() == pytest.approx(1.0, rel=1e-6)


def test_masked_whiten_of_a_single_entry_is_zero_not_an_error() -> None:
    x = torch.tensor([[3.0, 9.0]])
    assert torch.equal(masked_whiten(x, torch.tensor([[True, False]])), torch.zeros(1, 2))


# --- KL estimators ------------------------------------------------------------------------------


def test_kl_estimators_hand_values() -> None:
    logp = torch.tensor([math.log(0.5)])
    ref_logp = torch.tensor([math.log(0.25)])
    # log(pi / ref) = log 2; k2 = (log 2)^2 / 2; r = ref / pi = 0.5, k3 = (0.5 - 1) - log 0.5
    assert kl_k1(logp, ref_logp).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref_logp).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(logp, ref_logp).item() == pytest.approx(-0.5 + math.log(2))
    for kind, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        assert torch.equal(kl_estimate(logp, ref_logp, kind), fn(logp, ref_logp))  # type: ignore[arg-type]


def test_kl_estimate_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3', got 'k4'"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


def test_k3_is_never_negative_and_all_estimators_vanish_when_equal() -> None:
    torch.manual_seed(2)
    logp = torch.randn(64, 32) * 10
    ref_logp = torch.randn(64, 32) * 10
    assert bool((kl_k3(logp, ref_logp) >= 0).all())
    assert bool((kl_k3(logp, logp + 1e-7) >= 0).all())
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(logp, logp, kind), torch.zeros_like(logp))  # type: ignore[arg-type]


# --- KL-shaped rewards --------------------------------------------------------------------------


def test_kl_shaped_rewards_put_the_score_on_the_last_response_token() -> None:
    mask = right_padded_mask([3, 2, 0], 4)
    logp = torch.zeros(3, 4).masked_fill(~mask, float("-inf"))  # padding may hold anything
    ref_logp = torch.full((3, 4), -0.5)
    score = torch.tensor([1.0, 2.0, 7.0])
    rewards = kl_shaped_rewards(score, logp, ref_logp, mask, beta=0.1)
    # KL_t = 0 - (-0.5) = 0.5, so -beta KL = -0.05 per token; score added at the last token;
    # the empty row gets neither
    expected = torch.tensor(
        [
            [-0.05, -0.05, -0.05 + 1.0, 0.0],
            [-0.05, -0.05 + 2.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert torch.allclose(rewards, expected)


def test_kl_shaped_rewards_use_the_chosen_estimator() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp, ref_logp = torch.tensor([[0.0, -1.0]]), torch.tensor([[-1.0, 0.0]])
    rewards = kl_shaped_rewards(torch.tensor([0.0]), logp, ref_logp, mask, beta=2.0, kind="k2")
    # k2 = 0.5 * (±1)^2 = 0.5 on both tokens; -2 * 0.5 = -1
    assert torch.allclose(rewards, torch.tensor([[-1.0, -1.0]]))


def test_leave_one_out_subtracts_the_mean_of_the_other_samples_of_the_prompt() -> None:
    scores = torch.tensor([1.0, 2.0, 6.0, -3.0, 0.0, 3.0])
    # two prompts of 3: 1 - (2 + 6) / 2 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; -3 - 1.5 = -4.5, ...
    expected = torch.tensor([-3.0, -1.5, 4.5, -4.5, 0.0, 4.5])
    assert torch.equal(leave_one_out(scores, 3), expected)
    assert torch.equal(leave_one_out(scores, 1), scores)  # nothing to compare with
    # pairs: each score minus the other one
    assert torch.allclose(leave_one_out(scores, 2), torch.tensor([-1.0, 1.0, 9.0, -9.0, -3.0, 3.0]))


def test_leave_one_out_rejects_a_batch_that_does_not_split_into_groups() -> None:
    with pytest.raises(ValueError, match="5 scores do not split into groups of 2"):
        leave_one_out(torch.zeros(5), 2)


# --- GAE ----------------------------------------------------------------------------------------


def test_gae_three_steps_by_hand() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)
    mask = right_padded_mask([3], 4)  # the 4th step is padding: its reward and value are ignored
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72
    # t=2: delta = 1 + 0.9 * 0 - 0.7 = 0.3;           A2 = 0.3
    # t=1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03;        A1 = 0.03 + 0.72 * 0.3 = 0.246
    # t=0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04;        A0 = 0.04 + 0.72 * 0.246 = 0.21712
    expected_adv = torch.tensor([[0.21712, 0.246, 0.3, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[0.71712, 0.846, 1.0, 0.0]], dtype=torch.float64)  # A + V
    for fn in (gae, gae_loop):
        result = fn(rewards, values, mask, gamma=0.9, lam=0.8)
        assert torch.allclose(result.advantages, expected_adv, atol=1e-12)
        assert torch.allclose(result.returns, expected_ret, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 1.0)])
def test_vectorised_gae_equals_the_loop(seed: int, gamma: float, lam: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch, steps = 6, 9
    rewards = torch.randn(batch, steps, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, steps, generator=generator, dtype=torch.float64)
    lengths = torch.randint(0, steps + 1, (batch,), generator=generator).tolist()
    lengths[0] = steps  # one full row, so the last step is exercised without padding
    mask = right_padded_mask(lengths, steps)
    fast, slow = gae(rewards, values, mask, gamma, lam), gae_loop(rewards, values, mask, gamma, lam)
    assert torch.allclose(fast.advantages, slow.advantages, atol=1e-12)
    assert torch.allclose(fast.returns, slow.returns, atol=1e-12)
    assert bool((fast.advantages[~mask] == 0).all())


def test_gae_with_lambda_one_returns_the_discounted_reward_to_go() -> None:
    torch.manual_seed(3)
    rewards = torch.randn(1, 5, dtype=torch.float64)
    values = torch.randn(1, 5, dtype=torch.float64)
    gamma = 0.9
    returns = gae(rewards, values, torch.ones(1, 5), gamma, lam=1.0).returns
    to_go = [sum(gamma ** (s - t) * rewards[0, s].item() for s in range(t, 5)) for t in range(5)]
    assert torch.allclose(returns[0], torch.tensor(to_go, dtype=torch.float64), atol=1e-12)


# --- PPO losses ---------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    advantages = torch.tensor([[1.0, -4.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    result = policy_loss(logp, logp.clone(), advantages, mask, clip=0.2)
    assert result.loss.item() == pytest.approx(1.5)  # -(1 - 4) / 2
    assert result.clip_fraction.item() == 0.0
    assert result.approx_kl.item() == 0.0


def test_policy_loss_hand_values_with_clipping() -> None:
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 3.0]])
    advantages = torch.tensor([[2.0, -2.0, 1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    old_logp = torch.full((1, 5), -1.0)
    logp = (old_logp + ratios.log()).requires_grad_()
    result = policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    # token 1: min(1.5 * 2, 1.2 * 2) = 2.4, clipped        -> -2.4
    # token 2: min(1.5 * -2, 1.2 * -2) = -3, not clipped   -> 3
    # token 3: min(0.5 * 1, 0.8 * 1) = 0.5, not clipped    -> -0.5
    # token 4: min(0.5 * -1, 0.8 * -1) = -0.8, clipped     -> 0.8
    assert result.loss.item() == pytest.approx((-2.4 + 3 - 0.5 + 0.8) / 4)
    assert result.clip_fraction.item() == pytest.approx(2 / 4)
    # k3 of KL(old || new) with r = ratio: (r - 1) - log r
    k3 = [(r - 1) - math.log(r) for r in (1.5, 1.5, 0.5, 0.5)]
    assert result.approx_kl.item() == pytest.approx(sum(k3) / 4, rel=1e-5)
    result.loss.backward()
    assert logp.grad is not None
    # clipped tokens and padding get no gradient; unclipped ones get -ratio * A / 4
    expected = torch.tensor([[0.0, 1.5 * 2 / 4, -0.5 * 1 / 4, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected)


def test_value_loss_hand_values_with_clipping() -> None:
    values = torch.tensor([[1.0, 1.0, 0.0, 50.0]])
    old_values = torch.tensor([[0.5, 0.9, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 2.0, -50.0]])
    mask = torch.tensor([[True, True, True, False]])
    result = value_loss(values, old_values, returns, mask, clip=0.2)
    # token 1: v_clip = 0.5 + 0.2 = 0.7; max(0^2, 0.3^2) = 0.09, the clipped term wins
    # token 2: v - v_old = 0.1 is inside the clip; max(1, 1) = 1
    # token 3: v_clip = 0.5 - 0.2 = 0.3; max(2^2, 1.7^2) = 4, the unclipped term wins
    assert result.loss.item() == pytest.approx(0.5 * (0.09 + 1 + 4) / 3)
    assert result.clip_fraction.item() == pytest.approx(1 / 3)


def test_ptx_loss_is_the_masked_token_nll() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))  # (1, 3, 2)
    labels = torch.tensor([[0, 1, 1]])
    mask = torch.tensor([[False, True, True]])
    expected = (-math.log(0.1) - math.log(0.8)) / 2
    assert ptx_loss(logits, labels, mask).item() == pytest.approx(expected, rel=1e-5)


# --- PPO-ptx: gamma = 0 is plain PPO ------------------------------------------------------------


def tiny_policy_batch(
    model: torch.nn.Linear, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, actions, old log-probs, old values, advantages, returns for a linear policy.

    model maps 5 features to 3 action logits plus 1 value; shapes (B, T, ...) with B=6, T=5.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(6, 5, 5, generator=generator)  # (B, T, F)
    actions = torch.randint(0, 3, (6, 5), generator=generator)  # (B, T)
    with torch.no_grad():
        logp, values = forward_policy(model, features, actions)
    old_logp = logp + 0.3 * torch.randn(6, 5, generator=generator)  # (B, T)
    old_values = values + 0.3 * torch.randn(6, 5, generator=generator)  # (B, T)
    advantages = torch.randn(6, 5, generator=generator)  # (B, T)
    returns = torch.randn(6, 5, generator=generator)  # (B, T)
    return features, actions, old_logp, old_values, advantages, returns


def forward_policy(
    model: torch.nn.Linear, features: torch.Tensor, actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(features)  # (B, T, 4)
    logp = out[..., :3].log_softmax(-1).gather(-1, actions[..., None]).squeeze(-1)  # (B, T)
    return logp, out[..., 3]


def gradients(model: torch.nn.Module, objective: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_gamma_zero_gives_plain_ppo_exactly() -> None:
    torch.manual_seed(4)
    model = torch.nn.Linear(5, 4)
    features, actions, old_logp, old_values, advantages, returns = tiny_policy_batch(model, 0)
    mask = right_padded_mask([5, 3, 1, 4, 5, 2], 5)
    ptx_labels = torch.randint(0, 3, (6, 5))

    def losses(ptx_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logp, values = forward_policy(model, features, actions)
        pl = policy_loss(logp, old_logp, advantages, mask, clip=0.2)
        vl = value_loss(values, old_values, returns, mask, clip=0.2)
        ptx = ptx_loss(model(features)[..., :3], ptx_labels, mask) * ptx_scale
        plain = pl.loss + 0.5 * vl.loss  # written out here, not through ppo_objective
        with_ptx = ppo_ptx_objective(pl, vl, ptx, vf_coef=0.5, gamma_ptx=0.0)
        mixed = ppo_ptx_objective(pl, vl, ptx, vf_coef=0.5, gamma_ptx=1.0)
        return plain, with_ptx, mixed

    plain_grads = gradients(model, lambda: losses(1.0)[0])
    for ptx_scale in (1.0, float("nan")):  # a NaN ptx must not leak in through 0 * ptx
        plain, with_ptx, _ = losses(ptx_scale)
        assert torch.equal(with_ptx, plain)
        zero_grads = gradients(model, lambda s=ptx_scale: losses(s)[1])  # type: ignore[misc]
        assert len(zero_grads) == len(plain_grads) == 2
        assert all(torch.equal(a, b) for a, b in zip(zero_grads, plain_grads, strict=True))
    mixed_grads = gradients(model, lambda: losses(1.0)[2])  # gamma > 0 does change the update
    assert not all(torch.equal(a, b) for a, b in zip(mixed_grads, plain_grads, strict=True))


def test_ppo_ptx_objective_without_ptx_and_bad_gamma() -> None:
    zeros, ones = torch.zeros(1, 1), torch.ones(1, 1)
    pl = policy_loss(zeros, zeros, ones, ones, clip=0.2)  # ratio 1, A = 1: loss -1
    vl = value_loss(ones, ones, zeros, ones, clip=0.2)  # 0.5 * (1 - 0)^2 = 0.5
    assert ppo_objective(pl, vl, vf_coef=2.0).item() == pytest.approx(0.0)  # -1 + 2 * 0.5
    assert torch.equal(ppo_ptx_objective(pl, vl, None, 2.0, 27.8), ppo_objective(pl, vl, 2.0))
    mixed = ppo_ptx_objective(pl, vl, torch.tensor(3.0), vf_coef=2.0, gamma_ptx=0.5)
    assert mixed.item() == pytest.approx(1.5)  # 0 + 0.5 * 3
    with pytest.raises(ValueError, match="gamma_ptx must be >= 0, got -1"):
        ppo_ptx_objective(pl, vl, None, vf_coef=2.0, gamma_ptx=-1.0)


# --- micro-batching -----------------------------------------------------------------------------


def test_token_weighted_microbatches_split_rows_and_weigh_by_tokens() -> None:
    mask = right_padded_mask([1, 2, 3, 0, 4], 4)
    parts = token_weighted_microbatches(mask, 2)
    # rows 0-2 hold 1 + 2 + 3 = 6 of the 10 tokens, rows 3-4 hold 0 + 4 = 4
    assert parts == [(slice(0, 3), pytest.approx(0.6)), (slice(3, 5), pytest.approx(0.4))]
    assert [p for p, _ in token_weighted_microbatches(mask, 5)] == [
        slice(k, k + 1) for k in range(5)
    ]
    assert microbatch_weight(mask[:1], torch.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError, match="between 1 and 5 rows, got 6"):
        token_weighted_microbatches(mask, 6)


def test_microbatch_accumulation_equals_one_large_batch() -> None:
    torch.manual_seed(5)
    model = torch.nn.Linear(5, 4)
    features, actions, old_logp, old_values, advantages, returns = tiny_policy_batch(model, 1)
    mask = right_padded_mask([5, 1, 2, 5, 3, 4], 5)  # uneven lengths: plain 1/k weights are wrong

    def objective(rows: slice) -> torch.Tensor:
        logp, values = forward_policy(model, features[rows], actions[rows])
        pl = policy_loss(logp, old_logp[rows], advantages[rows], mask[rows], clip=0.2)
        vl = value_loss(values, old_values[rows], returns[rows], mask[rows], clip=0.2)
        return ppo_objective(pl, vl, vf_coef=0.5)

    def accumulated(weighted: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        parts = token_weighted_microbatches(mask, 3)
        for rows, weight in parts:
            (objective(rows) * (weight if weighted else 1 / len(parts))).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full = gradients(model, lambda: objective(slice(None)))
    weighted = accumulated(weighted=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weighted, full, strict=True))
    naive = accumulated(weighted=False)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(naive, full, strict=True))


# --- KL controllers -----------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_beta_toward_the_target() -> None:
    # KL 9 vs target 6: error 9/6 - 1 = 0.5, clipped to 0.2; beta = 0.1 * (1 + 0.2 * 256/10000)
    above = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert above.update(9.0, n_steps=256) == pytest.approx(0.1 * 1.00512)
    assert above.beta == pytest.approx(0.100512)
    # KL 3: error -0.5, clipped to -0.2; beta = 0.1 * (1 - 0.00512)
    below = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert below.update(3.0, n_steps=256) == pytest.approx(0.099488)
    # KL 6.6: error 0.1 is inside the clip; beta = 0.1 * (1 + 0.1 * 256/10000)
    near = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert near.update(6.6, n_steps=256) == pytest.approx(0.100256)
    on_target = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    assert on_target.update(6.0, n_steps=256) == pytest.approx(0.1)


def test_adaptive_kl_controller_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="target KL must be > 0, got 0"):
        AdaptiveKLController(init_beta=0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon must be > 0 steps, got 0"):
        AdaptiveKLController(init_beta=0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="init_beta must be > 0"):
        AdaptiveKLController(init_beta=0.0, target=1.0, horizon=10)


def test_fixed_kl_controller_keeps_beta() -> None:
    fixed = FixedKLController(0.02)
    assert fixed.update(100.0, n_steps=1000) == 0.02
    assert fixed.beta == 0.02
    with pytest.raises(ValueError, match="beta must be >= 0"):
        FixedKLController(-1.0)
