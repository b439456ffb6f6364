"""How fast PPO-ptx raises the demo policy's sampled accuracy, for one PPO configuration.

A program, not a test. It starts from a demo build's SFT base, runs `--steps` PPO-ptx steps on
fresh demo prompts and, every `--every` steps, samples the policy at temperature 1 on the same
256 held-out prompts and prints the share answered correctly against the seconds spent in
`ppo_step`. The reward is either the build's reward model or, with `--reward oracle`, the demo
task's own checker (0 right, -3 wrong): a perfect reward model, which separates how fast PPO
learns from how good the reward model is.

    .venv/bin/python bench/ppo_curve.py --demo-dir DEMO_BUILD --reward oracle \\
        --rollout-batch 256 --epochs 1 --minibatches 4 --lr 1e-3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from alignment_tax import correct, demo_dirs, instructions

from flywheel_demo.model import chat_prompt
from flywheel_demo.task import pretraining_texts
from flywheel_learner.ppo import ppo_step, sample_responses
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ppo_models import POLICY, SharedBaseModels, make_optimizer, save_policy
from flywheel_learner.ptx_data import ptx_batches
from flywheel_model import adapters


def oracle(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """The demo task's checker as a reward: 0 for the right answer, -3 for anything else."""
    return torch.tensor([0.0 if ok else -3.0 for ok in correct(prompts, responses)])


def accuracy(models: SharedBaseModels, prompts: list[str]) -> float:
    torch.manual_seed(99)  # the same sampling noise at every evaluation
    samples = sample_responses(models, prompts)
    return sum(correct(prompts, samples.responses)) / len(prompts)


def overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings as PPOConfig keyword arguments, each cast to its field's type."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        default = getattr(PPOConfig, name, None)
        if default is None or not equals or isinstance(default, tuple):
            raise SystemExit(f"--set {pair!r}: expected FIELD=VALUE for a scalar PPOConfig field")
        out[name] = (
            value.lower() in ("1", "true") if isinstance(default, bool) else type(default)(value)
        )
    return out


def build(model_dir: Path, reward_dir: Path, config: PPOConfig, reward: str) -> SharedBaseModels:
    models = SharedBaseModels.build(model_dir, reward_dir, config)
    if reward == "oracle":
        models.rewards = oracle  # type: ignore[method-assign]
    return models


def rebuilt(
    models: SharedBaseModels, model_dir: Path, reward_dir: Path, config: PPOConfig, reward: str
) -> SharedBaseModels:
    """Fresh models (value adapter and head copied from the reward model again) with the
    policy adapter carried over, as `flywheel learn` starts each round."""
    with tempfile.TemporaryDirectory() as tmp:
        save_policy(models, tmp, model_dir)
        fresh = build(model_dir, reward_dir, config, reward)
        adapters.load_adapter_weights(fresh.peft, tmp, POLICY)
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, default=None, help="a demo build directory")
    parser.add_argument("--reward", choices=("oracle", "model"), default="oracle")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="evaluate every N steps")
    parser.add_argument("--rollout-batch", type=int, default=PPOConfig.rollout_batch)
    parser.add_argument("--epochs", type=int, default=PPOConfig.epochs)
    parser.add_argument("--minibatches", type=int, default=PPOConfig.minibatches)
    parser.add_argument("--lr", type=float, default=PPOConfig.lr)
    parser.add_argument("--gamma-ptx", type=float, default=PPOConfig.gamma_ptx)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rebuild-every", type=int, default=0,
                        help="rebuild the models and optimiser every N steps, keeping the policy "
                             "adapter, as the live loop does each round (0: never)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any other PPOConfig field, e.g. --set lora_r=32 "
                             "(repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PPOConfig(
        rollout_batch=args.rollout_batch, epochs=args.epochs, minibatches=args.minibatches,
        lr=args.lr, gamma_ptx=args.gamma_ptx, seed=args.seed, **overrides(args.set),
    )  # fmt: skip
    model_dir, reward_dir = demo_dirs(args.demo_dir)
    models = build(model_dir, reward_dir, config, args.reward)
    tok = models.tokenizer
    held_out = [chat_prompt(tok, i) for i in instructions(random.Random(1234), 256)]
    rng = random.Random(args.seed)
    ptx = ptx_batches(tok, pretraining_texts(rng, 4096), config.ptx_batch,
                      config.ptx_max_length, rng)  # fmt: skip
    optimizer, kl_ctl = make_optimizer(models, config), config.kl_controller()
    curve = [{"step": 0, "seconds": 0.0, "accuracy": accuracy(models, held_out)}]
    print(f"step   0  ppo seconds    0  accuracy {curve[0]['accuracy']:.3f}", flush=True)
    seconds = 0.0
    torch.manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        if args.rebuild_every and step > 1 and (step - 1) % args.rebuild_every == 0:
            models = rebuilt(models, model_dir, reward_dir, config, args.reward)
            optimizer, kl_ctl = make_optimizer(models, config), config.kl_controller()
        prompts = [chat_prompt(tok, i) for i in instructions(rng, config.prompts_per_step)]
        stats = ppo_step(models, optimizer, prompts, next(ptx), config, kl_ctl)
        seconds += stats.seconds
        if step % args.every == 0 or step == args.steps:
            curve.append({"step": step, "seconds": seconds, "accuracy": accuracy(models, held_out),
                          "kl": stats.kl_mean, "clip": stats.policy_clip_fraction})  # fmt: skip
            print(f"step {step:3d}  ppo seconds {seconds:4.0f}  accuracy {curve[-1]['accuracy']:.3f}"
                  f"  kl {stats.kl_mean:.2f}  clip {stats.policy_clip_fraction:.3f}", flush=True)  # fmt: skip
    if args.json:
        settings = {k: v if isinstance(v, int | float) else str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
