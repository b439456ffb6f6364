"""The forward pass of a Llama-shaped model over a slot KV cache, as one pure function.

`llama_decoder.LlamaDecoder` owns the cache and the weights; this is only the math, the same as
transformers' Llama forward with a handful of tensor ops per layer.

Cache layout, per layer: (slots, positions, kv heads, head dim). A row's token at position p
writes slot[row], p, and attends to every position <= p of its own slot.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from flywheel_learner.lean_forward import rotate


class Weights(NamedTuple):
    embed: torch.Tensor
    norm: torch.Tensor  # the final norm: (hidden,), or (rows, hidden) when adapters bring their own
    lm_head: torch.Tensor
    norms: list[torch.Tensor]  # per layer: input norm, post-attention norm
    linears: list[torch.Tensor]  # per layer: q, k, v, o, gate, up, down (PROJECTIONS' order)
    biases: list[torch.Tensor | None]  # the same order
    cos: torch.Tensor  # (positions, head dim)
    sin: torch.Tensor


class Shape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float


def forward(
    ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    last: torch.Tensor,
    span: int,
    contiguous: bool,
    weights: Weights,
    shape: Shape,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lora: list[list[tuple[int, torch.Tensor, torch.Tensor]]],
    group_rows: list[torch.Tensor | None],
) -> torch.Tensor:
    """Logits at token `last[r]` of each row r, after writing every token's keys and values.

    ids, positions: (rows, tokens); slots, last: (rows,). `span` is one past the highest position
    attended. `contiguous` says the rows are slots 0..rows-1 (the decode step), so the cache is
    read without a copy. lora[linear] lists (group, A, B) for that linear, B already scaled;
    group_rows[group] are the group's rows (None: all rows).
    """
    rows, tokens = ids.shape
    h = weights.embed[ids]
    hidden = h.shape[-1]
    cos = weights.cos[positions].unsqueeze(1)  # (rows, 1, tokens, head dim)
    sin = weights.sin[positions].unsqueeze(1)
    key_positions = torch.arange(span, device=ids.device)
    mask = (key_positions[None, None, :] <= positions[:, :, None]).unsqueeze(1)
    write: list[torch.Tensor | None] = [slots[:, None], positions]
    for layer in range(len(keys)):
        base = 7 * layer
        x = torch.rms_norm(h, [hidden], weights.norms[2 * layer], shape.eps)
        q = _linear(x, weights, lora, group_rows, base)
        k = _linear(x, weights, lora, group_rows, base + 1)
        v = _linear(x, weights, lora, group_rows, base + 2)
        q = q.view(rows, tokens, shape.heads, shape.head_dim).transpose(1, 2)
        k = k.view(rows, tokens, shape.kv_heads, shape.head_dim)
        v = v.view(rows, tokens, shape.kv_heads, shape.head_dim)
        q = rotate(q, cos, sin)
        k = rotate(k.transpose(1, 2), cos, sin).transpose(1, 2)
        keys[layer].index_put_(write, k)
        values[layer].index_put_(write, v)
        if contiguous:
            k_all, v_all = keys[layer][:rows, :span], values[layer][:rows, :span]
        else:
            k_all = keys[layer].index_select(0, slots)[:, :span]
            v_all = values[layer].index_select(0, slots)[:, :span]
        out = F.scaled_dot_product_attention(
            q,
            k_all.transpose(1, 2),
            v_all.transpose(1, 2),
            attn_mask=mask,
            scale=shape.scaling,
            enable_gqa=shape.heads != shape.kv_heads,
        )
        out = out.transpose(1, 2).reshape(rows, tokens, shape.heads * shape.head_dim)
        h = h + _linear(out, weights, lora, group_rows, base + 3)
        x = torch.rms_norm(h, [hidden], weights.norms[2 * layer + 1], shape.eps)
        gate = F.silu(_linear(x, weights, lora, group_rows, base + 4))
        up = _linear(x, weights, lora, group_rows, base + 5)
        h = h + _linear(gate * up, weights, lora, group_rows, base + 6)
    h = h[torch.arange(rows, device=ids.device), last]
    if weights.norm.dim() == 1:
        return F.linear(torch.rms_norm(h, [hidden], weights.norm, shape.eps), weights.lm_head)
    return F.linear(torch.rms_norm(h, [hidden], None, shape.eps) * weights.norm, weights.lm_head)


def _linear(
    x: torch.Tensor,
    weights: Weights,
    lora: list[list[tuple[int, torch.Tensor, torch.Tensor]]],
    group_rows: list[torch.Tensor | None],
    index: int,
) -> torch.Tensor:
    """One projection, plus the low-rank update of each row's adapter."""
    y = F.linear(x, weights.linears[index], weights.biases[index])
    for group, a, b in lora[index]:
        rows = group_rows[group]
        if rows is None:
            y = y + F.linear(F.linear(x, a), b)
        else:
            y = y.index_add(0, rows, F.linear(F.linear(x.index_select(0, rows), a), b))
    return y
