"""`flywheel simulate` against a real server: a scripted labeler's rankings land in the store."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support import FLYWHEEL

pytestmark = pytest.mark.integration


def test_simulate_submits_rankings_through_the_public_api(server) -> None:
    before = server.counts()["rankings"]
    result = subprocess.run(
        [
            FLYWHEEL,
            "simulate",
            "--server",
            server.grpc,
            "--preference",
            "longer",
            "--count",
            "5",
            "--k",
            "3",
            "--max-tokens",
            "6",
            "--seed",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    [summary] = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert summary["labeler"] == "sim-longer"
    assert summary["attempts"] == 5
    assert summary["errors"] == 0
    assert summary["submitted"] + summary["skipped"] == 5
    assert summary["submitted"] >= 1  # random 6-token samples rarely all tie on length
    assert server.counts()["rankings"] == before + summary["submitted"]
