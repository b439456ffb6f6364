"""The running decode batch: its rows, and the decoders that hold their caches.

A decoder keeps every running row's history and runs the forward passes: `prefill` appends rows
for new prompts, `step` feeds one token to every row, `keep` drops finished rows. Two exist:
`llama_decoder.LlamaDecoder` for Llama-shaped models, and `GenericDecoder` here for any causal LM
transformers can run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from flywheel_server.domain import Sampling
from flywheel_server.engine_api import TokenLogprob
from flywheel_server.sampling import find_stop, safe_prefix_length


@dataclass(eq=False)
class Row:
    """One completion being decoded."""

    owner: Any  # the request this row belongs to
    index: int  # completion index within its request
    adapter: str | None
    sampling: Sampling
    generator: torch.Generator | None  # None: draw from torch's shared generator
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet streamed

    def advance(
        self, token: int, eos: int, decode: Callable[[list[int]], str]
    ) -> tuple[str, str | None]:
        """Take one sampled token; return (text to stream now, finish reason or None)."""
        stops = self.sampling.stop
        if token == eos:
            self.finish_reason = "stop"
            return self._flush(decode, stops), "stop"
        self.tokens.append(token)
        text = decode(self.tokens)
        cut = find_stop(text, stops)
        if cut >= 0 or len(self.tokens) >= self.sampling.max_tokens:
            self.finish_reason = "stop" if cut >= 0 else "length"
            text = text[:cut] if cut >= 0 else text
            delta, self.sent = text[self.sent :], len(text)
            return delta, self.finish_reason
        # Hold back a partial stop string and a trailing half of a multi-byte character.
        upto = safe_prefix_length(text.removesuffix("\ufffd"), stops)
        delta = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return delta, None

    def _flush(self, decode: Callable[[list[int]], str], stops: tuple[str, ...]) -> str:
        text = decode(self.tokens)
        cut = find_stop(text, stops)
        text = text[:cut] if cut >= 0 else text
        return text[self.sent :]


class Decoder(Protocol):
    def __len__(self) -> int: ...

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        copies: Sequence[int],
        adapters: Sequence[str | None],
    ) -> torch.Tensor:
        """Append copies[j] rows that continue prompts[j] (on adapters[j]); return the logits of
        each new row's next token."""
        ...

    def step(self, ids: torch.Tensor, adapters: Sequence[str | None]) -> torch.Tensor:
        """Feed ids (one per row) to every row; return the logits of each row's next token."""
        ...

    def prompt_logits(self, prompt: Sequence[int], adapter: str | None) -> torch.Tensor:
        """The logits after every token of prompt on adapter, (tokens, vocab), leaving the
        running rows as they were."""
        ...

    def keep(self, keep: list[int]) -> list[int]:
        """Keep the rows at these ascending indices; return them in their new order."""
        ...

    def clear(self) -> None: ...


class GenericDecoder:
    """Any transformers causal LM, through its own forward and cache.

    Rows are left-padded to a common cache length, so every row's newest token sits in the last
    column. A row joining mid-flight brings the cache of its own prefill; columns that became
    padding for every row are trimmed when rows leave. Positions are kept per row, so a row's
    logits do not depend on who else is in the batch.
    """

    def __init__(self, forward: Callable[..., Any], pad_id: int, device: str) -> None:
        self.forward = forward  # forward(adapters, **model_kwargs): the model, per-row adapters
        self.pad_id = pad_id
        self.device = device
        self.clear()

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def clear(self) -> None:
        self.cache: Any = None  # transformers DynamicCache, (B, heads, T, head_dim) per layer
        self.mask: torch.Tensor | None = None  # (B, T)
        self.positions: torch.Tensor | None = None  # (B,): position id of each row's next token

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        copies: Sequence[int],
        adapters: Sequence[str | None],
    ) -> torch.Tensor:
        width = max(len(p) for p in prompts)
        ids = torch.tensor(
            [[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        out = self.forward(
            list(adapters),
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            # A full cache on every layer: rows are joined, padded and trimmed column by column,
            # which a sliding layer's (it keeps its last window only) cannot follow. The model
            # still masks its sliding layers to their window.
            past_key_values=DynamicCache(),
            use_cache=True,
        )
        owner = torch.arange(len(prompts), device=self.device).repeat_interleave(
            torch.tensor(list(copies), device=self.device)
        )
        cache = out.past_key_values
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[owner], layer.values[owner]
        self._join(cache, mask[owner])
        return out.logits[owner, -1]

    def _join(self, cache: Any, mask: torch.Tensor) -> None:
        positions = mask.sum(dim=1)
        if self.mask is None or self.positions is None:
            self.cache, self.mask, self.positions = cache, mask, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.positions = torch.cat([self.positions, positions])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, width, dim=2), _left_pad(theirs.keys, width, dim=2)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, width, dim=2), _left_pad(theirs.values, width, dim=2)]
            )

    def prompt_logits(self, prompt: Sequence[int], adapter: str | None) -> torch.Tensor:
        ids = torch.tensor([list(prompt)], device=self.device)
        return self.forward([adapter], input_ids=ids, use_cache=False).logits[0]

    def step(self, ids: torch.Tensor, adapters: Sequence[str | None]) -> torch.Tensor:
        assert self.mask is not None and self.positions is not None
        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = self.forward(
            list(adapters),
            input_ids=ids.unsqueeze(-1),
            attention_mask=mask,
            position_ids=self.positions.unsqueeze(-1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.mask, self.cache, self.positions = mask, out.past_key_values, self.positions + 1
        return out.logits[:, -1]

    def keep(self, keep: list[int]) -> list[int]:
        if len(keep) == len(self):
            return keep
        if not keep:
            self.clear()
            return []
        assert self.mask is not None and self.positions is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        self.positions = self.positions[index]
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return keep


def _left_pad(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
