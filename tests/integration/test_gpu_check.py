"""bench/gpu_check.py, the script a lent GPU runs, runs here on CPU with a tiny model: every
section finishes (one that raises is a FAIL row and a non-zero exit) and every parity check
holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_cpu_tiny() -> None:
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    parity = [line for line in table if line.startswith("| parity")]
    assert len(parity) == 6 and all(line.endswith("| ok |") for line in parity), table
    assert any(line.startswith("| reward model in the engine") and line.endswith("| ok |")
               for line in table), table  # fmt: skip
    for check in (
        "1 at once",
        "4 at once",
        "8 at once",
        "reward refit: completions/s",
        "PPO-ptx step (16 x 16 tokens): samples/s",
        "PPO-ptx step: peak memory",
        "PPO-ptx step + checkpointing: peak memory",
        "half on the PPO policy's LoRA",
    ):
        assert any(check in line for line in table), check
