"""The Llama-family forward, one layer loop for training and for decoding, under LoRA.

`layer_loop` is the loop. Two callers give it their projections and their attention:
`final_hidden` (training and scoring: no cache, autograd through the active LoRA) and `decode`
(the server's decoder: a slot KV cache, a LoRA adapter per row).

transformers' forward and peft's LoRA layers are general, and on a small model their Python
around each layer costs more than the matmuls. The reward model's refit forwards every
completion of every step through them. `final_hidden` runs the same weights with a handful of
tensor ops per layer, with autograd through the active adapter's LoRA matrices, and gives the
same final hidden states as `model(..., output_hidden_states=True).hidden_states[-1]` (tested,
values and gradients).

Rows must be right-padded: under causal attention a real token never attends to a later pad, so
no padding mask is needed and the pads' own states are left unused by the caller.

It serves Llama, Mistral (without a sliding window) and Qwen2 models with plain LoRA on any of
their seven projections and at most one active adapter. `read` raises `Unsupported` with the
reason otherwise, and the caller falls back to transformers' forward. The server's decoder
(`flywheel_server.llama_decoder`) owns the cache and the weights and runs `decode`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as checkpoint_layer

from flywheel_model import checkpointing

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin independent of sequence length
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Unsupported(ValueError):
    """The model (or its adapters' state) is outside what the lean forward computes."""


def config_problem(config: Any) -> str | None:
    """Why a model of this config is not Llama-shaped enough for a lean forward, or None."""
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {', '.join(MODEL_TYPES)}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        return f"RoPE type {rope.get('rope_type')!r} depends on the sequence length"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < config.max_position_embeddings:
        return "sliding-window attention"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "layers that are not full attention"
    return None


def projection(layer: Any, name: str) -> Any:
    return getattr(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name)


def lora_problem(module: Any, adapter: str) -> str | None:
    """Why this adapter of a peft LoRA layer is not plain LoRA, or None."""
    if getattr(module, "lora_variant", {}).get(adapter) is not None:
        return "it is a LoRA variant (such as DoRA), not plain LoRA"
    if getattr(module, "lora_bias", {}).get(adapter):
        return "it has a LoRA bias"
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers applies it (rotate the two halves)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Linear(NamedTuple):
    weight: torch.Tensor  # the frozen base weight, (out, in)
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None  # (r, in); None: no active adapter on this projection
    lora_b: torch.Tensor | None = None  # (out, r)
    scaling: float = 0.0
    dropout: float = 0.0  # LoRA dropout applied to the input of A (0 when not training)


class Layer(NamedTuple):
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    linears: list[Linear]  # PROJECTIONS' order


class Weights(NamedTuple):
    embed: torch.Tensor
    layers: list[Layer]
    norm: torch.Tensor  # the final norm's active weight (an adapter may bring its own)
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    rotary: Any  # the model's rotary embedding module: (x, position ids) -> (cos, sin)
    checkpoint: bool = False  # activation checkpointing per layer (`checkpointing.enable`)


def read(model: Any) -> Weights:
    """The weights a forward of `model` (a causal LM, peft-wrapped or not) uses right now: the
    base's, plus the active LoRA adapter's where one is active. Raises Unsupported."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    problem = config_problem(base.config)
    if problem:
        raise Unsupported(problem)
    inner = base.model
    if type(inner.embed_tokens) is not torch.nn.Embedding:
        raise Unsupported("the token embedding is wrapped (trainable tokens)")
    layers = [
        Layer(
            layer.input_layernorm.weight,
            layer.post_attention_layernorm.weight,
            [_linear(projection(layer, name)) for name in PROJECTIONS],
        )
        for layer in inner.layers
    ]
    attention = inner.layers[0].self_attn
    return Weights(
        embed=inner.embed_tokens.weight,
        layers=layers,
        norm=inner.norm.weight,  # peft's modules_to_save wrapper answers with the active copy
        eps=base.config.rms_norm_eps,
        heads=base.config.num_attention_heads,
        kv_heads=base.config.num_key_value_heads,
        head_dim=attention.head_dim,
        scaling=attention.scaling,
        rotary=inner.rotary_emb,
        checkpoint=checkpointing.enabled(base),
    )


def _linear(module: Any) -> Linear:
    if type(module) is torch.nn.Linear:
        return Linear(module.weight, module.bias)
    base = getattr(module, "base_layer", None)
    if not hasattr(module, "lora_A") or type(base) is not torch.nn.Linear:
        raise Unsupported(f"{type(module).__name__} is neither a Linear nor LoRA on one")
    if module.merged:
        raise Unsupported("an adapter is merged into the base weights")
    active = (
        [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
    )
    if not active:
        return Linear(base.weight, base.bias)
    if len(active) > 1:
        raise Unsupported(f"{len(active)} adapters are active at once")
    (adapter,) = active
    problem = lora_problem(module, adapter)
    if problem:
        raise Unsupported(problem)
    if module.lora_A[adapter].weight.dtype != base.weight.dtype:
        raise Unsupported("the LoRA matrices and the base weights differ in dtype")
    dropout = module.lora_dropout[adapter]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return Linear(
        base.weight, base.bias, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
        float(module.scaling[adapter]), p,
    )  # fmt: skip


# (x, layer, first, stop) -> the outputs of projections first..stop-1 (PROJECTIONS' order)
Project = Callable[[torch.Tensor, int, int, int], list[torch.Tensor]]
# (layer, q, k, v) after the rotary embedding, each (rows, heads, tokens, head dim) -> the same
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Heads(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int


def layer_loop(
    h: torch.Tensor,
    norms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    heads: Heads,
    rotary: tuple[torch.Tensor, torch.Tensor],
    project: Project,
    attend: Attend,
    checkpoint: bool = False,
) -> torch.Tensor:
    """The decoder layers of a Llama-shaped model: h (rows, tokens, H) -> the last layer's
    residual stream, before the final norm.

    norms: each layer's (input, post-attention) RMSNorm weights; rotary: (cos, sin), each
    broadcastable to (rows, heads, tokens, head dim). `project` applies a layer's linear
    projections with whatever adapters the caller keeps; `attend` is the attention itself
    (causal, masked, or over a cache the caller writes). `checkpoint`: recompute each layer's
    activations in the backward instead of keeping them (`checkpointing`; training only).
    """
    rows, tokens, hidden = h.shape
    cos, sin = rotary
    counts = (heads.heads, heads.kv_heads, heads.kv_heads)  # of q, k and v

    def run_layer(layer: int, h: torch.Tensor) -> torch.Tensor:
        input_norm, post_attention_norm = norms[layer]
        x = torch.rms_norm(h, [hidden], input_norm, eps)
        q, k, v = (
            y.view(rows, tokens, n, heads.head_dim).transpose(1, 2)
            for y, n in zip(project(x, layer, 0, 3), counts, strict=True)
        )
        out = attend(layer, rotate(q, cos, sin), rotate(k, cos, sin), v)
        out = out.transpose(1, 2).reshape(rows, tokens, heads.heads * heads.head_dim)
        h = h + project(out, layer, 3, 4)[0]
        x = torch.rms_norm(h, [hidden], post_attention_norm, eps)
        gate, up = project(x, layer, 4, 6)
        return h + project(F.silu(gate) * up, layer, 6, 7)[0]

    recompute = checkpoint and torch.is_grad_enabled()
    for layer in range(len(norms)):
        h = (
            checkpoint_layer(run_layer, layer, h, use_reentrant=False)
            if recompute
            else run_layer(layer, h)
        )
    return h


def final_hidden(
    weights: Weights,
    input_ids: torch.Tensor,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final (post-norm) hidden states. input_ids: (B, T) -> (B, T, H).

    Without `positions` and `mask`: right-padded rows, each one sequence from position 0.
    With them, a row may hold several sequences that share a prefix (`prompt_sharing`):
    positions (B, T) are each token's position in its own sequence, and mask (B, T, T) says
    which tokens each token attends to (True: attend).
    """
    rows, tokens = input_ids.shape
    h = weights.embed[input_ids]  # (B, T, H)
    hidden = h.shape[-1]
    if positions is None:
        positions = torch.arange(tokens, device=input_ids.device)[None]
    cos, sin = weights.rotary(h, positions)  # (1 or B, T, head dim)
    attend_to = {"is_causal": True} if mask is None else {"attn_mask": mask[:, None]}

    def project(x: torch.Tensor, layer: int, first: int, stop: int) -> list[torch.Tensor]:
        flat = x.reshape(rows * tokens, -1)  # every linear is one 2-D matmul
        linears = weights.layers[layer].linears[first:stop]
        return [y.view(rows, tokens, -1) for y in _apply_all(flat, linears)]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, scale=weights.scaling, enable_gqa=weights.heads != weights.kv_heads,
            **attend_to,
        )  # fmt: skip

    norms = [(layer.input_norm, layer.post_attention_norm) for layer in weights.layers]
    heads = Heads(weights.heads, weights.kv_heads, weights.head_dim)
    rotary = (cos[:, None], sin[:, None])
    h = layer_loop(h, norms, weights.eps, heads, rotary, project, attend, weights.checkpoint)
    return torch.rms_norm(h, [hidden], weights.norm, weights.eps)


