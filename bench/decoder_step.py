"""One decode step: the lean Llama decoder against transformers' forward, same model, same rows.

    .venv/bin/python bench/decoder_step.py --rows 32 --cached 40

Prints milliseconds per step for each, over a few rounds side by side. A program, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flywheel_demo.model import build_random_model  # noqa: E402
from flywheel_model.loading import load_base  # noqa: E402
from flywheel_server.llama_decoder import LlamaDecoder  # noqa: E402


def per_call_ms(fn: Callable[[], object], n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--cached", type=int, default=40, help="positions already in every row's cache")
    p.add_argument("--hidden", type=int, default=128, help="model size (default: the demo's)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="steps timed per round")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_random_model(
            Path(tmp) / "model",
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
        )
        model, _ = load_base(model_dir)
    rows, cached = args.rows, args.cached
    prompt = torch.randint(1, model.config.vocab_size, (rows, cached))
    ids = torch.randint(1, model.config.vocab_size, (rows,))
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    positions = torch.full((rows, 1), cached)

    def transformers_step() -> None:
        for layer in cache.layers:  # back to `cached` positions: every step is the same step
            layer.keys, layer.values = layer.keys[:, :, :cached], layer.values[:, :, :cached]
        model(input_ids=ids[:, None], position_ids=positions, past_key_values=cache, use_cache=True)

    decoder = LlamaDecoder(model)
    decoder.prefill([prompt[0].tolist()], [rows], [None])

    def lean_step() -> None:
        decoder.step(ids, [None] * rows)
        decoder.lengths -= 1

    print(f"{rows} rows, {cached} cached positions, hidden {args.hidden}, {args.layers} layers")
    for _ in range(args.rounds):
        hf = per_call_ms(transformers_step, args.steps)
        lean = per_call_ms(lean_step, args.steps)
        print(f"transformers {hf:.2f} ms/step   lean {lean:.2f} ms/step   ({hf / lean:.2f}x)")


if __name__ == "__main__":
    main()
