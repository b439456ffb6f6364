"""Scoring completions with a reward model: the score head, the reward forward, and rankings
batched for it. The learner trains with these; the server's engine scores with them.

A reward adapter's score is a linear map from the final (post-norm) hidden state of the last
token of `prompt + completion + eos` to a scalar, plus a learned weight on the mean
log-likelihood of the completion's tokens (and eos) under the adapted model (`score`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from flywheel_model import llama, lm_head
from flywheel_model.adapters import LIKELIHOOD, SCORE_HEAD

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A prompt and its completions in tiers, best first; completions in one tier tie.
RankingText = tuple[str, Sequence[Sequence[str]]]
# One ranking, tokenised: (token ids, first response token, tier) per completion, best tier 0.
EncodedRanking = list[tuple[list[int], int, int]]


class ScoreHead(nn.Module):
    """Hidden state -> scalar (reward model; PPO's value head starts as a copy).

    `likelihood` weighs the reward model's mean log-likelihood of the response (see `score`).
    It starts at 1, so a fresh reward model begins by preferring what its language model finds
    likely, and the ranking loss learns how much that is worth (0 ignores it). A head saved
    without it loads with 0 and scores as before. The value head does not use it.
    """

    def __init__(self, hidden_size: int, likelihood: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.linear.bias)
        self.likelihood = nn.Parameter(torch.tensor(float(likelihood)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        return self.linear(features).squeeze(-1)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {**self.linear.state_dict(), LIKELIHOOD: self.likelihood}
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  str(directory / SCORE_HEAD))  # fmt: skip

    @classmethod
    def load(cls, directory: Path, hidden_size: int) -> ScoreHead:
        from safetensors.torch import load_file

        state = load_file(str(directory / SCORE_HEAD))
        if tuple(state["weight"].shape) != (1, hidden_size):
            raise ValueError(
                f"score head in {directory} maps {tuple(state['weight'].shape)[1]} features, "
                f"the base model has hidden size {hidden_size}"
            )
        head = cls(hidden_size, likelihood=float(state.pop(LIKELIHOOD, torch.tensor(0.0))))
        head.linear.load_state_dict(state)
        return head


def last_token_features(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state at each row's last attended position (left or right padding).

    hidden: (B, T, H); attention_mask: (B, T) -> (B, H)
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=-1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def reward_tokens(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[tuple[str, str]], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids the reward model reads for each (prompt, completion): prompt + completion +
    eos, truncated from the left, and the index of the first response token (at least 1, so
    eos is always scored). Two tokenizer calls for the whole list."""
    if not texts:
        return []
    full = tokenizer([p + c for p, c in texts], add_special_tokens=False)["input_ids"]
    prompts = list(dict.fromkeys(p for p, _ in texts))  # a ranking's completions share one
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    prompt_length = {p: len(ids) for p, ids in zip(prompts, encoded, strict=True)}
    eos = tokenizer.eos_token_id  # an attribute lookup that costs as much as the loop's body
    out = []
    for (prompt, _), ids in zip(texts, full, strict=True):
        ids = [*ids, eos]
        cut = max(0, len(ids) - max_length)
        out.append((ids[cut:], min(max(1, prompt_length[prompt] - cut), len(ids) - cut - 1)))
    return out


def response_loglik(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
    starts: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Mean log-probability of each row's tokens from `starts[r]` on (right padding).

    hidden: (B, T, H) final post-norm states; input_ids, attention_mask: (B, T); starts: (B,)
    -> (B,). The LM head runs only from the earliest response token on, as one 2-D matmul.
    """
    first = int(starts.min())
    states = hidden[:, first - 1 : -1]  # (B, R, H), R = T - first
    rows, width = states.shape[:2]
    targets = input_ids[:, first:].reshape(-1)
    logp = token_logprobs(model, states.reshape(rows * width, -1), targets).view(rows, width)
    positions = torch.arange(first, input_ids.shape[1], device=input_ids.device)
    mask = (positions[None, :] >= starts[:, None]) & attention_mask[:, first:].bool()
    return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def token_logprobs(model: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under the model's LM head from final states, in bounded chunks
    (`lm_head.token_logprobs`). (M, H), (M,) -> (M,)"""
    head: nn.Module = model.get_output_embeddings()  # type: ignore[operator]
    return lm_head.token_logprobs(head, states, targets)


def score(
    model: nn.Module,
    head: ScoreHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    starts: torch.Tensor,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Reward of each row: head(last hidden state) + head.likelihood * response_loglik.

    input_ids, attention_mask: (B, T), right-padded; starts: (B,) index of each row's first
    response token -> (B,). A small reward model cannot check an answer in its last hidden
    state alone; its language model's per-token likelihood of the answer reads every
    response position. On the demo policy's own samples the demo build's reward model orders
    right over wrong 96% of the time with it and 73% without (bench/reward_on_policy.py).
    The LM head runs on response positions only.
    """
    hidden = final_hidden(model, input_ids, attention_mask, **model_kwargs)
    loglik = response_loglik(model, hidden, input_ids, attention_mask, starts)
    return head(last_token_features(hidden, attention_mask)) + head.likelihood * loglik


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs: Any
) -> torch.Tensor:
    """Final (post-norm) hidden states of right-padded rows. (B, T) -> (B, T, H).

    Llama-shaped models with at most one active plain LoRA adapter take the lean forward
    (`llama.final_hidden`, the same values with fewer ops); any other model, or extra model
    arguments (such as peft's per-row adapter names), take transformers' forward.
    """
    if model_kwargs:  # peft's per-row adapter names go through its own forward
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    output_hidden_states=True, logits_to_keep=1, **model_kwargs)  # fmt: skip
        return out.hidden_states[-1]
    if bool((attention_mask.long().diff(dim=1) <= 0).all()):
        try:
            weights = llama.read(model)
        except llama.Unsupported:
            pass
        else:
            return llama.final_hidden(weights, input_ids)
    return lm_head.final_states(model, input_ids=input_ids, attention_mask=attention_mask)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer rows right-padded with `pad_id` to the longest: the rows and the mask of what is
    not padding, each (B, T). Built as lists, one tensor each: a copy per row costs more."""
    width = max(len(ids) for ids in rows)
    padded = [[*ids, *[pad_id] * (width - len(ids))] for ids in rows]
    attention = [[1] * len(ids) + [0] * (width - len(ids)) for ids in rows]
    return torch.tensor(padded, dtype=torch.long), torch.tensor(attention, dtype=torch.long)


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (N, T), right-padded
    attention_mask: torch.Tensor  # (N, T)
    starts: torch.Tensor  # (N,) index of each row's first response token
    tiers: torch.Tensor  # (N,)
    group: torch.Tensor  # (N,)


def encode_rankings(
    tokenizer: PreTrainedTokenizerBase, rankings: Sequence[RankingText], max_length: int
) -> list[EncodedRanking]:
    """Tokenise rankings, all their completions in one batch."""
    texts = [(prompt, c) for prompt, ranked in rankings for tier in ranked for c in tier]
    tokens = iter(reward_tokens(tokenizer, texts, max_length))
    return [
        [(*next(tokens), tier) for tier, completions in enumerate(ranked) for _ in completions]
        for _, ranked in rankings
    ]


def make_batch(
    tokenizer: PreTrainedTokenizerBase, rankings: Sequence[RankingText], max_length: int
) -> Batch:
    """Flatten rankings into one row per completion, tagged with its tier and group."""
    return collate_rankings(encode_rankings(tokenizer, rankings, max_length), padding_id(tokenizer))


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


def collate_rankings(encoded: Sequence[EncodedRanking], pad_id: int) -> Batch:
    """Right-padded rows of already tokenised rankings, tagged with tier and group."""
    rows = [row for ranking in encoded for row in ranking]
    group = [g for g, ranking in enumerate(encoded) for _ in ranking]
    input_ids, attention = right_pad([ids for ids, _, _ in rows], pad_id)
    starts = torch.tensor([start for _, start, _ in rows])
    tiers = torch.tensor([tier for _, _, tier in rows])
    return Batch(input_ids, attention, starts, tiers, torch.tensor(group))


def score_batch(
    model: nn.Module, head: ScoreHead, batch: Batch, **model_kwargs: Any
) -> torch.Tensor:
    """Rewards of a batch's rows, on the head's device. -> (N,)"""
    device = head.linear.weight.device
    ids, attention, starts = (
        t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.starts)
    )
    return score(model, head, ids, attention, starts, **model_kwargs)
