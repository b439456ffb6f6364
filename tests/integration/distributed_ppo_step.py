"""PPO-ptx updates, alone or under torchrun; each rank saves what test_distributed.py compares.

The sampled responses are drawn once for the global batch (the same on every rank) and each
rank keeps its shard: sampling is the one part that cannot match one process bit for bit (a
different batch draws different random numbers), and it is embarrassingly parallel. From there
on the run is the data-parallel one: scoring and globally whitened advantages on the shard,
then `optimise` with rank 0's shuffle, token-weighted losses and all-reduced gradients. Then one
whole `ppo_step` (each rank sampling its own shard) shows the ranks stay in step.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from flywheel_demo.model import chat_prompt
from flywheel_demo.task import pretraining_texts, sample_example
from flywheel_learner import distributed
from flywheel_learner.ppo import optimise, ppo_step, sample_responses, score_rollout, sequence_kl
from flywheel_learner.ppo_config import PPOConfig
from flywheel_learner.ppo_models import SharedBaseModels, make_optimizer
from flywheel_learner.ptx_data import ptx_batches

CONFIG = PPOConfig(
    rollout_batch=8, minibatches=2, micro_batches=2, epochs=2, ptx_batch=6, max_new_tokens=6
)


def trainable(models: SharedBaseModels) -> dict[str, torch.Tensor]:
    state = {n: p.detach().clone() for n, p in models.peft.named_parameters() if p.requires_grad}
    return state | {
        f"value_head.{n}": p.detach().clone() for n, p in models.value_head.named_parameters()
    }


def main() -> None:
    base_dir, reward_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    distributed.init_from_env()
    rank, size = distributed.world()
    torch.set_num_threads(1)
    models = SharedBaseModels.build(base_dir, reward_dir, CONFIG)
    optimizer = make_optimizer(models, CONFIG)
    rng = random.Random(0)
    prompts = [chat_prompt(models.tokenizer, sample_example(rng).instruction) for _ in range(8)]
    texts = pretraining_texts(rng, 12)
    ptx = next(ptx_batches(models.tokenizer, texts, CONFIG.ptx_batch, 48, random.Random(0)))

    torch.manual_seed(1)
    samples = sample_responses(models, prompts)  # the global batch, the same on every rank
    local = samples.select(slice(*distributed.bounds(len(prompts), rank, size)))
    rollout = score_rollout(models, local, CONFIG, CONFIG.beta)
    torch.manual_seed(2)
    metrics = optimise(models, optimizer, rollout, ptx, CONFIG)
    result = {"optimised": trainable(models), "metrics": torch.tensor(metrics)}
    result["kl"] = torch.tensor(sequence_kl(rollout))

    torch.manual_seed(3 + rank)  # each rank samples its own shard with its own stream
    stats = ppo_step(models, optimizer, prompts, ptx, CONFIG, CONFIG.kl_controller())
    result |= {"after_step": trainable(models), "stats": torch.tensor(stats[:-2])}
    torch.save(result, f"{out}.{rank}")


if __name__ == "__main__":
    main()
