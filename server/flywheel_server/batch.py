"""The running decode batch: rows from different requests, each with its own cache history.

Rows are left-padded to a common cache length, so every row's newest token sits in the last
column. A row joining mid-flight brings the cache of its own prefill; a finished row is dropped at
the next step and columns that became padding for every row are trimmed away. Positions are kept
per row, so a row's logits do not depend on who else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flywheel_server.domain import Sampling
from flywheel_server.sampling import find_stop, safe_prefix_length


@dataclass(eq=False)
class Row:
    """One completion being decoded."""

    owner: Any  # the request this row belongs to
    index: int  # completion index within its request
    adapter: str | None
    sampling: Sampling
    generator: torch.Generator | None  # None: draw from torch's shared generator
    position: int  # position id of the next token fed in
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None

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


class Batch:
    """KV cache, attention mask and next input token of every running row."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: Any = None  # transformers DynamicCache, (B, heads, T, head_dim) per layer
        self.mask: torch.Tensor | None = None  # (B, T)
        self.next_ids: torch.Tensor | None = None  # (B,)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Row], cache: Any, mask: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Add rows whose prefill produced `cache` (n rows) and sampled `next_ids` (n,)."""
        if self.cache is None or not self.rows:
            self.rows, self.cache, self.mask, self.next_ids = list(rows), cache, mask, next_ids
            return
        assert self.mask is not None and self.next_ids is not None
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, width, dim=2), _left_pad(theirs.keys, width, dim=2)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, width, dim=2), _left_pad(theirs.values, width, dim=2)]
            )
        self.next_ids = torch.cat([self.next_ids, next_ids])
        self.rows.extend(rows)

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices, then trim columns that are padding for all."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()  # type: ignore[misc]
            return
        assert self.mask is not None and self.next_ids is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[index]
        self.next_ids = self.next_ids[index]
        start = int((self.mask.sum(dim=0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _left_pad(x: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
