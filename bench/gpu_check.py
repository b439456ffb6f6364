"""The GPU check (issue 17): parity with CPU float32, the engine's decode speed and the learner's
speed and memory at Qwen2.5-1.5B's shape, as one table.

    PYTHONPATH=model:demo:server:learner:clients/python:proto python3 bench/gpu_check.py
    .venv/bin/python bench/gpu_check.py --device cpu --tiny    # the same code paths, in CI

(a) parity: a tiny Llama's logits, the K-way reward loss of a reward model on fixed rankings,
    and one PPO-ptx update (`optimise` on one fixed rollout, from the same start) on --device in
    float32 and bfloat16, against CPU float32, each within a stated tolerance.
(b) decode: the torch engine in-process, --concurrency requests at once of --tokens tokens each
    (ignore_eos), tokens/s; beside it transformers' `generate` on one static batch of as many
    rows, on the same device and model.
    Then what the learner shipped, served: the PPO step's policy LoRA and the reward model
    loaded into the engine (each smoke-checked as a hot swap is), half the rows decoded on the
    policy, a ranking scored by the reward model.
(c) learner: reward-refit steps and one PPO-ptx step on that model (with and without
    --gradient-checkpointing), samples/s, with the peak memory of each (CUDA max allocated;
    peak RSS on CPU) and, for PPO, that peak over the bytes the step holds.

A part that raises becomes a FAIL row (its traceback on stderr) and the parts after it still
run, so one run on a lent GPU reports all it can; any FAIL exits 1.

Uses only torch, transformers, peft, safetensors, tokenizers, tqdm and the repo's packages, so
it runs on the device image as it is. Random weights: speed and memory need no training.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import disable_progress_bar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import held_bytes, random_reward_model, weight_bytes  # noqa: E402
from flywheel_demo.model import _task_texts, build_tiny_model, chat_prompt  # noqa: E402
from flywheel_demo.task import pretraining_texts  # noqa: E402
from flywheel_demo.tokenizer import train_tokenizer  # noqa: E402
from flywheel_learner.ppo import collect_rollout, optimise, ppo_step  # noqa: E402
from flywheel_learner.ppo_config import PPOConfig  # noqa: E402
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer, save_policy  # noqa: E402
from flywheel_learner.ptx_data import ptx_batches  # noqa: E402
from flywheel_learner.reward import RewardConfig, fit_reward_model  # noqa: E402
from flywheel_learner.reward_refit import score_saved  # noqa: E402
from flywheel_model import adapters, loading, memory  # noqa: E402
from flywheel_model.precision import Precision  # noqa: E402

# Qwen2.5-1.5B-Instruct's config.json, as published (weights random here).
QWEN25_1_5B = dict(
    model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
    max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
    tie_word_embeddings=True,
)  # fmt: skip
# Tolerances against CPU float32, as |x - ref| / |ref|: float32 elsewhere differs in summation
# order only; bfloat16 keeps 8 bits of mantissa (0.4% per rounding), a few roundings deep on the
# tiny model. An update is Adam's: its first steps move each weight by about lr * sign(gradient),
# so a gradient near zero whose sign rounding flips moves that weight the other way.
TOL = {
    torch.float32: {"logits at attended positions": 1e-4, "K-way reward loss": 1e-4,
                    "one PPO-ptx update (policy LoRA delta)": 1e-3},
    torch.bfloat16: {"logits at attended positions": 2e-2, "K-way reward loss": 2e-2,
                     "one PPO-ptx update (policy LoRA delta)": 0.1},
}  # fmt: skip
INSTRUCTIONS = ["reverse: abc", "add: 1 + 2", "sort: cba", "capitalise: hi"] * 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model throughout (CI, CPU)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None,
                   help="default: 1 32 128 (--tiny: 1 4 8)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=None, help="per request (default 128, tiny 16)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    return p.parse_args()


Row = tuple[str, str, str, str]  # check, measured, bound, verdict


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# -- (a) parity ---------------------------------------------------------------------------------


def relative(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """|a - b| / |b| in the L2 norm (METHOD.md's measure), in float64 on the CPU."""
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp(min=1e-12))


