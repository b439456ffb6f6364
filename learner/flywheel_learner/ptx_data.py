"""The pretraining data of the ptx term: documents from a .txt or .jsonl file, as batches."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from flywheel_learner.sft import collate, encode_pair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A document (every token scored), or (context, continuation) where only the continuation is.
PtxText = str | tuple[str, str]


class PtxBatch(NamedTuple):
    input_ids: torch.Tensor  # (B, T) right-padded, each text ends with eos
    attention_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) bool: the tokens the ptx NLL scores

    def select(self, rows: torch.Tensor | slice) -> PtxBatch:
        return PtxBatch(self.input_ids[rows], self.attention_mask[rows], self.loss_mask[rows])

    def trimmed(self) -> PtxBatch:
        """Without the columns past every row's last token (its right padding)."""
        width = max(1, int(self.attention_mask.sum(dim=1).max())) if len(self.input_ids) else 1
        c = (slice(None), slice(0, width))
        return PtxBatch(self.input_ids[c], self.attention_mask[c], self.loss_mask[c])


def read_pretraining_texts(path: str | Path) -> list[PtxText]:
    """Documents from a .jsonl file ({"text": ...} per line) or a .txt file.

    A .txt file with blank lines is split into paragraphs; one without, into lines.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return list(_read_jsonl_texts(path))
    if path.suffix != ".txt":
        raise ValueError(f"pretraining texts must be a .txt or .jsonl file, got {path.name}")
    raw = path.read_text()
    parts = raw.split("\n\n") if "\n\n" in raw else raw.splitlines()
    texts: list[PtxText] = [p.strip() for p in parts if p.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def _read_jsonl_texts(path: Path) -> list[str]:
    texts = []
    # split at "\n" only: JSON strings may hold U+2028 and the like raw, which splitlines breaks at
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{n} must be an object with a string "text" field')
        texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def ptx_batches(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[PtxText],
    batch_size: int,
    max_length: int,
    rng: random.Random,
) -> Iterator[PtxBatch]:
    """Endless right-padded batches of `texts` + eos, reshuffled every pass.

    Encoded as SFT encodes (sft.encode_pair): a document is a continuation with no context.
    """
    if not texts:
        raise ValueError("ptx_batches needs at least one text")
    if batch_size < 1 or max_length < 2:
        raise ValueError(
            f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}"
        )
    encoded = [
        encode_pair(tokenizer, *(("", t) if isinstance(t, str) else t), max_length) for t in texts
    ]
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        rows, order = [encoded[i] for i in order[:batch_size]], order[batch_size:]
        yield PtxBatch(*collate(rows, tokenizer.pad_token_id))
