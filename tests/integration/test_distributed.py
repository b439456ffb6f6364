"""The learner's reward step under torchrun: 2 processes (gloo, loopback) give exactly the
update of one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
