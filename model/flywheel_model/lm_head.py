"""Log-probabilities of chosen tokens through the LM head, in bounded memory.

A model's forward returns logits for every position it keeps: (rows, vocabulary) floats, and
log-softmax and its gradient hold as many again. With a 152k-token vocabulary (Qwen2.5) that
is 0.6 GB per thousand tokens each time, more than the layers' own activations. Here the
final hidden states go through the head in chunks of at most `CHUNK_ELEMENTS` logits, and
under autograd each chunk's logits are recomputed in the backward instead of kept: only the
chosen tokens' log-probabilities (one float a token) stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 24  # logits a chunk holds: 64 MB in float32

Head = Callable[[torch.Tensor], torch.Tensor]  # final hidden states (..., H) -> logits (..., V)


def final_states(model: Any, **inputs: Any) -> torch.Tensor:
    """The final (post-norm) hidden states the LM head reads, from the decoder stack alone.
    inputs: the forward's (input_ids, attention_mask, position_ids, ...) -> (B, T, H).

    A causal LM asked only for hidden states still runs its head on the kept positions, and on
    CPU in bfloat16 that one-position matmul broadcast the head's weight over the batch: a
    contiguous (B, H, V) copy, 2.2 GB for 8 rows of a 0.5B Qwen2.5."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model(**inputs, use_cache=False).last_hidden_state


def head_of(model: Any) -> Head:
    """The model's LM head, with the final soft-capping of the families that have one (Gemma 2
    and 3): final hidden states -> the logits its forward returns."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head: torch.nn.Module = base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda states: torch.tanh(head(states) / cap) * cap


def reproduces_forward(model: Any, head: Head, autocast: Any) -> bool:
    """Whether `head` on the last hidden state gives the model's own logits (checked on one
    short input): False for a family that scales its logits some other way."""
    ids = torch.arange(4, device=next(model.parameters()).device)[None] % model.config.vocab_size
    with torch.no_grad(), autocast():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        mine = head(out.hidden_states[-1]).float()
    theirs = out.logits.float()
    return bool(torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max())))


def token_logprobs(
    head: Head, states: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(head(states) / temperature)[target], reduced in float32.
    states: (M, H); targets: (M,) -> (M,)."""
    vocabulary = _vocabulary(head, states)
    rows = max(1, CHUNK_ELEMENTS // vocabulary)
    if states.shape[0] <= rows:
        return _chunk(head, temperature, states, targets)
    recompute = torch.is_grad_enabled()
    parts = [
        checkpoint(_chunk, head, temperature, s, t, use_reentrant=False)
        if recompute
        else _chunk(head, temperature, s, t)
        for s, t in zip(states.split(rows), targets.split(rows), strict=True)
    ]
    return torch.cat(parts)


def _chunk(
    head: Head, temperature: float, states: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head(states).float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


def _vocabulary(head: Head, states: torch.Tensor) -> int:
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    with torch.no_grad():
        return int(head(states[:1]).shape[-1])
