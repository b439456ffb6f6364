"""Next-token sampling as pure functions of logits (imports only torch).

Each row carries its own temperature, top-p, top-k and random generator, so rows of one batch
can belong to different requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (top-p) to -inf.

    logits: (B, V); top_k: (B,) int, 0 = off; top_p: (B,) float in (0, 1], 1 = off -> (B, V)
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)  # (B, 1)
    drop = ranks >= k
    # Nucleus: keep the smallest prefix whose probability reaches top_p (the first token always).
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    # The most likely token always stays: a top_p below float32's range (1e-46 arrives as 0)
    # would otherwise drop every token, and sampling from nothing is NaN.
    drop &= ranks > 0
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row. Temperature 0 is greedy; a row with a generator draws from it
    (reproducible seeds), the others draw together. logits: (B, V) -> (B,) int64"""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)  # (B,)
    if not bool((temperature > 0).any()):
        return greedy
    scaled = logits / temperature.clamp_min(1e-6).unsqueeze(-1)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        scaled = filter_logits(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)  # (B, V)
    drawn = torch.empty_like(greedy)
    free = [i for i, g in enumerate(generators) if g is None]
    if free:
        rows = torch.tensor(free, device=logits.device)
        drawn[rows] = torch.multinomial(probs[rows], 1).squeeze(-1)
    for i, g in enumerate(generators):
        if g is not None:
            drawn[i] = torch.multinomial(probs[i], 1, generator=g).squeeze(0)
    return torch.where(temperature > 0, drawn, greedy)


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (no temperature, penalty or filter):
    each row's chosen token's, and its k most likely tokens with theirs.
    logits: (B, V); chosen: (B,) -> (B,), (B, k) log-probs, (B, k) token ids"""
    logp = logits.float().log_softmax(dim=-1)
    top, ids = logp.topk(k, dim=-1)
    return logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1), top, ids


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in text, or -1."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else -1


def safe_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of text can be streamed without emitting a partial stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return len(text) - hold


def forbid_token(logits: torch.Tensor, token: int | None, rows: list[bool]) -> torch.Tensor:
    """`logits` with `token` made impossible in the rows marked True (a copy when any is)."""
    if token is None or not any(rows):
        return logits
    out = logits.clone()
    mask = torch.tensor(rows, dtype=torch.bool, device=logits.device)
    out[mask, token] = float("-inf")
    return out


def adjust_logits(logits: torch.Tensor, rows: Sequence[tuple[Sequence[int], Any]]) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over each row's generated tokens, and its
    logit_bias. rows: (generated token ids, sampling) per row of logits; a copy when any applies.
    """
    touched = [
        i for i, (_, s) in enumerate(rows)
        if s.presence_penalty or s.frequency_penalty or s.logit_bias
    ]  # fmt: skip
    if not touched:
        return logits
    out = logits.clone()
    vocab = logits.shape[-1]
    for i in touched:
        tokens, s = rows[i]
        if tokens and (s.presence_penalty or s.frequency_penalty):
            ids = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=vocab)[:vocab].to(out.dtype)
            out[i] -= s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(out.dtype)
        for token, bias in s.logit_bias:
            out[i, token] += bias
    return out
