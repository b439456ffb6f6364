"""The `flywheel` command line: help, argument checks, and the serve hand-off (no server)."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from flywheel_cli import main as cli

pytestmark = pytest.mark.unit

CLIENT_FLAGS = ["--server", "--api-key", "--json", "--timeout"]
SAMPLING_FLAGS = ["--temperature", "--top-p", "--top-k", "--max-tokens", "--stop", "--seed"]
SERVER_FLAGS = ["--model", "--data-dir", "--host", "--http-port", "--grpc-port", "--api-keys-file"]

HELP_FLAGS = {
    "serve": SERVER_FLAGS,
    "up": SERVER_FLAGS,
    "generate": [*CLIENT_FLAGS, *SAMPLING_FLAGS, "--n", "--policy", "--stream", "--chat", "PROMPT"],
    "compare": [*CLIENT_FLAGS, *SAMPLING_FLAGS, "--k", "--policies", "PROMPT"],
    "rank": [*CLIENT_FLAGS, "--labeler", "--key", "a=b"],
    "demonstrate": [*CLIENT_FLAGS, "--labeler", "--key", "PROMPT", "RESPONSE"],
    "score": [*CLIENT_FLAGS, "--reward-model", "COMPLETION"],
    "policies": [*CLIENT_FLAGS, "--name"],
    "simulate": [*CLIENT_FLAGS, *SAMPLING_FLAGS, "--preference", "--k", "--count", "--seconds"],
}


def run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    for command in HELP_FLAGS:
        assert command in out


@pytest.mark.parametrize("command", sorted(HELP_FLAGS))
def test_command_help_mentions_its_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run([command, "--help"]) == 0
    out = capsys.readouterr().out
    for flag in HELP_FLAGS[command]:
        assert flag in out, f"{flag} missing from `flywheel {command} --help`"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["nonsense"], "invalid choice"),
        (["generate"], "PROMPT"),
        (["generate", "hi", "--n", "0"], "must be at least 1"),
        (["generate", "hi", "--max-tokens", "many"], "invalid"),
        (["generate", "hi", "--top-k", "-1"], "must be 0 or more"),
        (["compare", "hi", "--k", "0"], "must be at least 1"),
        (["rank"], "ID"),
        (["score", "prompt"], "COMPLETION"),
        (["policies", "--name", "critic"], "invalid choice"),
        (["serve", "--http-port", "port"], "invalid int"),
        (["learn", "--final-norm-lr", "-1"], "must be 0 or more"),
    ],
)
def test_bad_usage_exits_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(argv) == 2
    assert message in capsys.readouterr().err


def test_learn_defaults_to_the_ppo_configs_final_norm_lr() -> None:
    from flywheel_learner.ppo_config import PPOConfig

    args = cli.build_parser({}).parse_args(["learn", "--model", "m"])
    assert args.final_norm_lr == PPOConfig.final_norm_lr
    assert (
        cli.build_parser({})
        .parse_args(["learn", "--model", "m", "--final-norm-lr", "0"])
        .final_norm_lr
        == 0
    )


def test_rank_with_an_empty_tied_id_exits_2_before_connecting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Port 1 is never contacted: the argument is refused first.
    assert run(["rank", "a", "b=", "--server", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: empty completion id in 'b='")
    assert "Traceback" not in err


def test_client_defaults_come_from_the_environment_at_parse_time() -> None:
    env = {"FLYWHEEL_SERVER": "127.0.0.1:6000", "FLYWHEEL_API_KEY": "sekrit"}
    args = cli.build_parser(env).parse_args(["policies"])
    assert (args.server, args.api_key) == ("127.0.0.1:6000", "sekrit")
    args = cli.build_parser({}).parse_args(["policies", "--server", "127.0.0.1:7000"])
    assert (args.server, args.api_key) == ("127.0.0.1:7000", None)


@pytest.fixture
def fake_app(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, dict]]:
    calls: list[tuple[object, dict]] = []
    module = types.ModuleType("flywheel_server.app")
    module.run = lambda config, **kw: calls.append((config, kw))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flywheel_server.app", module)
    for name in list(os.environ):
        if name.startswith("FLYWHEEL_"):
            monkeypatch.delenv(name)
    return calls


def test_serve_builds_the_config_and_runs_the_app(fake_app: list, tmp_path: Path) -> None:
    argv = ["serve", "--model", str(tmp_path), "--data-dir", str(tmp_path), "--http-port", "3100",
            "--grpc-port", "50100"]  # fmt: skip
    assert run(argv) == 0
    [(config, kwargs)] = fake_app
    assert (config.data_dir, config.http_port, config.grpc_port) == (tmp_path, 3100, 50100)
    assert kwargs == {}


def test_up_runs_the_app_with_the_learner(fake_app: list) -> None:
    assert run(["up", "--model", "m", "--max-n", "8"]) == 0
    [(config, kwargs)] = fake_app
    assert config.max_n == 8
    assert kwargs == {"up": True}


def test_without_a_model_the_demo_is_built_and_served_with_its_reward_and_corpus(
    fake_app: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flywheel_demo import model as demo

    built = demo.DemoModel(tmp_path / "model", tmp_path / "reward-init", tmp_path / "p.txt", {})
    for directory in ("model", "reward-init", "mine"):
        (tmp_path / directory).mkdir()
    (tmp_path / "p.txt").write_text("a a\n")
    monkeypatch.setattr(demo, "ensure_demo_model", lambda data_dir, progress: built)
    assert run(["up", "--data-dir", str(tmp_path)]) == 0
    assert run(["up", "--data-dir", str(tmp_path), "--reward", str(tmp_path / "mine")]) == 0
    (first, _), (second, _) = fake_app
    assert (first.model, first.reward, first.pretraining) == built[:3]
    assert (second.model, second.reward, second.pretraining) == (
        built.model_dir,
        tmp_path / "mine",
        built.pretraining,
    )


def test_serve_with_an_invalid_config_exits_2(
    fake_app: list, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["serve", "--http-port", "70000"]) == 2
    assert "error: http_port must be between 0 and 65535, got 70000" in capsys.readouterr().err
    assert fake_app == []


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "flywheel"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: flywheel" in result.stdout


def test_learn_passes_the_memory_flags_to_both_fits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flywheel_learner import loop

    (tmp_path / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr(loop, "run", lambda config, *a, **k: seen.append(config) or 0)
    argv = ["learn", "--model", str(tmp_path), "--work-dir", str(tmp_path / "w"),
            "--gradient-checkpointing", "--max-tokens-per-microbatch", "512"]  # fmt: skip
    assert run(argv) == 0
    (config,) = seen
    for fit in (config.ppo, config.reward):
        assert fit.gradient_checkpointing is True and fit.max_tokens_per_microbatch == 512
