"""`flywheel serve` with the model's math taken out: the ceiling of everything around it.

The engine's scheduler, admission, sampling, detokenisation and delivery, the service, the store
and both transports all run for real; only the decoder's forward passes are replaced by constant
logits (every row's next token is the same ordinary token, never end-of-sequence). `bench/serve.py
--backends null` drives it like the real server, to show how many tokens per second this machine's
HTTP side can carry at all.

    .venv/bin/python bench/null_engine.py serve --model DIR ...   # the arguments of flywheel
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from flywheel_cli.main import main
from flywheel_server import engine


class NullDecoder:
    """The decoder protocol (`flywheel_server.decoding.Decoder`) at no cost: fixed logits."""

    def __init__(self, vocab: int, token: int) -> None:
        self.logits = torch.zeros(vocab)
        self.logits[token] = 30.0  # sampled at any temperature
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        copies: Sequence[int],
        adapters: Sequence[str | None],
    ) -> torch.Tensor:
        self.rows += sum(copies)
        return self.logits.expand(sum(copies), -1)

    def step(self, ids: torch.Tensor, adapters: Sequence[str | None]) -> torch.Tensor:
        return self.logits.expand(self.rows, -1)

    def keep(self, keep: list[int]) -> list[int]:
        self.rows = len(keep)
        return keep

    def clear(self) -> None:
        self.rows = 0


def null_decoder(self: engine.TorchEngine, choice: str) -> NullDecoder:
    token = self.encode("a")[0]
    return NullDecoder(self.model.config.vocab_size, token)


if __name__ == "__main__":
    engine.TorchEngine._make_decoder = null_decoder  # type: ignore[assignment,method-assign]
    sys.exit(main(sys.argv[1:]))
