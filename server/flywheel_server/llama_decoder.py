"""A lean decoder for Llama-shaped models: the same math as transformers' forward, fewer layers.

transformers' forward is general; the engine calls it once per token for every running row, and
on a small model its Python around each layer costs more than the matmuls. This decoder runs the
same weights with a handful of tensor ops per layer, and keeps each row's keys and values in a
slot of a preallocated cache:

- a row's history starts at position 0 of its slot, so a row's logits do not depend on who else
  is in the batch (no left padding, no shared mask);
- a joining row writes its prompt into a free slot; a leaving row's slot is refilled by the last
  row (one row's cache is copied, not the whole batch's);
- each row names its LoRA adapter: rows on the same adapter share one pair of low-rank matmuls;
  an adapter may also bring its own final norm weights, applied to its rows only.

The forward pass itself is `flywheel_model.llama.decode`, on the layer loop the learner's
training forward also runs.
It serves Llama, Mistral (without a sliding window) and Qwen2 models; `unsupported_reason` says
why another model falls back to the generic decoder. Its logits match transformers' (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flywheel_model.llama import (
    PROJECTIONS,
    DecodeShape,
    DecodeWeights,
    config_problem,
    decode,
    lora_problem,
    projection,
)

MIN_ROWS, MIN_LENGTH = 8, 64  # the cache's first size; it doubles when it must


def unsupported_reason(model: Any) -> str | None:
    """Why this model cannot use the lean decoder, or None when it can."""
    problem = config_problem(model.config)
    if problem:
        return problem
    for layer in model.model.layers:
        for name in PROJECTIONS:
            if type(projection(layer, name)) is not torch.nn.Linear:
                return f"{name} is not a plain Linear (quantised or already wrapped)"
    return None


class LlamaDecoder:
    """Keys, values and length of every running row, and the forward passes that extend them."""

    def __init__(self, model: Any) -> None:
        config, inner = model.config, model.model
        attention = inner.layers[0].self_attn
        self.shape = DecodeShape(
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
            eps=config.rms_norm_eps,
        )
        self.max_length: int = config.max_position_embeddings
        self.embed = inner.embed_tokens.weight
        linears = [projection(layer, name) for layer in inner.layers for name in PROJECTIONS]
        self.weights = DecodeWeights(
            embed=self.embed,
            norm=inner.norm.weight,
            lm_head=model.lm_head.weight,
            norms=[
                w
                for layer in inner.layers
                for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            ],
            linears=[m.weight for m in linears],
            biases=[m.bias for m in linears],
            cos=self.embed.new_zeros(0, self.shape.head_dim),
            sin=self.embed.new_zeros(0, self.shape.head_dim),
        )
        self.layers = len(inner.layers)
        self._modules = {id(m): i for i, m in enumerate(linears)}  # base Linear -> its index
        self._rotary = inner.rotary_emb
        self.lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.final_norms: dict[str, torch.Tensor] = {}
        self._lora_lists: dict[tuple[str, ...], list[list[tuple[int, torch.Tensor, torch.Tensor]]]]
        self._lora_lists = {}
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.embed.device)
        self.keys: list[torch.Tensor] = []  # per layer: (row slots, positions, kv heads, head dim)
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.lengths)

    # -- adapters ---------------------------------------------------------------------------

    def read_adapters(self, peft: Any, final_norms: dict[str, torch.Tensor] | None = None) -> None:
        """Take every LoRA adapter's weights from the peft model (None: no adapters), and the
        final norm weights of those adapters that bring their own."""
        from peft.tuners.lora import LoraLayer

        lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._lora_lists = {}
        self.final_norms = dict(final_norms or {})
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
            index = self._modules.get(id(module.get_base_layer()))
            for adapter in {*module.lora_A, *module.lora_embedding_A}:
                problem = f"it adapts {name}" if index is None else lora_problem(module, adapter)
                if index is None or problem:
                    raise ValueError(f"the lean decoder cannot serve adapter {adapter}: {problem}")
                dtype = self.embed.dtype
                a = torch.as_tensor(module.lora_A[adapter].weight).to(dtype)
                b = (module.lora_B[adapter].weight * module.scaling[adapter]).to(dtype)
                lora.setdefault(index, {})[adapter] = (a, b)
        self.lora = lora

    def _adapters(
        self, adapters: Sequence[str | None]
    ) -> tuple[list[list[tuple[int, torch.Tensor, torch.Tensor]]], list[torch.Tensor | None]]:
        """The forward's view of the rows' adapters: per linear, the (group, A, B) to add; per
        group, its rows (None: every row). Rows on the base model are in no group."""
        names = sorted({a for a in adapters if a is not None})
        if len(names) == 1 and None not in adapters:
            rows: list[torch.Tensor | None] = [None]
        else:
            device = self.embed.device
            rows = [
                torch.tensor([i for i, x in enumerate(adapters) if x == a], device=device)
                for a in names
            ]
        key = tuple(names)
        if key not in self._lora_lists:
            self._lora_lists[key] = [
                [(g, *self.lora[i][a]) for g, a in enumerate(names) if a in self.lora.get(i, {})]
                for i in range(len(self.weights.linears))
            ]
        return self._lora_lists[key], rows

    # -- the cache --------------------------------------------------------------------------

    def _reserve(self, rows: int, length: int) -> None:
        """Grow the cache (doubling) to hold `rows` rows of `length` positions."""
        if length > self.max_length:
            raise ValueError(
                f"a row needs {length} positions; the model has {self.max_length} positions"
            )
        have_rows, have_length = self.keys[0].shape[:2] if self.keys else (0, 0)
        if rows <= have_rows and length <= have_length:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, MIN_ROWS, 2 * have_rows)
        new_length = (
            have_length
            if length <= have_length
            else min(self.max_length, max(length, MIN_LENGTH, 2 * have_length))
        )
        shape = (new_rows, new_length, self.shape.kv_heads, self.shape.head_dim)
        n = len(self)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            new = self.embed.new_zeros(shape)
            if old is not None:
                new[:n, : old.shape[1]] = old[:n]
            return new

        empty: list[torch.Tensor | None] = [None] * self.layers
        self.keys = [grown(k) for k in self.keys or empty]
        self.values = [grown(v) for v in self.values or empty]
        positions = torch.arange(new_length, device=self.embed.device)[None]
        cos, sin = self._rotary(self.embed[:1], positions)
        self.weights = self.weights._replace(cos=cos[0], sin=sin[0])

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
        self._reserve(start + sum(copies), width + 1)
        firsts = [start + sum(copies[:j]) for j in range(len(prompts))]
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.tensor([[*p, *[0] * (width - len(p))] for p in prompts], device=device)
        slots = torch.tensor(firsts, device=device)
        positions = torch.arange(width, device=device).expand(len(prompts), width)
        logits = self._run(ids, positions, slots, lengths - 1, width, False, adapters)
        count = torch.tensor(list(copies), device=device)
        self.lengths = torch.cat([self.lengths, lengths.repeat_interleave(count)])
        src = slots.repeat_interleave(count - 1)
        if len(src):
            dst = torch.tensor(
                [f + i for f, c in zip(firsts, copies, strict=True) for i in range(1, c)],
                device=device,
            )
            for cache in (*self.keys, *self.values):
                cache[dst, :width] = cache[src, :width]
        return logits.repeat_interleave(count, dim=0)

    def prompt_logits(self, prompt: Sequence[int], adapter: str | None) -> torch.Tensor:
        """The logits after every token of prompt, (tokens, vocab); the running rows go on as
        they were (the prompt passes through the first free slot, which stays free)."""
        device, width = self.embed.device, len(prompt)
        self._reserve(len(self) + 1, width)
        positions = torch.arange(width, device=device)[None]
        slot = torch.tensor([len(self)], device=device)
        ids = torch.tensor([list(prompt)], device=device)
        return self._run(ids, positions, slot, positions, width, False, [adapter])[0]

    def step(self, ids: torch.Tensor, adapters: Sequence[str | None]) -> torch.Tensor:
        """Feed one token to every row (ids: (rows,)); the logits of each row's next token."""
        rows, lengths = len(self), self.lengths
        span = int(lengths.max()) + 1
        self._reserve(rows, span)
        slots = torch.arange(rows, device=lengths.device)
        logits = self._run(
            ids[:, None], lengths[:, None], slots, torch.zeros_like(slots), span, True, adapters
        )
        self.lengths = lengths + 1
        return logits

    def _final_norm(self, adapters: Sequence[str | None]) -> torch.Tensor:
        """The final norm's weights: (hidden,) shared, or (rows, hidden) when some row's
        adapter brings its own."""
        names = set(adapters)
        if len(names) == 1:  # the usual decode step: every row on the live policy
            (name,) = names
            return self.final_norms.get(name, self.weights.norm) if name else self.weights.norm
        own = [self.final_norms.get(a) if a is not None else None for a in adapters]
        if all(w is None for w in own):
            return self.weights.norm
        return torch.stack([self.weights.norm if w is None else w for w in own])

    def _run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        last: torch.Tensor,
        span: int,
        contiguous: bool,
        adapters: Sequence[str | None],
    ) -> torch.Tensor:
        lora, group_rows = self._adapters(adapters)
        return decode(
            ids,
            positions,
            slots,
            last,
            span,
            contiguous,
            self.weights._replace(norm=self._final_norm(adapters)),
            self.shape,
            self.keys,
            self.values,
            lora,
            group_rows,
        )
