"""Reward-model fitting (InstructGPT step 2): base + LoRA adapter + scalar head.

The base weights stay frozen and shared with the policy; only the adapter and the head learn.
Each batch holds whole rankings and every completion is forwarded once, with the K-way loss
taken over all pairs of each ranking (`losses.ranking_loss`). Where the model has a lean forward,
each ranking's prompt is forwarded once too (`prompt_sharing`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from flywheel_learner import distributed, prompt_sharing, token_budget
from flywheel_learner.losses import pairwise_accuracy, ranking_loss
from flywheel_learner.sft import warmup_cosine
from flywheel_model import adapters, checkpointing, llama, scoring
from flywheel_model.scoring import (
    Batch,
    EncodedRanking,
    RankingText,
    collate_rankings,
    encode_rankings,
    make_batch,
    padding_id,
    score_batch,
)

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

# (prompt_text, tiers of completion texts, best first; texts within a tier are tied)


@dataclass(frozen=True)
class RewardConfig:
    """Reward-model hyper-parameters.

    batch_rankings: rankings (not completions) per step, so each prompt's pairs stay together.
    target_modules: where the LoRA goes; by default every linear layer but the output head.
    held_out: share of the rankings kept out of training to report pairwise accuracy on.
    max_epochs: stop after this many passes over the training rankings, even before `steps`
        (None: always `steps`). A warm-started refit on a few rankings needs a few steps, not
        hundreds, which would fit those rankings exactly and blow the rewards up. So the
        budget grows with the data, up to `steps`.
    eval_every, patience: with held-out rankings, measure their loss every `eval_every` steps
        and stop once `patience` measurements in a row did not improve on the best; the best
        weights are kept (0 = no early stopping).
    probe_steps: before training the adapter, fit a fresh score head alone on the frozen
        features of every training ranking (full-batch Adam, a convex problem): linear probing
        then fine-tuning (Kumar et al. 2022). A warm start's features may already separate
        what the users prefer while its old head reads them the other way round; a few
        hundred gradient steps through the whole model turn such a head only slowly
        (0 = keep the initial head).
    max_tokens_per_microbatch: when > 0, a step's rankings are forwarded in parts of at most
        this many (padded) tokens (`token_budget.pack`), their gradients accumulated with each
        part's share of the ranked prompts: the update of the whole batch in bounded memory.
    gradient_checkpointing: recompute each decoder layer's activations in the backward
        instead of keeping them (`flywheel_model.checkpointing`): less memory, one more forward.
    """

    steps: int = 300
    lr: float = 1e-3
    r: int = 32
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = adapters.ALL_LINEAR
    batch_rankings: int = 32
    max_length: int = 256
    held_out: float = 0.1
    seed: int = 0
    warmup: int = 10
    max_epochs: float | None = None
    eval_every: int = 0
    patience: int = 3
    max_tokens_per_microbatch: int = 0
    gradient_checkpointing: bool = False
    probe_steps: int = 0
    probe_lr: float = 0.05

    def steps_for(self, rankings: int) -> int:
        """Steps a fit on `rankings` training rankings runs: `steps`, capped by max_epochs."""
        if self.max_epochs is None:
            return self.steps
        return max(1, min(self.steps, math.ceil(self.max_epochs * rankings / self.batch_rankings)))

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.max_epochs is not None and not self.max_epochs > 0:
            raise ValueError(f"max_epochs must be > 0 (or None), got {self.max_epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.r < 1:
            raise ValueError(f"r (LoRA rank) must be >= 1, got {self.r}")
        if self.alpha < 1:
            raise ValueError(f"alpha must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, e.g. ('q_proj',)")
        if self.batch_rankings < 1:
            raise ValueError(f"batch_rankings must be >= 1, got {self.batch_rankings}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_tokens_per_microbatch < 0:
            raise ValueError(
                f"max_tokens_per_microbatch must be >= 0 (0 = no bound), got "
                f"{self.max_tokens_per_microbatch}"
            )
        if not 0.0 <= self.held_out < 1.0:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")
        if self.probe_steps < 0 or not self.probe_lr > 0:
            raise ValueError(
                f"probe_steps must be >= 0 and probe_lr > 0, got {self.probe_steps} and "
                f"{self.probe_lr}"
            )
        if self.eval_every < 0 or self.patience < 1:
            raise ValueError(
                f"eval_every must be >= 0 and patience >= 1, got {self.eval_every} and "
                f"{self.patience}"
            )


class RewardFit(NamedTuple):
    model: PeftModel  # the base with the reward adapter added (and active)
    head: scoring.ScoreHead
    adapter_name: str
    train_loss: float  # mean over the last few steps
    held_out_accuracy: float  # NaN when nothing was held out
    steps: int
    seconds: float
    warm_start: bool = False  # began from `init`'s weights rather than a fresh adapter
    held_out: HeldOutScore | None = None  # the kept weights' score on the held-out rankings


class HeldOutScore(NamedTuple):
    """A reward model measured on rankings it was not trained on."""

    accuracy: float  # share of ordered pairs put in the labelers' order; NaN with no pair
    loss: float  # the K-way ranking loss (lower is better); NaN with no pair
    pairs: int  # ordered pairs measured (ties within a tier are not pairs)


def _validate(rankings: Sequence[RankingText]) -> None:
    for i, (_, tiers) in enumerate(rankings):
        if sum(1 for tier in tiers if tier) < 2:
            raise ValueError(
                f"ranking {i} must hold at least two non-empty tiers to give a pair, got {tiers!r}"
            )


def add_reward_adapter(model: nn.Module, config: RewardConfig, adapter_name: str) -> PeftModel:
    """Add a fresh LoRA adapter named `adapter_name` (a new peft model, or one more adapter)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=adapters.peft_targets(config.target_modules, model),
        task_type="CAUSAL_LM",
    )
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(f"the model already has an adapter named {adapter_name!r}")
        model.add_adapter(adapter_name, lora)
        model.set_adapter(adapter_name)
        return model
    return get_peft_model(model, lora, adapter_name=adapter_name)


