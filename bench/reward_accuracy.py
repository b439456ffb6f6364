"""Reward-model accuracy on the demo preference: held-out pairwise accuracy per training budget.

A program, not a test. Fits the reward model (LoRA + score head on the demo SFT base) on fresh
(correct, plausible wrong) pairs from `demo_task.preference_pairs`, then scores pairs it never
saw, drawn with another seed, overall and per task. With --warm-from it starts from a saved
reward model instead (the demo's reward-init/, or a refit), as the learner's refits do:

    .venv/bin/python bench/reward_accuracy.py --demo-dir DEMO_BUILD --steps 400,1200
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from flywheel_demo import task as demo_task
from flywheel_demo.model import chat_prompt
from flywheel_learner.reward import RewardConfig, evaluate, fit_reward_model
from flywheel_model import adapters, loading


def pairs(tokenizer, seed: int, n: int) -> list[tuple[str, str, list[list[str]]]]:
    """(task, prompt, [[chosen], [rejected]]) rows."""
    rows = []
    for instruction, good, bad in demo_task.preference_pairs(random.Random(seed), n):
        task = instruction.split(":", 1)[0]
        rows.append((task, chat_prompt(tokenizer, instruction), [[good], [bad]]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, required=True, help="a demo build directory")
    parser.add_argument("--pairs", type=int, default=6000, help="training pairs")
    parser.add_argument("--steps", default="400", help="comma-separated budgets to try")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step")
    parser.add_argument("--lr", type=float, default=RewardConfig.lr)
    parser.add_argument("--eval", type=int, default=2000, help="fresh held-out pairs")
    parser.add_argument("--warm-from", type=Path, default=None, help="a saved reward model")
    parser.add_argument("--save", type=Path, default=None, help="save the last fit here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.demo_dir / "model"
    _, tokenizer = loading.load_base(model_dir)
    train = [(p, r) for _, p, r in pairs(tokenizer, 1, args.pairs)]
    held = pairs(tokenizer, 2, args.eval)
    results = []
    for steps in (int(s) for s in args.steps.split(",")):
        config = RewardConfig(steps=steps, batch_rankings=args.batch, lr=args.lr,
                              held_out=0.0, warmup=max(1, steps // 20))  # fmt: skip
        base, _ = loading.load_base(model_dir)
        started = time.perf_counter()
        fit = fit_reward_model(base, tokenizer, train, config, init=args.warm_from)
        seconds = time.perf_counter() - started
        fit.model.eval()
        row = {"steps": steps, "pairs": args.pairs, "batch": args.batch, "lr": args.lr,
               "warm_start": fit.warm_start, "seconds": round(seconds, 1),
               "train_loss": round(fit.train_loss, 4)}  # fmt: skip
        row["held_out_accuracy"] = evaluate(fit.model, fit.head, tokenizer,
                                            [(p, r) for _, p, r in held], config)  # fmt: skip
        for task in demo_task.TASKS:
            some = [(p, r) for t, p, r in held if t == task]
            row[f"accuracy_{task}"] = evaluate(fit.model, fit.head, tokenizer, some, config)
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.save:
            adapters.save_adapter(fit.model, fit.adapter_name, args.save, head=fit.head,
                                  base_model=loading.base_fingerprint(model_dir))  # fmt: skip
    print("\n| steps | pairs seen | warm | s | train loss | held-out acc | "
          + " | ".join(demo_task.TASKS) + " |")  # fmt: skip
    print("|" + "---|" * (6 + len(demo_task.TASKS)))
    for r in results:
        tasks = " | ".join(f"{r[f'accuracy_{t}']:.3f}" for t in demo_task.TASKS)
        print(f"| {r['steps']} | {r['steps'] * r['batch']} | {r['warm_start']} | {r['seconds']} "
              f"| {r['train_loss']} | {r['held_out_accuracy']:.3f} | {tasks} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
