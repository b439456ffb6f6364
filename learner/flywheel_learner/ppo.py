"""PPO-ptx (InstructGPT step 3): one step, from sampling to the optimiser.

A step reads top to bottom in `ppo_step`: sample -> score -> log-probs and values -> KL-shaped
rewards -> GAE -> whitened advantages -> epochs of shuffled minibatches (micro-batched) of
policy + value + gamma_ptx * pretraining loss -> one clipped optimiser step per minibatch.
The math is in `ppo_math`; the models are `ppo_models.SharedBaseModels`; this module only
moves tensors between them.

Tensors of a rollout are (B, R): B rows, R response columns, right-padded (`mask` marks the
response tokens up to and including eos). Column t holds the token at sequence position P + t
(P = the left-padded prompt width), its log-prob and the value of the state before it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from flywheel_learner import distributed, token_budget
from flywheel_learner.ppo_math import (
    KLController,
    gae,
    kl_k1,
    kl_shaped_rewards,
    leave_one_out,
    masked_whiten,
    microbatch_weight,
    policy_loss,
    ppo_objective,
    token_weighted_microbatches,
    value_loss,
)

if TYPE_CHECKING:
    pass

from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ppo_models import SharedBaseModels
from flywheel_learner.ptx_data import PtxBatch

# --- rollouts ----------------------------------------------------------------------------------


class Samples(NamedTuple):
    prompts: list[str]
    responses: list[str]  # decoded, special tokens dropped: what the reward model reads
    ids: torch.Tensor  # (B, L) left-padded prompt + right-padded response
    attention: torch.Tensor  # (B, L)
    start: int  # P: the prompt width, where every response begins
    mask: torch.Tensor  # (B, R) bool: response tokens up to and including the first eos

    def select(self, rows: slice) -> Samples:
        """These rows; the widths (and `start`) stay the batch's."""
        return Samples(
            self.prompts[rows], self.responses[rows], self.ids[rows], self.attention[rows],
            self.start, self.mask[rows],
        )  # fmt: skip


class Rollout(NamedTuple):
    ids: torch.Tensor  # (B, L)
    attention: torch.Tensor  # (B, L)
    start: int
    mask: torch.Tensor  # (B, R)
    logp: torch.Tensor  # (B, R) pi_old
    ref_logp: torch.Tensor  # (B, R) pi_SFT
    values: torch.Tensor  # (B, R) V_old
    advantages: torch.Tensor  # (B, R) whitened
    returns: torch.Tensor  # (B, R) value targets
    scores: torch.Tensor  # (B,) reward-model scores
    beta: float  # the KL coefficient the rewards were shaped with

    def select(self, rows: torch.Tensor | slice) -> Rollout:
        """These rows of every per-row tensor; `start` and `beta` are the batch's."""
        r = rows
        return Rollout(
            self.ids[r], self.attention[r], self.start, self.mask[r], self.logp[r],
            self.ref_logp[r], self.values[r], self.advantages[r], self.returns[r],
            self.scores[r], self.beta,
        )  # fmt: skip

    def trimmed(self) -> Rollout:
        """Without the columns no row of this micro-batch attends: prompt padding on the left,
        response padding past every row's eos on the right. The same losses over fewer tokens
        (positions follow the attention mask), for short rows cut from a batch with a long one."""
        cut, width = window(self.attention, self.mask, self.start)
        c = slice(0, width)
        return Rollout(
            self.ids[:, cut : self.start + width], self.attention[:, cut : self.start + width],
            self.start - cut, self.mask[:, c], self.logp[:, c], self.ref_logp[:, c],
            self.values[:, c], self.advantages[:, c], self.returns[:, c], self.scores, self.beta,
        )  # fmt: skip


def window(attention: torch.Tensor, mask: torch.Tensor, start: int) -> tuple[int, int]:
    """(first attended prompt column, response columns up to the last eos) of these rows.
    attention: (B, L); mask: (B, R) -> (cut, width), width >= 1."""
    attended = attention[:, :start].bool().any(dim=0).nonzero()
    cut = int(attended[0]) if len(attended) else start
    width = max(1, int(mask.sum(dim=1).max())) if len(mask) else 1
    return min(cut, start - 1), width