def _apply(x: torch.Tensor, linear: Linear, a: torch.Tensor | None = None) -> torch.Tensor:
    """One projection of (N, in) rows, plus its LoRA update: W x + s B A dropout(x).
    a: A dropout(x) when the caller has it already."""
    y = F.linear(x, linear.weight, linear.bias)
    if linear.lora_a is None or linear.lora_b is None:
        return y
    if a is None:
        a = F.linear(F.dropout(x, linear.dropout) if linear.dropout else x, linear.lora_a)
    return torch.addmm(y, a, linear.lora_b.t(), alpha=linear.scaling)


def _apply_all(x: torch.Tensor, linears: list[Linear]) -> list[torch.Tensor]:
    """Projections that read the same rows. Without dropout their A matrices run as one
    matmul: a small model's skinny matmuls cost their call, not their arithmetic."""
    if any(linear.lora_a is None or linear.dropout for linear in linears):
        return [_apply(x, linear) for linear in linears]
    a = F.linear(x, torch.cat([linear.lora_a for linear in linears]))  # type: ignore[misc]
    ranks = [linear.lora_a.shape[0] for linear in linears]  # type: ignore[union-attr]
    return [
        _apply(x, linear, part) for linear, part in zip(linears, a.split(ranks, dim=1), strict=True)
    ]