def split_held_out(
    rankings: Sequence[RankingText], share: float, seed: int
) -> tuple[list[RankingText], list[RankingText]]:
    """(train, held_out), split by ranking so no prompt's pairs leak across."""
    order = list(rankings)
    random.Random(seed).shuffle(order)
    n_held = math.floor(len(order) * share) if len(order) > 1 else 0
    return order[n_held:], order[:n_held]


@torch.no_grad()
def held_out_score(
    model: nn.Module,
    head: scoring.ScoreHead,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Sequence[RankingText],
    config: RewardConfig,
) -> HeldOutScore:
    """Pairwise accuracy and ranking loss of the reward model on `rankings`."""
    correct = loss = 0.0
    total = groups = 0
    for start in range(0, len(rankings), config.batch_rankings):
        batch = make_batch(
            tokenizer, rankings[start : start + config.batch_rankings], config.max_length
        )
        rewards = score_batch(model, head, batch).cpu()
        pairs, ranked = _pair_counts(batch)
        if not pairs:
            continue
        correct += pairwise_accuracy(rewards, batch.tiers, batch.group) * pairs
        loss += float(ranking_loss(rewards, batch.tiers, batch.group)) * ranked
        total += pairs
        groups += ranked
    if not total:
        return HeldOutScore(float("nan"), float("nan"), 0)
    return HeldOutScore(correct / total, loss / groups, total)


def evaluate(
    model: nn.Module,
    head: scoring.ScoreHead,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Sequence[RankingText],
    config: RewardConfig,
) -> float:
    """Pairwise accuracy of the reward model on `rankings` (NaN when empty)."""
    return held_out_score(model, head, tokenizer, rankings, config).accuracy


def _pair_counts(batch: Batch) -> tuple[int, int]:
    """(ordered pairs, groups holding at least one) of a batch; ties within a tier are no pair."""
    same = batch.group[:, None] == batch.group[None, :]
    pairs = same & (batch.tiers[:, None] < batch.tiers[None, :])  # (N, N)
    return int(pairs.sum()), int(batch.group[pairs.any(dim=1)].unique().numel())


