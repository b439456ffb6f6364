"""Pure math for PPO-ptx (Ouyang et al. 2022): KL-shaped rewards, GAE, clipped losses.

Everything here imports only torch and takes tensors and masks. A mask is a (B, T) bool or 0/1
tensor marking the response tokens of each row; rows are right-padded (the response is one
contiguous span, padding after it). The two KL controllers are the only objects with state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import torch

from flywheel_learner.losses import masked_token_nll

KLKind = Literal["k1", "k2", "k3"]


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B, T), 0 on masked-out positions
    returns: torch.Tensor  # (B, T), advantages + values: the value head's target


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # scalar metric (detached): share of tokens whose ratio was cut
    approx_kl: torch.Tensor  # scalar metric (detached): KL(old || new) estimate, k3


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # scalar metric (detached): share of tokens whose value was cut


# --- masked statistics -------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is set; 0 where nothing is set.

    x, mask: (B, T) -> scalar, or reduced along `dim`. Masked-out entries are selected away,
    not multiplied by 0, so a NaN or inf in padding (e.g. a -inf log-prob) cannot leak in.
    """
    keep = mask.bool()  # (B, T)
    total = torch.where(keep, x, torch.zeros_like(x))  # (B, T)
    count = keep.to(x.dtype)  # (B, T)
    if dim is None:
        return total.sum() / count.sum().clamp(min=1.0)
    return total.sum(dim) / count.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the entries where `mask` is set. x, mask: (B, T) -> scalar.

    unbiased=True applies Bessel's correction n / (n - 1), which needs at least 2 entries.
    """
    centred = x - masked_mean(x, mask)  # (B, T)
    var = masked_mean(centred**2, mask)  # scalar
    if not unbiased:
        return var
    n = int(mask.bool().sum())
    if n < 2:
        raise ValueError(
            f"masked_var with unbiased=True needs at least 2 masked entries, got {n}; "
            "pass unbiased=False for the population variance"
        )
    return var * n / (n - 1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_sum: Callable[[torch.Tensor], torch.Tensor] = _identity,
) -> torch.Tensor:
    """Whiten `x` to zero mean and unit (population) variance over the masked entries.

    x, mask: (B, T) -> (B, T), 0 on masked-out entries. shift_mean=False only rescales, keeping
    the mean (used for rewards, whose sign carries meaning). Population variance, so a single
    masked entry whitens to 0 instead of raising. all_sum sums a tensor over data-parallel
    ranks, so that each rank's shard is whitened with the statistics of the global batch.
    """
    keep = mask.bool()  # (B, T)
    zeros = torch.zeros_like(x)
    count = all_sum(keep.to(x.dtype).sum()).clamp(min=1.0)  # scalar
    mean = all_sum(torch.where(keep, x, zeros).sum()) / count  # scalar
    var = all_sum(torch.where(keep, (x - mean) ** 2, zeros).sum()) / count  # scalar
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, zeros)


# --- KL estimators (Schulman, "Approximating KL divergence", 2020) -------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log(pi / pi_ref): unbiased for KL(pi || pi_ref), high variance, can be negative.

    logp, ref_logp: (B, T) log-probs of the sampled tokens -> (B, T). InstructGPT eq. 2's term.
    """
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log pi - log pi_ref)^2: biased, low variance, always >= 0. (B, T) -> (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, low variance, always >= 0.

    (B, T) -> (B, T). expm1 keeps precision when the policies are close (r near 1).
    """
    log_r = ref_logp - logp  # (B, T)
    return torch.expm1(log_r) - log_r


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate by name: "k1", "k2" or "k3". (B, T) -> (B, T)."""
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl kind must be one of 'k1', 'k2', 'k3', got {kind!r}")


# --- rewards and advantages ---------------------------------------------------------------------


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last set position of each row. mask: (B, T) -> (B,) long; 0 for empty rows."""
    positions = torch.arange(mask.shape[1], device=mask.device)  # (T,)
    return (mask.bool().long() * positions).argmax(dim=1)  # (B,)


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each score minus the mean of the others sampled for the same prompt (RLOO's baseline).

    scores: (B,), B/group_size consecutive groups of one prompt's samples -> (B,). The baseline
    leaves the sample's own score out, so it does not bias that sample's gradient; a group of 1
    has no others and is returned unchanged.
    """
    if group_size == 1:
        return scores
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)  # (B/K, K)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)  # (B/K, K)
    return (groups - others).view(-1)


