"""A lean training forward for Llama-shaped models under peft LoRA: the same math, fewer layers.

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
reason otherwise, and the caller falls back to transformers' forward. The server's lean decoder
(`flywheel_server.llama_decoder`) shares the model checks and the rotary embedding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

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
    h = weights.embed[input_ids.reshape(-1)]  # (B * T, H): every linear is one 2-D matmul
    hidden = h.shape[-1]
    if positions is None:
        positions = torch.arange(tokens, device=input_ids.device)[None]
    cos, sin = weights.rotary(h, positions)  # (1 or B, T, head dim)
    cos, sin = cos[:, None], sin[:, None]
    attend = {"is_causal": True} if mask is None else {"attn_mask": mask[:, None]}
    heads = (weights.heads, weights.kv_heads, weights.kv_heads)
    for layer in weights.layers:
        x = torch.rms_norm(h, [hidden], layer.input_norm, weights.eps)
        q, k, v = (
            y.view(rows, tokens, n, weights.head_dim).transpose(1, 2)
            for y, n in zip(_apply_all(x, layer.linears[:3]), heads, strict=True)
        )
        out = F.scaled_dot_product_attention(
            rotate(q, cos, sin),
            rotate(k, cos, sin),
            v,
            scale=weights.scaling,
            enable_gqa=weights.heads != weights.kv_heads,
            **attend,
        )
        out = out.transpose(1, 2).reshape(rows * tokens, weights.heads * weights.head_dim)
        h = h + _apply(out, layer.linears[3])
        x = torch.rms_norm(h, [hidden], layer.post_attention_norm, weights.eps)
        gate, up = _apply_all(x, layer.linears[4:6])
        h = h + _apply(F.silu(gate) * up, layer.linears[6])
    return torch.rms_norm(h, [hidden], weights.norm, weights.eps).view(rows, tokens, hidden)


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