def fit_reward_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Sequence[RankingText],
    config: RewardConfig = RewardConfig(),
    *,
    adapter_name: str = "reward",
    init: str | Path | None = None,
    held_out: Sequence[RankingText] | None = None,
    progress: bool = True,
) -> RewardFit:
    """Add a reward adapter + score head to `model` and fit them on K-way `rankings`.

    `model` is modified in place (peft injects the LoRA layers); the returned peft model wraps
    it. Save with `adapters.save_adapter(fit.model, fit.adapter_name, dir, head=fit.head, ...)`.
    init: a saved reward model to warm-start from (adapter and head), used when its LoRA
    shape matches `config`; otherwise the adapter starts fresh (`RewardFit.warm_start`).
    held_out: the rankings to measure (and stop early) on; None holds out a random
    `config.held_out` share of `rankings` instead.
    """
    _validate(rankings)
    if held_out is None:
        train, held = split_held_out(rankings, config.held_out, config.seed)
    else:
        train, held = list(rankings), list(held_out)
    torch.manual_seed(config.seed)
    if config.gradient_checkpointing:
        checkpointing.enable(model)
    peft_model = add_reward_adapter(model, config, adapter_name)
    device = next(peft_model.parameters()).device
    head = scoring.ScoreHead(peft_model.config.hidden_size).to(device)
    warm = False
    if init is not None and adapters.load_adapter_weights(peft_model, init, adapter_name):
        saved = scoring.ScoreHead.load(Path(init), peft_model.config.hidden_size)
        head.load_state_dict(saved.state_dict())
        warm = True
    if config.probe_steps:
        head = probe_head(peft_model, tokenizer, train, config).to(device)
    params = [p for p in peft_model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, fused=True)
    steps = config.steps_for(len(train))
    warmup = min(config.warmup, steps - 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup, steps)
    )
    encoded = encode_rankings(tokenizer, train, config.max_length)  # once, not per step
    pad_id = padding_id(tokenizer)
    rng = random.Random(config.seed)  # the same draws on every rank: one global batch
    rank, size = distributed.world()
    stopper = _EarlyStop(params, config.patience) if config.eval_every and held else None
    losses: list[float] = []
    start = time.perf_counter()
    try:  # one row per ranking, its prompt forwarded once (prompt_sharing), where it can
        weights: llama.Weights | None = llama.read(peft_model)
    except llama.Unsupported:
        weights = None
    bar = tqdm(range(steps), desc="reward", disable=not progress or rank > 0, leave=False)
    for step in bar:
        peft_model.train()
        chosen = rng.sample(encoded, min(config.batch_rankings, len(encoded)))
        local = distributed.shard(chosen, rank, size)
        optimizer.zero_grad(set_to_none=True)
        loss = ranking_step(peft_model, head, weights, local, pad_id,
                            config.max_tokens_per_microbatch)  # fmt: skip
        # The loss is a mean over rankings: weight each rank by its share of the global batch.
        distributed.average_gradients(params, len(local) / len(chosen))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if stopper is not None and ((step + 1) % config.eval_every == 0 or step + 1 == steps):
            peft_model.eval()
            if stopper.measure(held_out_score(peft_model, head, tokenizer, held, config).loss):
                break
    peft_model.eval()
    if stopper is not None:
        stopper.restore()
    score = held_out_score(peft_model, head, tokenizer, held, config)
    tail = losses[-10:]
    seconds = time.perf_counter() - start
    return RewardFit(
        peft_model, head, adapter_name, sum(tail) / len(tail), score.accuracy, len(losses),
        seconds, warm, score,
    )  # fmt: skip


def ranking_step(
    model: nn.Module,
    head: scoring.ScoreHead,
    weights: llama.Weights | None,
    rankings: Sequence[EncodedRanking],
    pad_id: int,
    budget: int = 0,
) -> float:
    """Backward of the K-way ranking loss (its mean over ranked prompts) of `rankings`; with a
    token `budget`, in parts of at most that many padded tokens, each weighted by its share
    of the ranked prompts. -> the loss. `weights`: the lean forward's (prompt_sharing: one
    row per ranking), or None (one row per completion)."""
    device = head.linear.weight.device

    def loss_of(part: Sequence[EncodedRanking]) -> torch.Tensor:
        batch: Batch | prompt_sharing.SharedBatch
        if weights is None:
            batch = collate_rankings(part, pad_id)
            rewards = score_batch(model, head, batch)  # (N,)
        else:
            batch = prompt_sharing.collate(part, pad_id)
            rewards = prompt_sharing.score(model, weights, head, batch)
        return ranking_loss(rewards, batch.tiers.to(device), batch.group.to(device))

    if budget <= 0:
        loss = loss_of(rankings)
        loss.backward()
        return loss.item()
    if weights is None:  # K rows each, padded to the longest completion
        lengths = [max(len(ids) for ids, _, _ in r) for r in rankings]
        rows = [len(r) for r in rankings]
    else:  # one packed row each
        lengths = [prompt_sharing.packed_length(r) for r in rankings]
        rows = None
    ranked = [len({tier for _, _, tier in r}) > 1 for r in rankings]
    total, out = sum(ranked), 0.0
    for group in token_budget.pack(lengths, budget, rows):
        share = sum(ranked[i] for i in group) / max(total, 1)
        if share:
            loss = loss_of([rankings[i] for i in group])
            (share * loss).backward()
            out += share * loss.item()
    return out


