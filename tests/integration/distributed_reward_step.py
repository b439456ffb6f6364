"""Fit a reward model for a few steps, alone or under torchrun; rank 0 saves the trained weights.

Used by test_distributed.py: the 2-process run must give the single-process result.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from flywheel_demo.task import preference_pairs
from flywheel_learner import distributed
from flywheel_learner.reward import RewardConfig, fit_reward_model
from flywheel_model import loading


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    distributed.init_from_env()
    rank, _ = distributed.world()
    torch.set_num_threads(1)
    model, tokenizer = loading.load_base(model_dir)
    rankings = [(p, ((c,), (r,))) for p, c, r in preference_pairs(random.Random(0), 48)]
    config = RewardConfig(steps=3, warmup=1, batch_rankings=8, r=4, alpha=8, held_out=0.1, seed=0)
    fit = fit_reward_model(model, tokenizer, rankings, config, progress=False)
    if rank == 0:
        trained = {
            n: p.detach().clone() for n, p in fit.model.named_parameters() if p.requires_grad
        }
        trained |= {f"head.{k}": v.detach().clone() for k, v in fit.head.state_dict().items()}
        torch.save(trained, out)


if __name__ == "__main__":
    main()