def parity(device: str, work: Path) -> list[Row]:
    base = build_tiny_model(work / "tiny", seed=0)
    reward = random_reward_model(base, work / "reward")
    config = PPOConfig(rollout_batch=16, minibatches=2, max_new_tokens=8, ptx_batch=8,
                       ptx_max_length=64, lora_r=4, lora_alpha=8)  # fmt: skip
    reference = SharedBaseModels.build(base, reward, config)
    prompts = [chat_prompt(reference.tokenizer, i) for i in INSTRUCTIONS]
    torch.manual_seed(0)
    rollout = collect_rollout(reference, prompts, config, config.beta)  # sampled once, on CPU
    rng = random.Random(0)
    ptx = next(ptx_batches(reference.tokenizer, pretraining_texts(rng, 16), 8, 64, rng))
    attended = rollout.attention.bool()  # logits at padding are no one's output
    rankings = [(p, [["cba"], ["abc"], ["x"]]) for p in prompts[:4]]
    rcfg = RewardConfig(r=4, alpha=8)

    def run(precision: Precision) -> dict[str, Any]:
        models = SharedBaseModels.build(base, reward, config, precision)
        dev = precision.device
        with torch.no_grad(), precision.autocast():
            out = models.peft(input_ids=rollout.ids.to(dev),
                              attention_mask=rollout.attention.to(dev))  # fmt: skip
        moved = type(rollout)(*(t.to(dev) if isinstance(t, torch.Tensor) else t for t in rollout))
        policy = models.trainable_groups()[0]
        before = torch.cat([p.detach().float().cpu().flatten() for p in policy])
        torch.manual_seed(0)
        optimise(models, make_optimizer(models, config), moved,
                 type(ptx)(*(t.to(dev) for t in ptx)), config)  # fmt: skip
        after = torch.cat([p.detach().float().cpu().flatten() for p in policy])
        loss = score_saved(base, reward, rankings, rcfg, precision).loss
        logits = out.logits.float().cpu()
        return {"logits": logits[attended], "padding": logits[~attended], "loss": loss,
                "update": after - before}  # fmt: skip

    cpu = run(Precision())
    rows: list[Row] = []
    for dtype in (torch.float32, torch.bfloat16):
        got = run(Precision(device, dtype))
        name = str(dtype).removeprefix("torch.")
        print(f"   {name}: logits at padding differ by {relative(got['padding'], cpu['padding']):.2e}"
              " (no one reads them)", file=sys.stderr)  # fmt: skip
        for check, value in (
            ("logits at attended positions", relative(got["logits"], cpu["logits"])),
            ("K-way reward loss", relative(got["loss"], cpu["loss"])),
            ("one PPO-ptx update (policy LoRA delta)", relative(got["update"], cpu["update"])),
        ):
            tol = TOL[dtype][check]
            rows.append((f"parity {name}: {check}", f"{value:.2e} rel.", f"<= {tol:g}",
                         "ok" if value <= tol else "FAIL"))  # fmt: skip
    return rows


# -- (b) decode and (c) learner at size ---------------------------------------------------------


def shaped_model(shape: dict[str, Any], device: str, dtype: torch.dtype, out: Path) -> int:
    """A random model of `shape` with the demo's tokenizer, saved to `out`; its weights' bytes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = train_tokenizer(_task_texts(random.Random(0), 200))
    shape = dict(shape)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape,
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weights = weight_bytes(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return weights


def model_rows(shape: dict[str, Any], device: str, dtype: torch.dtype, out: Path,
               label: str) -> list[Row]:  # fmt: skip
    weights = shaped_model(shape, device, dtype, out)
    name = str(dtype).removeprefix("torch.")
    return [(f"{label} {name}: base weights", f"{weights / 2**30:.2f} GiB", "-", "")]


def open_engine(model_dir: Path, device: str, dtype: torch.dtype, rows: int) -> Any:
    from flywheel_server.torch_engine import TorchEngine

    name = str(dtype).removeprefix("torch.")
    return TorchEngine(model_dir, device=device, dtype=name, max_batch=max(rows, 1),
                       max_pending=rows + 1)  # fmt: skip


def engine_tokens_per_s(engine: Any, rows: int, tokens: int,
                        adapters: Sequence[str | None] = (None,)) -> float:  # fmt: skip
    """Tokens/s of `rows` requests at once, row i on adapters[i % len(adapters)] (after one
    warm-up burst: kernels, caches)."""
    from flywheel_server.domain import Sampling
    from flywheel_server.engine_api import EngineRequest

    prompt = tuple(engine.encode(chat_prompt(engine.tokenizer, "reverse: flywheel")))
    sampling = Sampling(max_tokens=tokens, temperature=1.0, ignore_eos=True)

    async def one(adapter: str | None) -> int:
        done = 0
        async for e in engine.generate(EngineRequest(prompt, 1, sampling, adapter)):
            done = max(done, e.completion_tokens)
        return done

    async def burst() -> int:
        return sum(await asyncio.gather(*(one(adapters[i % len(adapters)]) for i in range(rows))))

    asyncio.run(burst())
    start = time.perf_counter()
    generated = asyncio.run(burst())
    return generated / (time.perf_counter() - start)


def decode_tokens_per_s(model_dir: Path, device: str, dtype: torch.dtype, rows: int,
                        tokens: int) -> float:  # fmt: skip
    """The engine's tokens/s on the bare base, in an engine of its own."""
    engine = open_engine(model_dir, device, dtype, rows)
    try:
        return engine_tokens_per_s(engine, rows, tokens)
    finally:
        engine.close()


