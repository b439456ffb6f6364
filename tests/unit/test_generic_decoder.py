"""transformers' own forward behind the generic decoder, on models whose layers attend over a
sliding window shorter than the rows: logits equal a fresh forward of each whole row, through
a row joining mid-flight (left-padded to the others) and decode steps past the window."""

from __future__ import annotations

import pytest
import torch

from flywheel_server.decoding import GenericDecoder
from tests.support import tiny_causal_lm

pytestmark = pytest.mark.unit

WINDOW = 8


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("gemma2", {"head_dim": 16, "sliding_window": WINDOW}),
        ("mistral", {"sliding_window": WINDOW, "num_key_value_heads": 4}),
    ],
)
def test_rows_past_the_sliding_window_match_a_fresh_forward(model_type, extra) -> None:
    model = tiny_causal_lm(model_type, **extra).eval()
    decoder = GenericDecoder(lambda adapters, **kw: model(**kw), pad_id=0, device="cpu")
    rows = [[5, 9, 3, 7, 11, 2, 8, 6, 4, 10, 12, 3]]  # longer than the window
    with torch.inference_mode():
        logits = decoder.prefill(rows, [1], [None])
        for step in range(2 * WINDOW):
            if step == 3:  # a shorter row joins the running one
                rows.append([7, 2, 9])
                logits = torch.cat([logits, decoder.prefill(rows[-1:], [1], [None])])
            for row, row_logits in zip(rows, logits, strict=True):
                fresh = model(input_ids=torch.tensor([row])).logits[0, -1]
                torch.testing.assert_close(row_logits, fresh, atol=1e-4, rtol=1e-4)
            ids = logits.argmax(-1)
            for row, token in zip(rows, ids.tolist(), strict=True):
                row.append(token)
            logits = decoder.step(ids, [None] * len(rows))