# -- decoding over a slot KV cache ---------------------------------------------------------------


class DecodeWeights(NamedTuple):
    """What `decode` reads: the base weights stacked for the decoder, and rotary tables."""

    embed: torch.Tensor
    norm: torch.Tensor  # the final norm: (hidden,), or (rows, hidden) when adapters bring their own
    lm_head: torch.Tensor
    norms: list[torch.Tensor]  # per layer: input norm, post-attention norm
    linears: list[torch.Tensor]  # per layer: q, k, v, o, gate, up, down (PROJECTIONS' order)
    biases: list[torch.Tensor | None]  # the same order
    cos: torch.Tensor  # (positions, head dim)
    sin: torch.Tensor


class DecodeShape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    eps: float


def decode(
    ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    last: torch.Tensor,
    span: int,
    contiguous: bool,
    weights: DecodeWeights,
    shape: DecodeShape,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lora: list[list[tuple[int, torch.Tensor, torch.Tensor]]],
    group_rows: list[torch.Tensor | None],
) -> torch.Tensor:
    """Logits at token `last[r]` of each row r, after writing every token's keys and values
    (with `last` of shape (rows, k): at k tokens of each row, (rows, k, vocab)).

    ids, positions: (rows, tokens); slots, last: (rows,). `span` is one past the highest position
    attended. `contiguous` says the rows are slots 0..rows-1 (the decode step), so the cache is
    read without a copy. lora[linear] lists (group, A, B) for that linear, B already scaled;
    group_rows[group] are the group's rows (None: all rows).
    """
    rows = ids.shape[0]
    h = weights.embed[ids]
    hidden = h.shape[-1]
    cos = weights.cos[positions].unsqueeze(1)  # (rows, 1, tokens, head dim)
    sin = weights.sin[positions].unsqueeze(1)
    key_positions = torch.arange(span, device=ids.device)
    mask = (key_positions[None, None, :] <= positions[:, :, None]).unsqueeze(1)
    write: list[torch.Tensor | None] = [slots[:, None], positions]

    def project(x: torch.Tensor, layer: int, first: int, stop: int) -> list[torch.Tensor]:
        return [
            _row_linear(x, weights, lora, group_rows, 7 * layer + i) for i in range(first, stop)
        ]

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys[layer].index_put_(write, k.transpose(1, 2))  # the cache is (slot, position, ...)
        values[layer].index_put_(write, v.transpose(1, 2))
        if contiguous:
            k_all, v_all = keys[layer][:rows, :span], values[layer][:rows, :span]
        else:
            k_all = keys[layer].index_select(0, slots)[:, :span]
            v_all = values[layer].index_select(0, slots)[:, :span]
        return F.scaled_dot_product_attention(
            q, k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask,
            scale=shape.scaling, enable_gqa=shape.heads != shape.kv_heads,
        )  # fmt: skip

    norms = list(zip(weights.norms[0::2], weights.norms[1::2], strict=True))
    heads = Heads(shape.heads, shape.kv_heads, shape.head_dim)
    h = layer_loop(h, norms, shape.eps, heads, (cos, sin), project, attend)
    pick = torch.arange(rows, device=ids.device)
    h = h[pick, last] if last.dim() == 1 else h[pick[:, None], last]
    if weights.norm.dim() == 1:
        return F.linear(torch.rms_norm(h, [hidden], weights.norm, shape.eps), weights.lm_head)
    norm = weights.norm if last.dim() == 1 else weights.norm[:, None]  # per row
    return F.linear(torch.rms_norm(h, [hidden], None, shape.eps) * norm, weights.lm_head)


def _row_linear(
    x: torch.Tensor,
    weights: DecodeWeights,
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