def row_tokens(attention: torch.Tensor, mask: torch.Tensor, start: int) -> list[int]:
    """Tokens each row's forward holds: its prompt without padding, plus its response."""
    return (attention[:, :start].sum(dim=1) + mask.sum(dim=1)).tolist()


def by_budget(
    fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], s: Samples, budget: int
) -> torch.Tensor:
    """fn(ids, attention, start) -> (B, R) over all rows, in forwards of at most `budget`
    padded tokens (`token_budget.pack`, each part trimmed to its `window`); 0: one forward.
    Columns past a row's eos are 0 when split (they are masked wherever they are read)."""
    if budget <= 0:
        return fn(s.ids, s.attention, s.start)
    out = torch.zeros(s.mask.shape, device=s.ids.device)
    for group in token_budget.pack(row_tokens(s.attention, s.mask, s.start), budget):
        rows = torch.tensor(group, device=s.ids.device)
        cut, width = window(s.attention[rows], s.mask[rows], s.start)
        end = s.start + width
        part = fn(s.ids[rows, cut:end], s.attention[rows, cut:end], s.start - cut)
        out[rows, :width] = part.to(out.dtype)
    return out


def response_mask(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Mark each row's tokens up to and including its first eos. tokens: (B, R) -> (B, R) bool."""
    eos_before = (tokens == eos_id).long().cumsum(dim=1) - (tokens == eos_id).long()  # (B, R)
    return eos_before == 0


@torch.no_grad()
def sample_responses(
    models: SharedBaseModels, prompts: Sequence[str], *, greedy: bool = False
) -> Samples:
    """Sample one response per prompt from the policy (left-padded batch, eos or length stop);
    `greedy`: its most likely one."""
    tok = models.tokenizer
    batch = tok(
        list(prompts),
        add_special_tokens=False,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(models.precision.device)
    out = models.policy_generate(batch["input_ids"], batch["attention_mask"], greedy=greedy)
    start = batch["input_ids"].shape[1]
    mask = response_mask(out[:, start:], tok.eos_token_id)  # (B, R)
    tokens = out[:, start:].masked_fill(~mask, tok.pad_token_id)  # (B, R)
    ids = torch.cat([batch["input_ids"], tokens], dim=1)  # (B, L)
    attention = torch.cat([batch["attention_mask"].bool(), mask], dim=1).long()  # (B, L)
    responses = tok.batch_decode(tokens, skip_special_tokens=True)
    return Samples(list(prompts), responses, ids, attention, start, mask)


def collect_rollout(
    models: SharedBaseModels, prompts: Sequence[str], config: PPOConfig, beta: float
) -> Rollout:
    """Sample, score, and turn the scores into whitened per-token advantages."""
    return score_rollout(models, sample_responses(models, prompts), config, beta)


@torch.no_grad()
def score_rollout(models: SharedBaseModels, s: Samples, config: PPOConfig, beta: float) -> Rollout:
    """Score samples and turn the scores into whitened per-token advantages.

    Under torchrun `s` is this rank's shard, whitened with the global batch's statistics.
    """
    scores = models.rewards(s.prompts, s.responses)  # (B,)
    baselined = leave_one_out(scores, config.samples_per_prompt)  # (B,)
    budget = config.max_tokens_per_microbatch
    logp = by_budget(models.policy_logprobs, s, budget)  # (B, R)
    ref_logp = by_budget(models.reference_logprobs, s, budget)  # (B, R)
    values = by_budget(models.values, s, budget)  # (B, R)
    rewards = kl_shaped_rewards(baselined, logp, ref_logp, s.mask, beta, config.kl_estimator)
    adv = gae(rewards, values, s.mask, config.gae_gamma, config.gae_lambda)  # (B, R) each
    advantages = masked_whiten(adv.advantages, s.mask, all_sum=distributed.all_sum)  # (B, R)
    return Rollout(
        s.ids, s.attention, s.start, s.mask, logp, ref_logp, values, advantages, adv.returns,
        scores, beta,
    )  # fmt: skip


# --- optimisation ------------------------------------------------------------------------------


class Metrics(NamedTuple):
    """Token-weighted means over a minibatch, or means over minibatches once `optimise` ends."""

    policy_loss: float
    value_loss: float
    policy_clip_fraction: float  # share of tokens whose ratio was clipped
    value_clip_fraction: float
    approx_kl: float  # KL(pi_old || pi_new), k3; `optimise` reports its last epoch's
    ptx_loss: float = math.nan  # NaN when gamma_ptx == 0 or no ptx batch: never computed


def mean_metrics(parts: Sequence[Metrics], weights: Sequence[float]) -> Metrics:
    columns = zip(*parts, strict=True)  # one tuple per field
    return Metrics(*(sum(w * v for w, v in zip(weights, col, strict=True)) for col in columns))


def ppo_losses(
    models: SharedBaseModels, part: Rollout, config: PPOConfig
) -> tuple[torch.Tensor, Metrics]:
    """policy + vf_coef * value loss of one micro-batch, and its metrics."""
    logp = models.policy_logprobs(part.ids, part.attention, part.start)  # (b, R)
    values = models.values(part.ids, part.attention, part.start)  # (b, R)
    pol = policy_loss(logp, part.logp, part.advantages, part.mask, config.clip)
    val = value_loss(values, part.values, part.returns, part.mask, config.value_clip)
    metrics = (pol.loss, val.loss, pol.clip_fraction, val.clip_fraction, pol.approx_kl)
    return ppo_objective(pol, val, config.vf_coef), Metrics(*(float(m.detach()) for m in metrics))


def _microbatches(
    mask: torch.Tensor, lengths: Sequence[int], config: PPOConfig
) -> Sequence[tuple[slice | torch.Tensor, float]]:
    """Micro-batches of this rank's rows, weighted by their share of the global tokens:
    `config.micro_batches` equal parts, or under `max_tokens_per_microbatch` rows packed by
    their `lengths` (tokens a row's forward holds) so no part pads past the budget."""
    total = int(distributed.all_sum(mask.bool().sum()))
    rows = mask.shape[0]
    if not rows:
        return []
    if config.max_tokens_per_microbatch <= 0:
        return token_weighted_microbatches(mask, min(config.micro_batches, rows), total)
    groups = token_budget.pack(lengths, config.max_tokens_per_microbatch)
    parts = [torch.tensor(g) for g in groups]
    return [(part, microbatch_weight(mask[part], total)) for part in parts]


def accumulate_ppo(models: SharedBaseModels, mb: Rollout, config: PPOConfig) -> Metrics:
    """Backward of the minibatch's token-mean loss, in token-weighted micro-batches."""
    weighted = torch.zeros(len(Metrics._fields) - 1, dtype=torch.double)  # all but ptx_loss
    lengths = row_tokens(mb.attention, mb.mask, mb.start)
    for rows, weight in _microbatches(mb.mask, lengths, config):
        part = mb.select(rows)
        if config.max_tokens_per_microbatch > 0:  # packed by length: drop the shared padding
            part = part.trimmed()
        loss, metrics = ppo_losses(models, part, config)
        (weight * loss).backward()
        weighted += weight * torch.tensor(metrics[:-1], dtype=torch.double)
    return Metrics(*distributed.all_sum(weighted).tolist())


def accumulate_ptx(models: SharedBaseModels, batch: PtxBatch, config: PPOConfig) -> float:
    """Backward of gamma_ptx * the pretraining NLL (InstructGPT eq. 2's last term).

    Every rank holds the same global batch and forwards its own contiguous shard of it.
    """
    batch = batch.select(slice(*distributed.bounds(batch.input_ids.shape[0], *distributed.world())))
    total = torch.zeros((), dtype=torch.double)
    scored = batch.loss_mask[:, 1:]  # (B, T-1), the labels ptx_loss reads
    for rows, weight in _microbatches(scored, batch.attention_mask.sum(dim=1).tolist(), config):
        part = batch.select(rows)
        if config.max_tokens_per_microbatch > 0:
            part = part.trimmed()
        nll = models.pretraining_nll(part)
        (config.gamma_ptx * weight * nll).backward()
        total += weight * float(nll.detach())
    return float(distributed.all_sum(total))


def minibatch_update(
    models: SharedBaseModels,
    optimizer: torch.optim.Optimizer,
    mb: Rollout,
    ptx_batch: PtxBatch | None,
    config: PPOConfig,
) -> Metrics:
    """One optimiser step on policy + vf_coef value + gamma_ptx ptx (eq. 2, as a loss).

    The terms are backpropagated one after another: gradients add, so this equals the
    gradient of `ppo_math.ppo_ptx_objective`, and with gamma_ptx == 0 the ptx batch is never
    forwarded, leaving plain PPO bit for bit.
    """
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_ppo(models, mb, config)
    if ptx_batch is not None and config.gamma_ptx > 0:
        metrics = metrics._replace(ptx_loss=accumulate_ptx(models, ptx_batch, config))
    distributed.average_gradients(models.trainable_parameters())  # losses were weighted globally
    # Each role's gradient is clipped on its own. One joint clip let the value gradient (norm
    # ~35 on a fresh value head) scale the policy's down to Adam's epsilon, which all but
    # stopped the policy learning.
    for group in models.trainable_groups():
        torch.nn.utils.clip_grad_norm_(group, config.max_grad_norm)
    optimizer.step()
    return metrics


def optimise(
    models: SharedBaseModels,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    ptx_batch: PtxBatch | None,
    config: PPOConfig,
) -> Metrics:
    """`epochs` passes over the rollout in shuffled minibatches, one optimiser step each.

    Shuffles with torch's global generator, like sampling: the caller's seed fixes both.
    Under torchrun the ranks hold consecutive shards of the global rollout; rank 0's shuffle
    is used by all, and each forwards its own rows of every global minibatch.
    """
    local = rollout.mask.shape[0]
    start, total = distributed.row_offset(local)
    history: list[Metrics] = []
    for _ in range(config.epochs):
        order = distributed.from_rank0(torch.randperm(total))  # (B_global,)
        for rows in order.chunk(config.minibatches):
            mine = rows[(rows >= start) & (rows < start + local)] - start
            mb = rollout.select(mine)
            history.append(minibatch_update(models, optimizer, mb, ptx_batch, config))
    mean = mean_metrics(history, [1.0 / len(history)] * len(history))
    last_epoch = history[-config.minibatches :]
    return mean._replace(approx_kl=sum(m.approx_kl for m in last_epoch) / len(last_epoch))


# --- one step ----------------------------------------------------------------------------------


class PPOStats(NamedTuple):
    reward_mean: float  # reward-model score, before the KL penalty
    kl_mean: float  # per sequence: k1 summed over response tokens, mean over the batch
    ptx_loss: float
    policy_loss: float
    value_loss: float
    policy_clip_fraction: float
    value_clip_fraction: float
    approx_kl: float
    beta: float  # the coefficient this step's rewards used
    response_length: float  # mean response tokens, eos included
    seconds: float
    samples_per_second: float


def sequence_kl(rollout: Rollout) -> float:
    """Mean over rows (of every rank) of sum_t k1 over the response: what beta penalises."""
    per_token = kl_k1(rollout.logp, rollout.ref_logp) * rollout.mask  # (B, R)
    return distributed.global_mean(per_token.sum(dim=1))


def ppo_step(
    models: SharedBaseModels,
    optimizer: torch.optim.Optimizer,
    prompts: Sequence[str],
    ptx_batch: PtxBatch | None,
    config: PPOConfig,
    kl_ctl: KLController,
) -> PPOStats:
    """One PPO-ptx iteration: a rollout of `samples_per_prompt` responses to each of `prompts`
    (`config.prompts_per_step` of them), then `epochs` x `minibatches` updates.

    Under torchrun every rank passes the same global `prompts` and rolls out its own shard,
    so one prompt's responses, which are baselined against each other, stay on one rank.
    """
    started = time.perf_counter()
    k = config.samples_per_prompt
    local = [p for p in distributed.shard(prompts, *distributed.world()) for _ in range(k)]
    rollout = collect_rollout(models, local, config, kl_ctl.beta)
    update = optimise(models, optimizer, rollout, ptx_batch, config)
    kl = sequence_kl(rollout)
    kl_ctl.update(kl, n_steps=len(prompts) * k)
    seconds = time.perf_counter() - started
    return PPOStats(
        reward_mean=distributed.global_mean(rollout.scores),
        kl_mean=kl,
        ptx_loss=update.ptx_loss,
        policy_loss=update.policy_loss,
        value_loss=update.value_loss,
        policy_clip_fraction=update.policy_clip_fraction,
        value_clip_fraction=update.value_clip_fraction,
        approx_kl=update.approx_kl,
        beta=rollout.beta,
        response_length=distributed.global_mean(rollout.mask.sum(dim=1)),
        seconds=seconds,
        samples_per_second=len(prompts) * k / seconds,
    )
