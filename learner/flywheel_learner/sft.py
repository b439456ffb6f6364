"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Next-token cross-entropy on the response and its eos only: the prompt is context, not
something the policy should learn to write.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from flywheel_learner.losses import masked_token_nll
from flywheel_model.scoring import right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SFTConfig:
    """SFT hyper-parameters.

    steps: optimiser steps, each on `batch_size` pairs sampled with replacement.
    lr: peak AdamW learning rate, reached after `warmup` steps, then cosine decay to 10%.
    max_length: tokens per sequence; longer prompts lose their beginning, never the response.
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    max_length: int = 256
    seed: int = 0
    warmup: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")


class SFTResult(NamedTuple):
    final_loss: float  # mean over the last few steps, less noisy than the last one
    steps: int
    seconds: float


class Encoded(NamedTuple):
    ids: list[int]
    response_start: int  # index of the first response token in ids


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int
) -> Encoded:
    """Prompt ids + response ids + eos, cutting the prompt's beginning to fit `max_length`.

    Prompt and response are tokenised apart so the boundary matches generation, where the
    policy continues from the prompt's own ids.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = [
        *tokenizer(response, add_special_tokens=False)["input_ids"],
        tokenizer.eos_token_id,
    ]
    response_ids = response_ids[: max_length - 1]  # keep at least one token of context
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_length) :]
    return Encoded([*prompt_ids, *response_ids], len(prompt_ids))


def collate(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded input_ids, attention_mask and response mask, each (B, T)."""
    input_ids, attention = right_pad([e.ids for e in batch], pad_id)
    response = torch.zeros_like(attention, dtype=torch.bool)
    for row, e in enumerate(batch):
        response[row, e.response_start : len(e.ids)] = True
    return input_ids, attention, response


def response_nll(
    model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, response: torch.Tensor
) -> torch.Tensor:
    """Mean next-token NLL of the response tokens. All inputs (B, T) -> scalar."""
    logits = model(input_ids=input_ids, attention_mask=attention).logits  # (B, T, V)
    return masked_token_nll(logits[:, :-1], input_ids[:, 1:], response[:, 1:])


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def sft(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    config: SFTConfig = SFTConfig(),
    *,
    progress: bool = True,
) -> SFTResult:
    """Fine-tune `model` in place on (rendered prompt, response) pairs.

    Trains whatever parameters require grad, so a peft LoRA model trains only its adapter.
    """
    if not pairs:
        raise ValueError("sft needs at least one (prompt, response) pair, got none")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; SFT teaches the policy when to stop")
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    encoded = [encode_pair(tokenizer, p, r, config.max_length) for p, r in pairs]
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, config.warmup, config.steps)
    )
    rng = random.Random(config.seed)
    losses: list[float] = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="sft", disable=not progress, leave=False)
    for _ in bar:
        batch = collate(rng.choices(encoded, k=config.batch_size), pad_id)
        loss = response_nll(model, *(t.to(device) for t in batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    tail = losses[-10:]
    return SFTResult(sum(tail) / len(tail), config.steps, time.perf_counter() - start)