@torch.no_grad()
def ranking_features(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Sequence[RankingText],
    config: RewardConfig,
) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    """What a score head reads for every completion of `rankings`, with the model frozen:
    last-token states (N, H), mean response log-likelihoods (N,), and the rows' tiers and
    groups (as one `Batch`, groups numbered across chunks)."""
    states, logliks, tiers, groups = [], [], [], []
    for start in range(0, len(rankings), config.batch_rankings):
        batch = make_batch(tokenizer, rankings[start : start + config.batch_rankings],
                           config.max_length)  # fmt: skip
        device = next(model.parameters()).device
        ids, attention, starts = (t.to(device) for t in batch[:3])
        hidden = scoring.final_hidden(model, ids, attention)
        states.append(scoring.last_token_features(hidden, attention).float().cpu())
        logliks.append(scoring.response_loglik(model, hidden, ids, attention, starts).cpu())
        tiers.append(batch.tiers)
        groups.append(batch.group + start)
    empty = torch.zeros(0, dtype=torch.long)
    meta = Batch(empty, empty, empty, torch.cat(tiers), torch.cat(groups))
    return torch.cat(states), torch.cat(logliks), meta


def probe_head(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Sequence[RankingText],
    config: RewardConfig,
) -> scoring.ScoreHead:
    """A fresh score head fitted alone, full batch, on `model`'s frozen features (on CPU)."""
    states, logliks, meta = ranking_features(model, tokenizer, rankings, config)
    torch.manual_seed(config.seed)
    head = scoring.ScoreHead(states.shape[1], likelihood=0.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.probe_lr)
    for _ in range(config.probe_steps):
        rewards = head(states) + head.likelihood * logliks  # (N,)
        loss = ranking_loss(rewards, meta.tiers, meta.group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return head


class _EarlyStop:
    """Keeps a copy of the weights with the lowest held-out loss; says when to stop."""

    def __init__(self, params: Sequence[torch.nn.Parameter], patience: int) -> None:
        self.params = list(params)
        self.patience = patience
        self.best = math.inf
        self.best_weights: list[torch.Tensor] | None = None
        self.misses = 0

    def measure(self, loss: float) -> bool:
        """Record a held-out loss; True once `patience` measurements in a row missed the best."""
        if loss < self.best:
            self.best, self.misses = loss, 0
            self.best_weights = [p.detach().clone() for p in self.params]
        else:
            self.misses += 1
        return self.misses >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        if self.best_weights is not None:
            for p, saved in zip(self.params, self.best_weights, strict=True):
                p.copy_(saved)


@torch.no_grad()
def score_texts(
    model: nn.Module,
    head: scoring.ScoreHead,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int,
) -> torch.Tensor:
    """Rewards of (prompt, response) pairs. -> (N,)"""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = [(p, [[r]]) for p, r in texts[start : start + batch_size]]
        out.append(score_batch(model, head, make_batch(tokenizer, chunk, max_length)).cpu())
    return torch.cat(out)


@torch.no_grad()
def normalise_head_bias(
    model: nn.Module,
    head: scoring.ScoreHead,
    tokenizer: PreTrainedTokenizerBase,
    demonstrations: Sequence[tuple[str, str]],
    *,
    max_length: int = 256,
    batch_size: int = 64,
) -> float:
    """Shift the head's bias so the demonstrations score mean 0; return the shift removed.

    InstructGPT normalises its reward model this way so PPO's rewards are centred on what a
    good response earns, independent of the arbitrary offset the ranking loss leaves.
    """
    if not demonstrations:
        raise ValueError("normalise_head_bias needs at least one (prompt, response) demonstration")
    mean = float(score_texts(model, head, tokenizer, demonstrations, max_length, batch_size).mean())
    head.linear.bias.sub_(mean)
    return mean


@torch.no_grad()
def normalise_head_scale(
    model: nn.Module,
    head: scoring.ScoreHead,
    tokenizer: PreTrainedTokenizerBase,
    responses: Sequence[tuple[str, str]],
    *,
    max_length: int = 256,
    batch_size: int = 64,
) -> float:
    """Scale the head so `responses` score with standard deviation 1; return the old one.

    The ranking loss fixes only the order of rewards: on separable rankings it drives their
    scale up without bound (a live `incorrect` refit scored 27 against -4). PPO's KL penalty
    beta is in the reward's units, so at that scale it held nothing back and the policy went
    20 nats from the reference. Unit scale keeps beta meaningful; the order is unchanged.
    """
    if len(responses) < 2:
        raise ValueError("normalise_head_scale needs at least two (prompt, response) pairs")
    std = float(score_texts(model, head, tokenizer, responses, max_length, batch_size).std())
    if std > 0:
        head.linear.weight.div_(std)
        head.linear.bias.div_(std)
        head.likelihood.div_(std)
    return std
