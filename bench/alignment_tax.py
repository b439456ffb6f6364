"""The alignment tax on the demo: PPO (gamma_ptx = 0) against PPO-ptx, seed by seed.

A program, not a test. For each seed and each gamma_ptx it starts from the same SFT base and
reward adapter, runs `--steps` PPO steps of `--rollout-batch` prompts, and evaluates before and
after on the same held-out prompts (sampled at temperature 1, seeded) and the same pretraining
batch. Same seed, same budget: the only difference within a seed is gamma_ptx. The summary
gives each gamma's reward gain and rise in pretraining NLL (InstructGPT section 3.5, figure 34):

    .venv/bin/python bench/alignment_tax.py --demo-dir DEMO_BUILD --seeds 1,2,3 --gammas 0,1

`--corpus` picks the "pretraining" text, both the ptx term's and the NLL's:
- documents (the demo default, `flywheel_demo.task.pretraining_texts`): instructions alone, the
  plain text the demo build mixes into its SFT;
- answers (the learner's demo default before issue 15): the task's correct answers;
  a policy that gets more answers right raises their likelihood, so PPO lowers this NLL too;
- demonstrations: the distribution the demo base was trained on, the SFT demonstrations with
  their share of wrong answers (`demo_task.demonstrations` at the build's demo_quality). As the
  paper's pretraining text, it is not what the reward asks for, and PPO drifting from it is the
  tax.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flywheel_demo import task as demo_task
from flywheel_demo.model import chat_prompt, ensure_demo_model
from flywheel_demo.task import pretraining_texts
from flywheel_learner.ppo import PPOStats, ppo_step, sample_responses
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
from flywheel_learner.ptx_data import PtxBatch, PtxText, ptx_batches


def demo_dirs(demo_dir: Path | None) -> tuple[Path, Path]:
    """(model dir, reward adapter dir): an existing build, or one built under /tmp/ppo-demo."""
    if demo_dir is not None and (demo_dir / "model").is_dir():
        return demo_dir / "model", demo_dir / "reward-init"
    demo = ensure_demo_model(Path("/tmp/ppo-demo"))
    return demo.model_dir, demo.reward_dir


def instructions(rng: random.Random, n: int) -> list[str]:
    return [demo_task.sample_example(rng).instruction for _ in range(n)]


def correct(prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
    """Which responses the demo task's checker accepts."""
    return [bool(demo_task.check(p, r)) for p, r in zip(prompts, responses, strict=True)]


@torch.no_grad()
def evaluate(
    models: SharedBaseModels, prompts: list[str], ptx: PtxBatch, seed: int
) -> dict[str, float]:
    """Reward mean, exact-answer accuracy and pretraining NLL on fixed data."""
    torch.manual_seed(seed)
    samples = sample_responses(models, prompts)
    scores = models.rewards(samples.prompts, samples.responses)
    right = correct(prompts, samples.responses)
    return {
        "reward": float(scores.mean()),
        "accuracy": sum(right) / len(right),
        "ptx_nll": float(models.pretraining_nll(ptx)),
    }


def corpus_texts(
    corpus: str, rng: random.Random, n: int, tok: Any, model_dir: Path
) -> list[PtxText]:
    """n texts or (context, text) pairs of the chosen pretraining corpus (module docstring)."""
    if corpus == "documents":
        return pretraining_texts(rng, n)
    if corpus == "answers":
        examples = [demo_task.sample_example(rng) for _ in range(n)]
        return [(chat_prompt(tok, e.instruction), e.answer) for e in examples]
    build = json.loads((model_dir.parent / "build.json").read_text())
    demos = demo_task.demonstrations(rng, n, quality=build["config"]["demo_quality"])
    return [(chat_prompt(tok, instruction), response) for instruction, response in demos]


def run(
    model_dir: Path, reward_dir: Path, config: PPOConfig, steps: int, eval_n: int, corpus: str
) -> dict[str, object]:
    models = SharedBaseModels.build(model_dir, reward_dir, config)
    tok = models.tokenizer
    eval_rng = random.Random(1234)  # the same held-out data for every gamma
    eval_prompts = [chat_prompt(tok, i) for i in instructions(eval_rng, eval_n)]
    eval_texts = corpus_texts(corpus, eval_rng, 64, tok, model_dir)
    eval_ptx = next(ptx_batches(tok, eval_texts, 64, 128, eval_rng))
    rng = random.Random(config.seed)
    train_texts = corpus_texts(corpus, rng, 4096, tok, model_dir)
    train_ptx = ptx_batches(tok, train_texts, config.ptx_batch, config.ptx_max_length, rng)
    optimizer, kl_ctl = make_optimizer(models, config), config.kl_controller()
    before = evaluate(models, eval_prompts, eval_ptx, seed=99)
    history: list[PPOStats] = []
    torch.manual_seed(config.seed)
    for step in range(steps):
        prompts = [chat_prompt(tok, i) for i in instructions(rng, config.prompts_per_step)]
        history.append(ppo_step(models, optimizer, prompts, next(train_ptx), config, kl_ctl))
        s = history[-1]
        print(
            f"  gamma={config.gamma_ptx:<4} step {step + 1:2d}  reward {s.reward_mean:+.3f}  "
            f"kl {s.kl_mean:6.3f}  ptx {s.ptx_loss:.3f}  clip {s.policy_clip_fraction:.3f}  "
            f"len {s.response_length:4.1f}  {s.seconds:5.1f}s",
            flush=True,
        )
    after = evaluate(models, eval_prompts, eval_ptx, seed=99)
    return {
        "seed": config.seed,
        "gamma_ptx": config.gamma_ptx,
        "before": before,
        "after": after,
        "steps": [s._asdict() for s in history],
    }


