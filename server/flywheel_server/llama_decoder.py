"""A lean decoder for Llama-shaped models: the same math as transformers' forward, fewer layers.

transformers' forward is general; the engine calls it once per token for every running row, and
on a small model its Python around each layer costs more than the matmuls. This decoder runs the
same weights with a handful of tensor ops per layer, and keeps each row's keys and values in a
slot of a preallocated cache:

- a row's history starts at position 0 of its slot, so a row's logits do not depend on who else
  is in the batch (no left padding, no shared mask);
- a joining row writes its prompt into a free slot; a leaving row's slot is refilled by the last
  row (one row's cache is copied, not the whole batch's);
- each row names its LoRA adapter: rows on the same adapter share one pair of low-rank matmuls.

It serves Llama, Mistral (without a sliding window) and Qwen2 models; `unsupported_reason` says
why another model falls back to the generic decoder. Its logits match transformers' (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin independent of sequence length
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIN_ROWS, MIN_LENGTH = 8, 64  # the cache's first size; it doubles when it must

Groups = list[tuple[str, torch.Tensor | None]]  # adapter id -> its rows (None: every row)


def unsupported_reason(model: Any) -> str | None:
    """Why this model cannot use the lean decoder, or None when it can."""
    config = model.config
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
    for layer in model.model.layers:
        for name in PROJECTIONS:
            if type(_projection(layer, name)) is not torch.nn.Linear:
                return f"{name} is not a plain Linear (quantised or already wrapped)"
    return None


def _projection(layer: Any, name: str) -> Any:
    return getattr(layer.self_attn if name in PROJECTIONS[:4] else layer.mlp, name)


@dataclass(frozen=True)
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    linears: dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # name -> (weight, bias)


class LlamaDecoder:
    """Keys, values and length of every running row, and the forward passes that extend them."""

    def __init__(self, model: Any) -> None:
        config, inner = model.config, model.model
        attention = inner.layers[0].self_attn
        self.heads: int = config.num_attention_heads
        self.kv_heads: int = config.num_key_value_heads
        self.head_dim: int = attention.head_dim
        self.scaling: float = attention.scaling
        self.eps: float = config.rms_norm_eps
        self.max_length: int = config.max_position_embeddings
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                layer.post_attention_layernorm.weight,
                {
                    name: (_projection(layer, name).weight, _projection(layer, name).bias)
                    for name in PROJECTIONS
                },
            )
            for layer in inner.layers
        ]
        self._modules = {  # base Linear -> (layer, name), to find the LoRA peft wraps around it
            id(_projection(layer, name)): (i, name)
            for i, layer in enumerate(inner.layers)
            for name in PROJECTIONS
        }
        self._rotary = inner.rotary_emb
        self.lora: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.embed.device)
        self.keys: list[torch.Tensor] = []  # per layer: (row slots, kv heads, positions, head dim)
        self.values: list[torch.Tensor] = []
        self._cos = self._sin = self.embed.new_zeros(0, self.head_dim)

    def __len__(self) -> int:
        return len(self.lengths)

    # -- adapters ---------------------------------------------------------------------------

    def read_adapters(self, peft: Any) -> None:
        """Take every LoRA adapter's weights from the peft model (None: no adapters)."""
        from peft.tuners.lora import LoraLayer

        lora: dict[tuple[int, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        if peft is None:
            self.lora = lora
            return
        for adapter, config in peft.peft_config.items():
            if getattr(config, "modules_to_save", None) or getattr(
                config, "trainable_token_indices", None
            ):
                raise ValueError(
                    f"the lean decoder cannot serve adapter {adapter}: it trains whole modules "
                    "or token rows besides its LoRA matrices"
                )
        for name, module in peft.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            key = self._modules.get(id(module.get_base_layer()))
            for adapter in {*module.lora_A, *module.lora_embedding_A}:
                problem = f"it adapts {name}" if key is None else _lora_problem(module, adapter)
                if key is None or problem:
                    raise ValueError(f"the lean decoder cannot serve adapter {adapter}: {problem}")
                dtype = self.embed.dtype
                a = torch.as_tensor(module.lora_A[adapter].weight).to(dtype)
                b = (module.lora_B[adapter].weight * module.scaling[adapter]).to(dtype)
                lora.setdefault(key, {})[adapter] = (a, b)
        self.lora = lora

    def _linear(self, x: torch.Tensor, layer: int, name: str, groups: Groups) -> torch.Tensor:
        weight, bias = self.layers[layer].linears[name]
        y = F.linear(x, weight, bias)
        adapters = self.lora.get((layer, name))
        if not adapters:
            return y
        for adapter, rows in groups:
            if adapter not in adapters:
                continue
            a, b = adapters[adapter]
            if rows is None:
                y = y + F.linear(F.linear(x, a), b)
            else:
                y = y.index_add(0, rows, F.linear(F.linear(x[rows], a), b))
        return y

    def groups(self, adapters: Sequence[str | None]) -> Groups:
        """Rows per adapter, for the low-rank matmuls (rows on the base model need none)."""
        names = {a for a in adapters if a is not None}
        if not names:
            return []
        if len(names) == 1 and None not in adapters:
            return [(names.pop(), None)]
        device = self.embed.device
        return [
            (a, torch.tensor([i for i, x in enumerate(adapters) if x == a], device=device))
            for a in sorted(names)
        ]

    # -- the cache --------------------------------------------------------------------------

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the cache (doubling) to hold `rows` rows of `length` positions."""
        if length > self.max_length:
            raise ValueError(
                f"a row needs {length} positions; the model has {self.max_length} positions"
            )
        have_rows, have_length = (
            (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)
        )
        if rows <= have_rows and length <= have_length:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, MIN_ROWS, 2 * have_rows)
        new_length = (
            have_length
            if length <= have_length
            else min(self.max_length, max(length, MIN_LENGTH, 2 * have_length))
        )
        shape = (new_rows, self.kv_heads, new_length, self.head_dim)
        n = len(self)

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = self.embed.new_zeros(shape)
            new[:n, :, : old.shape[2]] = old[:n]
            return new

        if self.keys:
            self.keys = [grown(k) for k in self.keys]
            self.values = [grown(v) for v in self.values]
        else:
            self.keys = [self.embed.new_zeros(shape) for _ in self.layers]
            self.values = [self.embed.new_zeros(shape) for _ in self.layers]
        positions = torch.arange(new_length, device=self.embed.device)[None]
        cos, sin = self._rotary(self.embed[:1], positions)
        self._cos, self._sin = cos[0], sin[0]

    def keep(self, keep: list[int]) -> list[int]:
        """Keep the rows at these (ascending) indices; return them in their new slot order.

        A kept row beyond the new end moves into the slot of a dropped one, so only the rows that
        move are copied."""
        n = len(keep)
        if n == len(self):
            return keep
        if n == 0:
            self.clear()
            return []
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        if holes:
            dst = torch.tensor(holes, device=self.lengths.device)
            src = torch.tensor(movers, device=self.lengths.device)
            for cache in (*self.keys, *self.values):
                cache[dst] = cache[src]
            self.lengths[dst] = self.lengths[src]
            for h, m in zip(holes, movers, strict=True):
                order[h] = m
        self.lengths = self.lengths[:n]
        return order

    def clear(self) -> None:
        self.lengths = self.lengths[:0]
        self.keys, self.values = [], []

    # -- forward passes -----------------------------------------------------------------------

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        copies: Sequence[int],
        adapters: Sequence[str | None],
    ) -> torch.Tensor:
        """Append copies[j] rows that continue prompts[j]; the logits of each new row's next token.

        One forward over the right-padded prompts; a prompt's extra copies get a copy of its cache."""
        device = self.embed.device
        start, width = len(self), max(len(p) for p in prompts)
        total = sum(copies)
        self._reserve(start + total, width + 1)
        firsts = [start + sum(copies[:j]) for j in range(len(prompts))]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.tensor([[*p, *[0] * (width - len(p))] for p in prompts], device=device)
        slots = torch.tensor(firsts, device=device)
        positions = torch.arange(width, device=device)
        causal = positions[None, :] <= positions[:, None]  # (query, key)
        mask = (causal[None] & (positions[None, None, :] < lengths[:, None, None]))[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self.keys[layer][slots, :, :width] = k
            self.values[layer][slots, :, :width] = v
            return self._attention(q, k, v, mask)

        cos, sin = self._cos[:width][None, None], self._sin[:width][None, None]
        h = self._layers(self.embed[ids], cos, sin, self.groups(adapters), attend)
        logits = self._logits(h[torch.arange(len(prompts), device=device), lengths - 1])
        count = torch.tensor(list(copies), device=device)
        row_lengths = lengths.repeat_interleave(count)
        self.lengths = torch.cat([self.lengths, row_lengths])
        src = slots.repeat_interleave(count - 1)
        if len(src):
            dst = torch.tensor(
                [f + i for f, c in zip(firsts, copies, strict=True) for i in range(1, c)],
                device=device,
            )
            for cache in (*self.keys, *self.values):
                cache[dst, :, :width] = cache[src, :, :width]
        return logits.repeat_interleave(count, dim=0)

    def step(self, ids: torch.Tensor, adapters: Sequence[str | None]) -> torch.Tensor:
        """Feed one token to every row (ids: (rows,)); the logits of each row's next token."""
        rows = len(self)
        lengths = self.lengths
        span = int(lengths.max()) + 1
        self._reserve(rows, span)
        slots = torch.arange(rows, device=lengths.device)
        mask = (torch.arange(span, device=lengths.device)[None] <= lengths[:, None])[
            :, None, None, :
        ]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.keys[layer], self.values[layer]
            keys[slots, :, lengths] = k[:, :, 0]
            values[slots, :, lengths] = v[:, :, 0]
            return self._attention(q, keys[:rows, :, :span], values[:rows, :, :span], mask)

        cos, sin = self._cos[lengths][:, None, None], self._sin[lengths][:, None, None]
        h = self._layers(self.embed[ids][:, None], cos, sin, self.groups(adapters), attend)
        self.lengths = lengths + 1
        return self._logits(h[:, 0])

    def _layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        groups: Groups,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Every decoder layer over h (rows, tokens, hidden); attend stores k, v and attends."""
        rows, tokens, hidden = h.shape
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, (hidden,), layer.ln1, self.eps)
            q = self._heads(self._linear(x, i, "q_proj", groups), self.heads)
            k = self._heads(self._linear(x, i, "k_proj", groups), self.kv_heads)
            v = self._heads(self._linear(x, i, "v_proj", groups), self.kv_heads)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            out = attend(i, q, k, v).transpose(1, 2).reshape(rows, tokens, -1)
            h = h + self._linear(out, i, "o_proj", groups)
            x = F.rms_norm(h, (hidden,), layer.ln2, self.eps)
            gate = F.silu(self._linear(x, i, "gate_proj", groups))
            up = self._linear(x, i, "up_proj", groups)
            h = h + self._linear(gate * up, i, "down_proj", groups)
        return h

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """(rows, tokens, heads * head_dim) -> (rows, heads, tokens, head_dim)"""
        return x.view(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=self.heads != self.kv_heads
        )

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(F.rms_norm(h, (h.shape[-1],), self.norm, self.eps), self.lm_head)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers applies it (rotate the two halves)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _lora_problem(module: Any, adapter: str) -> str | None:
    if getattr(module, "lora_variant", {}).get(adapter) is not None:
        return "it is a LoRA variant (such as DoRA), not plain LoRA"
    if getattr(module, "lora_bias", {}).get(adapter):
        return "it has a LoRA bias"
    return None
