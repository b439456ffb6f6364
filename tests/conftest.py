"""Shared fixtures: a tiny model built locally, and a real server for integration tests.

Integration tests talk to a `flywheel serve` subprocess on loopback through the public clients.
Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, make_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel_learner.demo_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the integration tests, with a reward model published and live."""
    from flywheel_client import FlywheelClient
    from flywheel_learner import modeling

    proc = ServerProcess(tiny_model, tmp_path_factory.mktemp("server")).start()
    try:
        adapters = tmp_path_factory.mktemp("adapters")
        with FlywheelClient(proc.grpc) as client:
            client.publish_adapter(
                make_adapter(tiny_model, adapters / "reward", reward=True),
                name="reward",
                base_model=modeling.base_fingerprint(tiny_model),
                promote=True,
            )
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def grpc_client(server: ServerProcess) -> Iterator:
    from flywheel_client import FlywheelClient

    with FlywheelClient(server.grpc) as client:
        yield client