def table(results: list[dict]) -> str:
    head = (
        "| seed | gamma_ptx | reward before -> after | accuracy before -> after "
        "| ptx NLL before -> after | KL last 5 | s/step | samples/s |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in results:
        b, a, steps = r["before"], r["after"], r["steps"]
        tail = steps[-5:]
        kl = sum(s["kl_mean"] for s in tail) / len(tail)
        sec = sum(s["seconds"] for s in steps) / len(steps)
        sps = sum(s["samples_per_second"] for s in steps) / len(steps)
        lines.append(
            f"| {r['seed']} | {r['gamma_ptx']} | {b['reward']:+.3f} -> {a['reward']:+.3f} "
            f"| {b['accuracy']:.3f} -> {a['accuracy']:.3f} "
            f"| {b['ptx_nll']:.4f} -> {a['ptx_nll']:.4f} | {kl:.3f} | {sec:.2f} | {sps:.2f} |"
        )
    return "\n".join(lines)


def gain(run: dict) -> float:
    return run["after"]["reward"] - run["before"]["reward"]


def rise(run: dict) -> float:
    return run["after"]["ptx_nll"] - run["before"]["ptx_nll"]


def summary(results: list[dict]) -> str:
    """Per gamma: mean reward gain and mean ptx-NLL rise over seeds, and per-seed verdicts."""
    lines = [
        "| gamma_ptx | seeds | reward gain (mean) | ptx NLL rise (mean) |",
        "|---|---|---|---|",
    ]
    for gamma in sorted({r["gamma_ptx"] for r in results}):
        rows = [r for r in results if r["gamma_ptx"] == gamma]
        lines.append(
            f"| {gamma} | {len(rows)} | {sum(map(gain, rows)) / len(rows):+.3f} "
            f"| {sum(map(rise, rows)) / len(rows):+.4f} |"
        )
    by_seed: dict[int, dict[float, dict]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], {})[r["gamma_ptx"]] = r
    smaller = [
        all(rise(run) < rise(runs[0.0]) for g, run in runs.items() if g > 0)
        for runs in by_seed.values()
        if 0.0 in runs and len(runs) > 1
    ]
    if smaller:  # only when a seed ran both gamma 0 and some gamma > 0
        lines.append(
            f"\nPPO-ptx's rise smaller than PPO's in {sum(smaller)} of {len(smaller)} seeds"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("/tmp/demo5"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rollout-batch", type=int, default=PPOConfig.rollout_batch)
    parser.add_argument("--gammas", default="0,1")
    parser.add_argument("--lr", type=float, default=PPOConfig.lr)
    parser.add_argument(
        "--seeds",
        default="1,2,3",
        help="comma-separated; each sets training prompts, LoRA init, sampling",
    )
    parser.add_argument("--eval", type=int, default=256, help="held-out prompts")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--corpus", choices=("documents", "answers", "demonstrations"), default="documents",
        help="the pretraining text of the ptx term and the NLL (see the module docstring)",
    )  # fmt: skip
    # One thread: on a shared 2-core box, two torch threads spin-wait on each other and the
    # same update takes 0.1 s or 5 s depending on the neighbours' load.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, reward_dir = demo_dirs(args.demo_dir)
    results = []
    started = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        for gamma in (float(g) for g in args.gammas.split(",")):
            config = PPOConfig(
                gamma_ptx=gamma, rollout_batch=args.rollout_batch, lr=args.lr, seed=seed
            )
            results.append(run(model_dir, reward_dir, config, args.steps, args.eval, args.corpus))
    elapsed = time.perf_counter() - started
    print(f"\nmodel {model_dir}, {args.steps} steps, rollout_batch {args.rollout_batch}, "
          f"corpus {args.corpus}, {elapsed:.0f}s in all, {args.threads} threads")  # fmt: skip
    print(table(results))
    print()
    print(summary(results))
    if args.json:
        config_fields = dataclasses.asdict(PPOConfig(rollout_batch=args.rollout_batch, lr=args.lr))
        args.json.write_text(json.dumps({"config": config_fields, "results": results}, indent=2))


if __name__ == "__main__":
    main()