def served_adapters(model_dir: Path, device: str, dtype: torch.dtype, label: str, rows: int,
                    tokens: int) -> list[Row]:  # fmt: skip
    """What the learner shipped, in the engine: the PPO policy and the reward model loaded
    (each smoke-checked), half the rows decoded on the policy, a ranking scored."""
    engine = open_engine(model_dir, device, dtype, rows)
    try:
        asyncio.run(engine.load_adapter("policy-v1", model_dir.parent / "policy", reward=False))
        asyncio.run(engine.load_adapter("reward-v1", model_dir.parent / "rm", reward=True))
        speed = engine_tokens_per_s(engine, rows, tokens, ("policy-v1", None))
        prompt = chat_prompt(engine.tokenizer, "reverse: abc")
        scores = asyncio.run(engine.score("reward-v1", prompt, ["cba", "abc", "x"]))
    finally:
        engine.close()
    finite = all(math.isfinite(x) for x in scores) and len(scores) == 3
    return [(f"decode {label}, {rows} at once, half on the PPO policy's LoRA: engine tok/s",
             f"{speed:.0f}", "-", ""),
            ("reward model in the engine: a ranking of 3 scored", " ".join(f"{x:.3g}" for x in scores),
             "finite", "ok" if finite else "FAIL")]  # fmt: skip


def generate_tokens_per_s(model_dir: Path, device: str, dtype: torch.dtype, rows: int,
                          tokens: int) -> float:  # fmt: skip
    model, tokenizer = loading.load_base(model_dir, device=device, dtype=dtype)
    ids = tokenizer([chat_prompt(tokenizer, "reverse: flywheel")] * rows, return_tensors="pt",
                    add_special_tokens=False)["input_ids"].to(device)  # fmt: skip

    def run() -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                           max_new_tokens=tokens, min_new_tokens=tokens,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        sync(device)

    run()
    start = time.perf_counter()
    run()
    return rows * tokens / (time.perf_counter() - start)


def reward_speed(model_dir: Path, device: str, dtype: torch.dtype, tiny: bool) -> list[Row]:
    """Reward-model refit steps on the shaped model; saves the fit beside it for PPO."""
    precision = Precision(device, dtype)
    base, tokenizer = loading.load_base(model_dir, device=device, dtype=dtype)
    rankings = [(chat_prompt(tokenizer, i), [["cba"], ["abc"], ["x"], ["abcabc"]])
                for i in INSTRUCTIONS]  # fmt: skip
    steps = 4 if tiny else 10
    config = RewardConfig(steps=steps, warmup=0, batch_rankings=16, r=16, alpha=16)
    reset_peak(device)
    start = time.perf_counter()
    with precision.autocast():
        fit = fit_reward_model(base, tokenizer, rankings, config, held_out=rankings[:4],
                               progress=False)  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - start
    peak = memory.peak_bytes(device)
    adapters.save_adapter(fit.model, fit.adapter_name, model_dir.parent / "rm", head=fit.head,
                          base_model="")  # fmt: skip
    return [("reward refit: completions/s", f"{steps * 16 * 4 / seconds:.1f}", "-", ""),
            ("reward refit: peak memory", f"{peak / 2**30:.2f} GiB", "-", "")]  # fmt: skip


