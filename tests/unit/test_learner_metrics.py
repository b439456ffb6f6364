"""The learner's own /metrics: served on loopback, valid for promtool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flywheel_learner import metrics
from tests.support import free_port

pytestmark = pytest.mark.unit


def test_learner_metrics_page_passes_promtool():
    metrics.reward_accuracy.set(0.9)
    metrics.versions.labels("policy", "refused").inc()
    port = free_port()
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        page = r.read()
    assert b"flywheel_learner_reward_held_out_accuracy 0.9" in page
    assert b'flywheel_learner_versions_total{kind="policy",outcome="refused"}' in page
    promtool = (
        os.environ.get("PROMTOOL")
        or shutil.which("promtool")
        or str(Path(sys.executable).parent / "promtool")
    )
    if not Path(promtool).exists():
        pytest.skip("promtool not found: run scripts/get_promtool.sh or set PROMTOOL")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
