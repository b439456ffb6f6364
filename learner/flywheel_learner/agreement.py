"""How often a policy orders held-out human rankings the way the labelers did (issue 15).

The gate must not trust only the reward model being optimised. A policy trained with a KL
penalty to the reference has an implicit reward: the optimum of InstructGPT's objective is
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so log pi*(y|x) - log pi_ref(y|x) is the
reward up to a per-prompt constant, which cancels between two responses to one prompt (the
observation behind DPO, Rafailov et al. 2023). Ordering held-out ranked pairs by that log-ratio
and counting agreement with the labelers measures the policy against human judgments that
neither it nor the reward model was trained on. The reference itself scores 0.5 (every pair
ties), so agreement above 0.5 means the policy moved toward what the labelers prefer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from flywheel_learner import modeling
from flywheel_learner.reward import RankingText
from flywheel_learner.sft import right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flywheel_learner.ppo import SharedBaseModels

LIVE = "live"


class RankedPairs(NamedTuple):
    """Held-out rankings flattened: each distinct (prompt, response) once, and the ordered pairs
    between them (better index, worse index)."""

    items: list[tuple[str, str]]
    pairs: list[tuple[int, int]]


def ranked_pairs(rankings: Sequence[RankingText]) -> RankedPairs:
    items: list[tuple[str, str]] = []
    pairs: list[tuple[int, int]] = []
    for prompt, tiers in rankings:
        indices = []
        for tier in tiers:
            indices.append([len(items) + i for i in range(len(tier))])
            items.extend((prompt, response) for response in tier)
        for a, better in enumerate(indices):
            for worse in indices[a + 1 :]:
                pairs.extend((i, j) for i in better for j in worse)
    return RankedPairs(items, pairs)


def agreement(scores: torch.Tensor, pairs: Sequence[tuple[int, int]], tol: float = 1e-6) -> float:
    """Share of (better, worse) pairs with scores[better] > scores[worse]; ties count half.
    scores: (N,). NaN when there is no pair."""
    if not pairs:
        return float("nan")
    better = scores[[i for i, _ in pairs]]
    worse = scores[[j for _, j in pairs]]
    diff = better - worse  # (P,)
    wins = (diff > tol).float() + 0.5 * (diff.abs() <= tol).float()
    return float(wins.mean())


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, str]],
    *,
    max_length: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """log p(response + eos | prompt) of each item under `model` as it is set. -> (N,)"""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        encoded = modeling.reward_tokens(tokenizer, items[start : start + batch_size], max_length)
        ids, attention = right_pad([row for row, _ in encoded], tokenizer.pad_token_id)
        ids, attention = ids.to(device), attention.to(device)
        starts = torch.tensor([first for _, first in encoded], device=device)  # (B,)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]  # (B, T-1, V)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log p(ids[:, t+1])
        positions = torch.arange(1, ids.shape[1], device=device)  # (T-1,)
        mask = (positions[None, :] >= starts[:, None]) & attention[:, 1:].bool()
        out.append((token * mask).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


class HumanAgreement(NamedTuple):
    candidate: float  # the candidate policy's agreement with the held-out labelers
    live: float  # the live policy's, on the same pairs (NaN when it could not be measured)
    pairs: int


def human_agreement(
    models: SharedBaseModels, held: Sequence[RankingText], live_dir: Path | bool | None
) -> HumanAgreement:
    """The candidate's and the live policy's agreement with held-out rankings.

    live_dir: the live policy's adapter; None when the live policy is the reference itself;
    False when it is not at hand (its agreement is then NaN).
    """
    from flywheel_learner.ppo import POLICY

    flat = ranked_pairs(held)
    if not flat.pairs:
        return HumanAgreement(float("nan"), float("nan"), 0)
    peft, config = models.peft, models.config

    def logprobs() -> torch.Tensor:
        return sequence_logprobs(
            peft, models.tokenizer, flat.items, max_length=config.reward_max_length,
            temperature=config.temperature,
        )  # fmt: skip

    with peft.disable_adapter():
        reference = logprobs()
    models.use(POLICY)
    candidate = agreement(logprobs() - reference, flat.pairs)
    live = 0.5 if live_dir is None else float("nan")  # the reference ties every pair
    if isinstance(live_dir, Path):
        peft.load_adapter(str(live_dir), adapter_name=LIVE, is_trainable=False)
        try:
            peft.set_adapter(LIVE)
            live = agreement(logprobs() - reference, flat.pairs)
        finally:
            peft.set_adapter(POLICY)
            peft.delete_adapter(LIVE)
            models.use(POLICY)
    return HumanAgreement(candidate, live, len(flat.pairs))
