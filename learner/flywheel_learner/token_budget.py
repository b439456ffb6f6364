"""Micro-batches sized by tokens, not rows (`--max-tokens-per-microbatch`).

A forward's activations grow with the tokens it holds: rows times the padded width. Sized in
rows, one long response pads every row of its micro-batch to its length, and a step runs out of
memory on a single long sample. Sized in tokens, items are sorted by length and packed greedily,
so long items travel with few others (or alone) and short ones share a micro-batch; gradient
accumulation with each part's share of the loss keeps the update the unsplit one.

Pure: lengths in, groups of indices out.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack(lengths: Sequence[int], budget: int, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of `lengths` in groups whose padded size (rows x longest) is at most `budget`.

    Item i is `rows[i]` rows (default 1) of at most `lengths[i]` tokens: a ranking forwarded as
    K separate completions is K rows. An item over the budget by itself goes alone: a sequence
    cannot be split across forwards, so that is the least a step can hold. Groups come
    shortest first, each in ascending length. budget <= 0: one group of everything.
    """
    if not lengths:
        return []
    if budget <= 0:
        return [list(range(len(lengths)))]
    height = rows or [1] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = [[]]
    filled = 0  # rows in the last group
    for i in order:  # sorted: lengths[i] is the longest of its group so far
        if groups[-1] and (filled + height[i]) * lengths[i] > budget:
            groups.append([])
            filled = 0
        groups[-1].append(i)
        filled += height[i]
    return groups


def padded_tokens(lengths: Sequence[int], rows: Sequence[int] | None = None) -> int:
    """Tokens a forward of these items holds: all their rows padded to the longest."""
    return sum(rows or [1] * len(lengths)) * max(lengths, default=0)
