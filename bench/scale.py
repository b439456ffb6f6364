"""Flywheel at a real size, on CPU (issue 17): a random model with Qwen2.5-0.5B's exact config.

    bash bench/trl_setup.sh 112                               # TRL 1.12's PPOTrainer, once
    .venv/bin/python bench/scale.py                           # 0.5B, float32 and bfloat16
    .venv/bin/python bench/scale.py --size 1.5b --dtype bfloat16 --no-trl

For each dtype: the base's load time; the torch engine's decode tok/s at 1 and 16 requests at
once (in-process, ignore_eos); reward-refit step time and completions/s (K-way rankings); one
PPO-ptx step's samples/s and the PPO process's peak RSS against the bytes it must hold (base
weights, plus the trainable adapters and heads with their gradients and AdamW state). Beside it,
TRL 1.12's `PPOTrainer` on the same model directory, prompts and batch: its policy (LoRA of the
same rank and targets, the reference being that policy with the adapter disabled, TRL's
memory-saving setup), a full reward model and a full value model that trains, peak RSS and
samples/s. TRL runs in float32 only: its value model trains in full, and in bfloat16 its Adam
state would be bfloat16 too, not a like-for-like run.

Each measurement runs in a process of its own: peak RSS is a process's lifetime peak (and
counts the interpreter, torch and transformers, about 0.5 GB, against us). Results: a Markdown
table on stdout and JSON in bench/out/scale_<size>.json. Weights are random: speed and memory
need no training. Random weights never sample the end-of-sequence token, so every response is
`--new-tokens` long on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))

# Qwen2.5-0.5B-Instruct's and Qwen2.5-1.5B-Instruct's config.json, as published.
QWEN = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip
SIZES: dict[str, dict[str, Any]] = {
    "0.5b": dict(QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1.5b": dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),
    "tiny": dict(QWEN, vocab_size=512, hidden_size=64, intermediate_size=128,  # a smoke run
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
INSTRUCTIONS = ["reverse: flywheel", "add: 12 + 30", "sort: qwerty", "capitalise: hello world"]
K = 4  # completions per ranking


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16", "float32+checkpointing"],
                   help="columns: a dtype, or DTYPE+checkpointing for the learner's parts with "
                   "--gradient-checkpointing")  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="PPO rollout batch (default 8)")
    p.add_argument("--new-tokens", type=int, default=32, help="per response (default 32)")
    p.add_argument("--rankings", type=int, default=4, help="per reward step, K=4 each")
    p.add_argument("--reward-steps", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--no-trl", action="store_true", help="skip TRL's PPOTrainer")
    p.add_argument("--reuse", action="store_true",
                   help="keep the columns bench/out/scale_SIZE.json already holds")  # fmt: skip
    p.add_argument("--part", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start the peak RSS (VmHWM) over from now (Linux: clear_refs 5), so a part's peak is its
    step's, not the base's load (transformers converts bfloat16 files to float32 through a
    second copy)."""
    Path("/proc/self/clear_refs").write_text("5")


def step_peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def model_dir(size: str) -> Path:
    """The random model, built once (saved in bfloat16, as Qwen2.5 ships its weights)."""
    import torch

    from bench.gpu_check import shaped_model

    out = OUT / f"scale_qwen2.5-{size}"
    if not (out / "config.json").is_file():
        shaped_model(SIZES[size], "cpu", torch.bfloat16, out)
    return out


def prompts(tokenizer: Any, n: int) -> list[str]:
    from flywheel_demo.model import chat_prompt

    return [chat_prompt(tokenizer, INSTRUCTIONS[i % len(INSTRUCTIONS)]) for i in range(n)]


# -- the parts, each in its own process ---------------------------------------------------------