def ppo_speed(model_dir: Path, device: str, dtype: torch.dtype, tiny: bool,
              checkpointing: bool) -> list[Row]:  # fmt: skip
    """One PPO-ptx step (after a warm-up step) against the reward model `reward_speed` saved."""
    ppo = PPOConfig(rollout_batch=16 if tiny else 64, minibatches=2, max_new_tokens=16 if tiny
                    else 64, ptx_batch=8, ptx_max_length=64 if tiny else 256, lora_r=8,
                    gradient_checkpointing=checkpointing)  # fmt: skip
    models = SharedBaseModels.build(model_dir, model_dir.parent / "rm", ppo,
                                    Precision(device, dtype))  # fmt: skip
    rng = random.Random(0)
    ptx = next(ptx_batches(models.tokenizer, pretraining_texts(rng, 32), ppo.ptx_batch,
                           ppo.ptx_max_length, rng))  # fmt: skip
    optimizer = make_optimizer(models, ppo)
    batch = ([chat_prompt(models.tokenizer, i) for i in INSTRUCTIONS] * 16)[: ppo.rollout_batch]
    ppo_step(models, optimizer, batch, ptx, ppo, ppo.kl_controller())  # warm-up
    reset_peak(device)
    stats = ppo_step(models, optimizer, batch, ptx, ppo, ppo.kl_controller())
    peak, held = memory.peak_bytes(device), sum(held_bytes(models, optimizer))
    save_policy(models, model_dir.parent / "policy", model_dir)  # for served_adapters
    how = "PPO-ptx step" + (" + checkpointing" if checkpointing else "")
    return [(f"{how} ({ppo.rollout_batch} x {ppo.max_new_tokens} tokens): samples/s",
             f"{stats.samples_per_second:.1f}", "-", ""),
            (f"{how}: peak memory", f"{peak / 2**30:.2f} GiB",
             f"held {held / 2**30:.2f} GiB", f"{peak / held:.2f}x")]  # fmt: skip


def section(rows: list[Row], name: str, run: Callable[[], list[Row]]) -> None:
    """One part of the table; a part that raises is a FAIL row (traceback on stderr), and the
    parts after it still run, so one lent-GPU run reports everything it can."""
    print(f"-- {name}", file=sys.stderr, flush=True)
    gc.collect()  # the last part's models, so peaks count this part's alone
    started = time.perf_counter()
    try:
        rows += run()
    except Exception as e:  # reported as a row; the run goes on
        traceback.print_exc()
        rows.append((name, f"{type(e).__name__}: {e}"[:160].replace("|", "/"), "-", "FAIL"))
    print(f"-- {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def decode(model_dir: Path, device: str, dtype: torch.dtype, label: str, rows: int,
           tokens: int) -> list[Row]:  # fmt: skip
    name = str(dtype).removeprefix("torch.")
    ours = decode_tokens_per_s(model_dir, device, dtype, rows, tokens)
    theirs = generate_tokens_per_s(model_dir, device, dtype, rows, tokens)
    return [(f"decode {label} {name}, {rows} at once: engine tok/s", f"{ours:.0f}",
             f"generate {theirs:.0f}", f"{ours / theirs:.2f}x")]  # fmt: skip


def main() -> None:
    args = parse_args()
    disable_progress_bar()
    concurrency = args.concurrency or ([1, 4, 8] if args.tiny else [1, 32, 128])
    tokens = args.tokens or (16 if args.tiny else 128)
    dtype = torch.float32 if torch.device(args.device).type == "cpu" else torch.bfloat16
    shape = TINY if args.tiny else QWEN25_1_5B
    label = "tiny Qwen2-shaped" if args.tiny else "Qwen2.5-1.5B-shaped"
    rows: list[Row] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = work / "shaped"
        section(rows, "parity", lambda: parity(args.device, work))
        section(rows, "model", partial(model_rows, shape, args.device, dtype, model_dir, label))
        section(
            rows, "reward refit", lambda: reward_speed(model_dir, args.device, dtype, args.tiny)
        )
        for ckpt in (False, True):
            section(
                rows,
                "PPO-ptx" + " + checkpointing" * ckpt,
                partial(ppo_speed, model_dir, args.device, dtype, args.tiny, ckpt),
            )
        section(rows, "served adapters", partial(served_adapters, model_dir, args.device, dtype,
                                                 label, concurrency[len(concurrency) // 2], tokens))  # fmt: skip
        for c in concurrency:
            section(
                rows,
                f"decode {c}",
                partial(decode, model_dir, args.device, dtype, label, c, tokens),
            )
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    table = [f"{device}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s", "",
             "| check | measured | bound / beside | verdict |", "|---|---|---|---|"]  # fmt: skip
    table += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n" + "\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")
    if any(r[3] == "FAIL" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