def kl_shaped_rewards(
    score: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    kind: KLKind = "k1",
) -> torch.Tensor:
    """Per-token reward of InstructGPT eq. 2: R(x, y) = r(x, y) - beta log(pi(y|x) / pi_SFT(y|x)).

    score: (B,) reward-model score; logp, ref_logp, mask: (B, T) -> (B, T). The KL penalty is
    paid on every response token and the score arrives at the last one (0 on padding).
    """
    keep = mask.bool()  # (B, T)
    penalty = -beta * kl_estimate(logp, ref_logp, kind)  # (B, T)
    rewards = torch.where(keep, penalty, torch.zeros_like(penalty))  # (B, T)
    final = (score * keep.any(dim=1)).to(rewards.dtype)  # (B,), an empty row gets no score
    return rewards.scatter_add(1, last_token_index(mask)[:, None], final[:, None])


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> Advantages:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16), a reverse scan over T.

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1}.
    rewards, values, mask: (B, T), right-padded: V and A after a row's last token count as 0.
    Pass detached values: the result is a regression target, not part of the graph.
    """
    keep = mask.to(values.dtype)  # (B, T)
    rewards, values = rewards * keep, values * keep  # (B, T)
    advantages = torch.zeros_like(values)  # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        next_advantage = (delta + gamma * lam * next_advantage) * keep[:, t]  # (B,)
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return Advantages(advantages, advantages + values)


# --- losses -------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated, token-level masked mean.

    loss = -min(ratio A, clip(ratio, 1 - e, 1 + e) A), ratio = pi / pi_old. logp, old_logp,
    advantages, mask: (B, T). clip_fraction counts tokens where the clipped term won (no gradient).
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = ratio * advantages  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages  # (B, T)
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped < unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(kl_k3(old_logp, logp), mask)  # samples come from pi_old
    return PolicyLoss(loss, clip_fraction, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> ValueLoss:
    """Clipped value loss: 0.5 max((v - R)^2, (v_old + clip(v - v_old, -e, e) - R)^2), masked mean.

    The value-function analogue of PPO's ratio clip (Schulman et al. 2017's released code).
    values, old_values, returns, mask: (B, T).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    unclipped_error = (values - returns) ** 2  # (B, T)
    clipped_error = (clipped_values - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return ValueLoss(loss, clip_fraction)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pretraining NLL, the ptx term of InstructGPT eq. 2 (as a loss: -log pi(x), x ~ D_pretrain).

    logits: (B, T, V) already shifted to predict labels: (B, T); mask: (B, T) -> scalar.
    """
    return masked_token_nll(logits, labels, mask)


def ppo_objective(policy: PolicyLoss, value: ValueLoss, vf_coef: float) -> torch.Tensor:
    """Plain PPO loss: policy + vf_coef * value (Schulman et al. 2017, eq. 9, without entropy)."""
    return policy.loss + vf_coef * value.loss


def ppo_ptx_objective(
    policy: PolicyLoss,
    value: ValueLoss,
    ptx: torch.Tensor | None,
    vf_coef: float,
    gamma_ptx: float,
) -> torch.Tensor:
    """PPO-ptx loss (InstructGPT eq. 2, negated): policy + vf_coef * value + gamma_ptx * ptx.

    gamma_ptx == 0 or ptx None returns `ppo_objective` itself, the same tensor value and graph:
    adding 0 * ptx would turn a NaN or inf ptx into a NaN loss and NaN gradients.
    """
    if gamma_ptx < 0:
        raise ValueError(f"gamma_ptx must be >= 0, got {gamma_ptx}")
    total = ppo_objective(policy, value, vf_coef)
    if ptx is None or gamma_ptx == 0:
        return total
    return total + gamma_ptx * ptx


# --- micro-batching ------------------------------------------------------------------------------


def microbatch_weight(mask_mb: torch.Tensor, mask_full: torch.Tensor | int) -> float:
    """Weight of one micro-batch's token-level masked-mean loss in gradient accumulation.

    Its share of the batch's masked tokens, so sum_k w_k mean_k = the full batch's masked mean.
    mask_full is the batch's mask or its token count: under data parallelism, the global
    minibatch's count (summed over ranks), so the ranks' weighted losses add up to its mean.
    """
    total = mask_full if isinstance(mask_full, int) else int(mask_full.bool().sum())
    return int(mask_mb.bool().sum()) / total if total else 0.0


def token_weighted_microbatches(
    mask: torch.Tensor, n: int, total_tokens: int | None = None
) -> list[tuple[slice, float]]:
    """Split the B rows of `mask` (B, T) into n contiguous micro-batches with their weights.

    Sizes differ by at most one row; weights come from `microbatch_weight` and sum to 1, or
    to this batch's share of `total_tokens` when given (a data-parallel shard).
    """
    rows = mask.shape[0]
    if not 1 <= n <= rows:
        raise ValueError(f"number of micro-batches must be between 1 and {rows} rows, got {n}")
    size, extra = divmod(rows, n)  # the first `extra` micro-batches take one more row
    starts = [k * size + min(k, extra) for k in range(n + 1)]
    slices = [slice(starts[k], starts[k + 1]) for k in range(n)]
    total = mask if total_tokens is None else total_tokens
    return [(part, microbatch_weight(mask[part], total)) for part in slices]


# --- KL coefficient control (Ziegler et al. 2019, section 2.2) -----------------------------------


class KLController(Protocol):
    beta: float

    def update(self, current_kl: float, n_steps: int) -> float: ...


class FixedKLController:
    """A constant KL coefficient beta (InstructGPT uses 0.02), same interface as the adaptive one."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta


class AdaptiveKLController:
    """Proportional control of beta toward a target KL (Ziegler et al. 2019, eq. 3).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta (1 + e n_steps / horizon).
    Clipping the error keeps one noisy KL reading from moving beta by more than 20% per horizon.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if init_beta <= 0:
            raise ValueError(f"init_beta must be > 0 for adaptive control, got {init_beta}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0 steps, got {horizon}")
        self.beta = init_beta
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta
