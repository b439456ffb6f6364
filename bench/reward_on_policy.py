"""The demo reward model's accuracy on the SFT policy's own samples, before and after a refit.

A program, not a test. It samples K = 4 responses per fresh demo prompt from the SFT base at
temperature 1, ranks them as the `correct` labeler does (right answers tied first, wrong ones
tied second; prompts whose candidates all tie are dropped), and scores the build's initial
reward model on held-out rankings, per sub-task. Then it refits that model, warm-started as
the learner does, on the training rankings and scores it again:

    .venv/bin/python bench/reward_on_policy.py --demo-dir DEMO_BUILD --steps 200
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch
from alignment_tax import correct, demo_dirs, instructions

from flywheel_demo import task as demo_task
from flywheel_demo.model import chat_prompt
from flywheel_learner.ppo import sample_responses
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ppo_models import SharedBaseModels
from flywheel_learner.reward import RewardConfig, evaluate, fit_reward_model
from flywheel_model import loading, scoring
from flywheel_model.scoring import RankingText


def policy_rankings(models: SharedBaseModels, seed: int, n: int, k: int = 4) -> list[RankingText]:
    """`n` rankings of the policy's own samples, tiered by the demo checker."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    out: list[RankingText] = []
    while len(out) < n:
        prompts = [chat_prompt(models.tokenizer, i) for i in instructions(rng, 64)]
        samples = sample_responses(models, [p for p in prompts for _ in range(k)])
        for j, prompt in enumerate(prompts):
            candidates = samples.responses[k * j : k * (j + 1)]
            ok = correct([prompt] * k, candidates)
            right = [c for c, good in zip(candidates, ok, strict=True) if good]
            wrong = [c for c, good in zip(candidates, ok, strict=True) if not good]
            if right and wrong:
                out.append((prompt, [right, wrong]))
    return out[:n]


def per_task(
    model: torch.nn.Module,
    head: scoring.ScoreHead,
    tokenizer: Any,
    rankings: list[RankingText],
    config: RewardConfig,
) -> dict[str, float]:
    """Held-out pairwise accuracy over all rankings and per demo sub-task."""
    scores = {"all": evaluate(model, head, tokenizer, rankings, config)}
    for task in demo_task.TASKS:
        mine = [r for r in rankings if (e := demo_task.parse(r[0])) and e.task == task]
        scores[task] = evaluate(model, head, tokenizer, mine, config)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=None, help="a demo build directory")
    parser.add_argument("--train", type=int, default=3000, help="training rankings")
    parser.add_argument("--test", type=int, default=500, help="held-out rankings")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=RewardConfig.lr)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir, reward_dir = demo_dirs(args.demo_dir)
    models = SharedBaseModels.build(model_dir, reward_dir, PPOConfig())
    started = time.perf_counter()
    train = policy_rankings(models, seed=1, n=args.train)
    test = policy_rankings(models, seed=2, n=args.test)
    print(f"{len(train)} + {len(test)} rankings sampled in {time.perf_counter() - started:.0f} s")
    config = RewardConfig(held_out=0.0, steps=args.steps, lr=args.lr, warmup=5)
    head = scoring.ScoreHead.load(reward_dir, models.peft.config.hidden_size)
    models.peft.set_adapter("reward")  # the build's reward adapter, as loaded for PPO
    before = per_task(models.peft, head, models.tokenizer, test, config)
    base, tokenizer = loading.load_base(model_dir)
    fit = fit_reward_model(base, tokenizer, train, config, init=reward_dir, progress=False)
    after = per_task(fit.model, fit.head, tokenizer, test, config)
    print(
        f"refit: {fit.steps} steps, lr {args.lr}, {fit.seconds:.0f} s, warm start {fit.warm_start}"
    )
    print("| reward model | all | " + " | ".join(demo_task.TASKS) + " |")
    print("|---|" + "---:|" * (1 + len(demo_task.TASKS)))
    for name, scores in (("initial (demo build)", before), (f"after {fit.steps} steps", after)):
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores.values()) + " |")


if __name__ == "__main__":
    main()