def part_load(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401  # imports, untimed
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401

    from bench.harness import weight_bytes
    from flywheel_model import loading

    directory = model_dir(args.size)
    before = current_rss()
    start = time.perf_counter()
    model, _ = loading.load_base(directory, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - start
    return {"load_s": seconds, "base_bytes": weight_bytes(model),
            "params": sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values()),
            "rss_before_load": before, "rss_after_load": current_rss()}  # fmt: skip


def part_serve(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    import torch

    from bench.gpu_check import decode_tokens_per_s

    directory = model_dir(args.size)
    return {f"decode_tok_s_{c}": decode_tokens_per_s(directory, "cpu", getattr(torch, dtype), c,
                                                     args.new_tokens)
            for c in args.concurrency}  # fmt: skip


def part_reward(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    import torch

    from flywheel_learner.reward import RewardConfig, fit_reward_model
    from flywheel_model import loading
    from flywheel_model.precision import Precision

    dtype, _, variant = dtype.partition("+")
    precision = Precision("cpu", getattr(torch, dtype))
    base, tokenizer = loading.load_base(model_dir(args.size), dtype=precision.dtype)
    completions = [["the answer, " * 4 + str(i)] for i in range(K)]  # 4 tiers, ~15 tokens each
    rankings = [(p, completions) for p in prompts(tokenizer, args.rankings * 4)]
    config = RewardConfig(steps=args.reward_steps, warmup=0, batch_rankings=args.rankings,
                          held_out=0.0, r=32, alpha=32,  # the learner's reward LoRA
                          gradient_checkpointing=variant == "checkpointing")  # fmt: skip
    reset_peak_rss()
    with precision.autocast():
        fit = fit_reward_model(base, tokenizer, rankings, config, held_out=[], progress=False)
    return {"reward_step_s": fit.seconds / fit.steps,
            "reward_completions_s": fit.steps * args.rankings * K / fit.seconds,
            "reward_peak_rss": step_peak_rss(), "reward_lifetime_peak_rss": peak_rss()}  # fmt: skip


def part_ppo(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    import random

    import torch

    from bench.harness import held_bytes
    from flywheel_demo.task import pretraining_texts
    from flywheel_learner.ppo import ppo_step
    from flywheel_learner.ppo_config import PPOConfig
    from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
    from flywheel_learner.ptx_data import ptx_batches

    directory = model_dir(args.size)
    reward_dir = OUT / f"scale_qwen2.5-{args.size}-rm"
    if not (reward_dir / "adapter_config.json").is_file():
        raise SystemExit(f"{reward_dir} missing: the driver builds it first")
    from flywheel_model.precision import Precision

    dtype, _, variant = dtype.partition("+")
    precision = Precision("cpu", getattr(torch, dtype))
    config = PPOConfig(rollout_batch=args.batch, minibatches=2, max_new_tokens=args.new_tokens,
                       ptx_batch=args.batch, ptx_max_length=64, lora_r=8,
                       gradient_checkpointing=variant == "checkpointing")  # fmt: skip
    rss_start = current_rss()
    models = SharedBaseModels.build(directory, reward_dir, config, precision)
    optimizer = make_optimizer(models, config)
    rng = random.Random(0)
    ptx = ptx_batches(models.tokenizer, pretraining_texts(rng, 64), config.ptx_batch,
                      config.ptx_max_length, rng)  # fmt: skip
    batch = prompts(models.tokenizer, args.batch)
    kl = config.kl_controller()
    reset_peak_rss()
    start = time.perf_counter()
    steps = [ppo_step(models, optimizer, batch, next(ptx), config, kl) for _ in range(2)]
    seconds = time.perf_counter() - start
    base_bytes, train_bytes = held_bytes(models, optimizer)
    held = base_bytes + train_bytes
    peak = step_peak_rss()
    return {"ppo_samples_s": 2 * args.batch / seconds, "ppo_step_s": seconds / 2,
            "ppo_response_tokens": steps[-1].response_length, "ppo_peak_rss": peak,
            "ppo_lifetime_peak_rss": peak_rss(),
            "ppo_rss_at_start": rss_start, "ppo_base_bytes": base_bytes,
            "ppo_train_bytes": train_bytes, "ppo_ratio": peak / held,
            "ppo_ratio_without_runtime": (peak - rss_start) / held}  # fmt: skip


def part_trl(args: argparse.Namespace, dtype: str) -> dict[str, Any]:
    """TRL 1.12's PPOTrainer (run in .venv-trl112): the same model, prompts, batch and LoRA."""
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    directory = model_dir(args.size)
    rss_start = current_rss()
    tok = AutoTokenizer.from_pretrained(directory, padding_side="left")
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(directory, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=1, **load)
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts(tok, 2 * args.batch)]
    work = tempfile.mkdtemp(prefix="trl112-scale-")
    config = PPOConfig(
        output_dir=work, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=2, num_ppo_epochs=1, response_length=args.new_tokens,
        total_episodes=2 * args.batch, local_rollout_forward_batch_size=args.batch,
        temperature=1.0, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=10_000, bf16=False,
        seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])  # fmt: skip
    trainer = PPOTrainer(
        args=config, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
        train_dataset=Dataset.from_dict({"input_ids": ids}), value_model=value, peft_config=lora,
    )  # fmt: skip
    reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"trl_version": trl.__version__, "trl_samples_s": 2 * args.batch / seconds,
            "trl_peak_rss": step_peak_rss(), "trl_lifetime_peak_rss": peak_rss(),
            "trl_rss_at_start": rss_start}  # fmt: skip


PARTS = {"load": part_load, "serve": part_serve, "reward": part_reward, "ppo": part_ppo,
         "trl": part_trl}  # fmt: skip


# -- the driver ---------------------------------------------------------------------------------


def run_part(name: str, dtype: str, python: Path) -> dict[str, Any]:
    if not python.exists():
        return {"error": f"{python} missing: run bash bench/trl_setup.sh 112"}
    argv = [a for a in sys.argv[1:] if a not in ("--no-trl", "--reuse")]
    command = [str(python), __file__, "--part", f"{name}:{dtype}", *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(ROOT / p) for p in ("model", "demo", "server", "learner", "clients/python", "proto")
    ))  # fmt: skip
    print(f"  {name} {dtype} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"{name} exited {proc.returncode}: {proc.stderr[-2000:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name} {dtype}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def table(size: str, results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"Qwen2.5-{size}-shaped (random weights), CPU, {os.cpu_count()} cores; PPO batch "
             f"{args.batch} x {args.new_tokens} new tokens, reward steps of {args.rankings} "
             f"rankings x K={K}", "",
             "| measure | " + " | ".join(results) + " |",
             "|---|" + "---|" * len(results)]  # fmt: skip
    rows = [
        ("base weights", lambda r: gib(r["base_bytes"])),
        ("load time", lambda r: f"{r['load_s']:.1f} s"),
        *[(f"decode, {c} at once", lambda r, c=c: f"{r[f'decode_tok_s_{c}']:.1f} tok/s")
          for c in args.concurrency],
        ("reward refit step", lambda r: f"{r['reward_step_s']:.1f} s "
                                        f"({r['reward_completions_s']:.2f} completions/s)"),
        ("reward refit peak RSS (its steps)", lambda r: gib(r["reward_peak_rss"])),
        ("PPO-ptx step", lambda r: f"{r['ppo_step_s']:.1f} s ({r['ppo_samples_s']:.2f} samples/s)"),
        ("PPO peak RSS (its steps)", lambda r: gib(r["ppo_peak_rss"])),
        ("PPO process peak RSS (with the load)", lambda r: gib(r["ppo_lifetime_peak_rss"])),
        ("held: base + trainables, grads, AdamW", lambda r: gib(r["ppo_base_bytes"]
                                                               + r["ppo_train_bytes"])),
        ("PPO peak / held (target <= 1.3)", lambda r: f"{r['ppo_ratio']:.2f}"),
        ("the same, less the RSS before loading", lambda r: f"{r['ppo_ratio_without_runtime']:.2f}"),
        ("TRL 1.12 PPOTrainer: samples/s", lambda r: f"{r['trl_samples_s']:.2f}"),
        ("TRL 1.12 PPOTrainer: peak RSS (its steps)", lambda r: gib(r["trl_peak_rss"])),
        ("TRL peak / ours (target >= 2)", lambda r: f"{r['trl_peak_rss'] / r['ppo_peak_rss']:.2f}"),
    ]  # fmt: skip
    for label, cell in rows:
        cells = []
        for r in results.values():
            try:
                cells.append(cell(r))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = [f"{name}: {r['error']}" for name, r in results.items() if "error" in r]
    return "\n".join([*lines, "", *errors])


def main() -> None:
    args = parse_args()
    if args.part:
        name, dtype = args.part.split(":")
        print(json.dumps(PARTS[name](args, dtype)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    directory = model_dir(args.size)
    reward_dir = OUT / f"scale_qwen2.5-{args.size}-rm"
    if not (reward_dir / "adapter_config.json").is_file():
        from bench.harness import random_reward_model

        random_reward_model(directory, reward_dir)
    ours, trl = ROOT / ".venv" / "bin" / "python", ROOT / ".venv-trl112" / "bin" / "python"
    saved = OUT / f"scale_{args.size}.json"
    results: dict[str, dict[str, Any]] = (
        json.loads(saved.read_text()) if args.reuse and saved.is_file() else {}
    )
    for dtype in args.dtype:
        if dtype in results:
            continue
        merged: dict[str, Any] = {}
        variant = "+" in dtype  # the same model, run otherwise: the learner's parts only
        for name in ("reward", "ppo") if variant else ("load", "serve", "reward", "ppo"):
            part = run_part(name, dtype, ours)
            merged.update(part)
            if "error" in part:
                merged["error"] = f"{merged.get('error', '')} {part['error']}".strip()
        if not args.no_trl and dtype == "float32":
            part = run_part("trl", dtype, trl)
            merged.update(part)
        results[dtype] = merged
    results = {d: results[d] for d in args.dtype if d in results}
    saved.write_text(json.dumps(results, indent=2))
    print(table(args.size, results, args))


if __name__ == "__main__":
    main()
