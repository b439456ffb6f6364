"""The layer contract (docs/architecture.md): every import points down, never up or sideways.

    flywheel_cli  ->  flywheel_demo  ->  flywheel_learner  ->  flywheel_client  ->  flywheel_proto
                  ->  flywheel_server  ---------------------------------------->  flywheel_model

The server and the learner meet only through the gRPC contract (flywheel_proto, and the
learner's client); neither imports the other, and the SDK imports neither, nor torch.
Every import statement counts, those inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "flywheel_proto": ROOT / "proto" / "flywheel_proto",
    "flywheel_model": ROOT / "model" / "flywheel_model",
    "flywheel_client": ROOT / "clients" / "python" / "flywheel_client",
    "flywheel_server": ROOT / "server" / "flywheel_server",
    "flywheel_learner": ROOT / "learner" / "flywheel_learner",
    "flywheel_demo": ROOT / "demo" / "flywheel_demo",
    "flywheel_cli": ROOT / "clients" / "python" / "flywheel_cli",
}
# What each package may import besides itself.
ALLOWED = {
    "flywheel_proto": set(),
    "flywheel_model": set(),
    "flywheel_client": {"flywheel_proto"},
    "flywheel_server": {"flywheel_proto", "flywheel_model"},
    "flywheel_learner": {"flywheel_proto", "flywheel_model", "flywheel_client"},
    "flywheel_demo": {"flywheel_proto", "flywheel_model", "flywheel_client", "flywheel_learner"},
    "flywheel_cli": set(PACKAGES) - {"flywheel_cli"},
}
BENCH_MAY_NOT_IMPORT = {"tests"}


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import in one file."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def violations(package: str, directory: Path, allowed: set[str]) -> list[str]:
    """`file:line imports module` for each import of a flywheel package not allowed."""
    found = []
    for path in sorted(directory.rglob("*.py")):
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != package and top not in allowed:
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                found.append(f"{shown}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", list(PACKAGES))
def test_every_import_points_down_the_layers(package: str) -> None:
    assert violations(package, PACKAGES[package], ALLOWED[package]) == []


def test_an_import_up_the_layers_is_caught(tmp_path: Path) -> None:
    (tmp_path / "engine.py").write_text(
        "import torch\n\ndef f():\n    from flywheel_learner.reward import fit_reward_model\n"
    )
    assert violations("flywheel_server", tmp_path, ALLOWED["flywheel_server"]) == [
        f"{tmp_path}/engine.py:4 imports flywheel_learner.reward"
    ]


def test_benches_do_not_import_the_tests() -> None:
    found = [
        f"{path.name}:{line} imports {module}"
        for path in sorted((ROOT / "bench").glob("*.py"))
        for line, module in imported_modules(path)
        if module.split(".")[0] in BENCH_MAY_NOT_IMPORT
    ]
    assert found == []


HEAVY = ("torch", "transformers", "peft", "safetensors", "bentoml", "starlette", "uvicorn",
         "pydantic", "sqlalchemy", "alembic", "prometheus_client")  # fmt: skip


def test_a_plain_install_is_the_sdk_and_the_verbs_without_torch() -> None:
    """`pip install flywheel` brings the core dependencies only; the SDK and every verb of the
    command line run on them: imported here with every serving and learning package blocked."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "httpx", "tqdm"}
    probe = (
        "import sys\n"
        f"HEAVY = {HEAVY!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in HEAVY:\n"
        "            raise ImportError(f'{name} is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import flywheel_client\n"
        "from flywheel_cli.main import build_parser\n"
        "for verb in (['generate', 'hi'], ['rank', 'a', 'b'], ['simulate', '--preference', 'x']):\n"
        "    build_parser({}).parse_args(verb)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_sdk_pulls_in_neither_torch_nor_the_server_nor_the_learner() -> None:
    probe = (
        "import sys, flywheel_client\n"
        "heavy = ('torch', 'transformers', 'flywheel_server', 'flywheel_learner', 'flywheel_model')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
