"""The learner's steps under torchrun: 2 processes (gloo, loopback) give the update of one
process on the same global batch, for the reward refit and for PPO-ptx."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flywheel_learner.ppo import Metrics
from tests.support import make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("distributed_reward_step.py")


def test_two_processes_equal_one(tiny_model, tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    single, parallel = tmp_path / "single.pt", tmp_path / "parallel.pt"
    subprocess.run([sys.executable, SCRIPT, tiny_model, single], check=True, env=env, timeout=300)
    torchrun = Path(sys.executable).parent / "torchrun"
    subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", SCRIPT, tiny_model, parallel],
        check=True,
        env=env,
        timeout=300,
    )
    one, two = torch.load(single), torch.load(parallel)
    assert one.keys() == two.keys() and any("lora_B" in k for k in one)
    assert any(one[k].abs().sum() > 0 for k in one if "lora_B" in k)  # the steps moved the weights
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-6, rtol=1e-5), name


def test_ppo_two_processes_equal_one(tiny_model, tmp_path):
    reward = make_adapter(Path(tiny_model), tmp_path / "reward", reward=True)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    script = SCRIPT.with_name("distributed_ppo_step.py")
    args = [script, tiny_model, reward]
    subprocess.run([sys.executable, *args, tmp_path / "single"], check=True, env=env, timeout=300)
    torchrun = Path(sys.executable).parent / "torchrun"
    launch = [torchrun, "--standalone", "--nproc-per-node", "2"]
    subprocess.run([*launch, *args, tmp_path / "parallel"], check=True, env=env, timeout=300)
    one = torch.load(tmp_path / "single.0")
    ranks = [torch.load(tmp_path / f"parallel.{r}") for r in (0, 1)]

    policy_b = [k for k in one["optimised"] if "lora_B" in k and ".policy." in k]
    assert policy_b and all(one["optimised"][k].abs().sum() > 0 for k in policy_b)  # it trained
    assert one["optimised"].keys() == ranks[0]["optimised"].keys()
    for name, weight in one["optimised"].items():
        assert torch.equal(ranks[0]["optimised"][name], ranks[1]["optimised"][name]), name
        assert torch.allclose(weight, ranks[0]["optimised"][name], atol=1e-6, rtol=1e-5), name
    # A clip fraction counts tokens, and one whose ratio sits on the clip boundary may land on
    # either side when the sums run in another order: allow a token or two of the ~100.
    fractions = [Metrics._fields.index(f) for f in ("policy_clip_fraction", "value_clip_fraction")]
    continuous = [i for i in range(len(Metrics._fields)) if i not in fractions]
    first, parallel = one["metrics"], ranks[0]["metrics"]
    assert torch.allclose(first[continuous], parallel[continuous], atol=1e-5, rtol=1e-4)
    assert torch.allclose(first[fractions], parallel[fractions], atol=0.02)
    assert torch.allclose(one["kl"], ranks[0]["kl"], atol=1e-6)

    # A whole ppo_step, each rank sampling its own shard: the ranks stay identical and finite.
    after = [r["after_step"] for r in ranks]
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])
    assert any(not torch.equal(after[0][k], ranks[0]["optimised"][k]) for k in after[0])
    assert torch.equal(ranks[0]["stats"], ranks[1]["stats"])
    assert torch.isfinite(ranks[0]["stats"]).all()
