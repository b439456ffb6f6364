"""ServerConfig: bounds, environment variables at the edge, and the command line mapped onto it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from flywheel_server.auth import Authenticator
from flywheel_server.config import ServerConfig, add_arguments, from_arguments

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_flywheel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """from_arguments reads os.environ: start every test without FLYWHEEL_* variables."""
    import os

    for name in list(os.environ):
        if name.startswith("FLYWHEEL_"):
            monkeypatch.delenv(name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


# -- defaults and bounds ---------------------------------------------------------------------


def test_defaults() -> None:
    c = ServerConfig()
    assert (c.model, c.data_dir, c.db, c.host, c.http_port, c.grpc_port) == (
        None,
        Path(".flywheel"),
        None,
        "127.0.0.1",
        3000,
        50051,
    )
    assert (c.api_keys_file, c.device, c.max_tokens_limit, c.max_n) == (None, "auto", 512, 16)
    assert (c.max_body_bytes, c.max_prompt_tokens, c.log_level) == (1 << 20, 1024, "INFO")
    assert (
        c.challenger_share,
        c.challenger_confidence,
        c.challenger_promote_above,
        c.challenger_retire_below,
        c.challenger_min_rankings,
    ) == (0.5, 0.95, 0.5, 0.5, 10)


@pytest.mark.parametrize(
    ("threads", "cores", "up", "split"),
    [
        (0, 2, False, (0, 0)),  # serve alone: torch's default
        (0, 2, True, (1, 1)),  # up: half each
        (0, 1, True, (1, 1)),  # one core: both still get a thread
        (0, 16, True, (8, 8)),
        (3, 16, True, (3, 13)),  # --threads fixes the engine's; the learner gets the rest
        (4, 2, True, (4, 1)),
        (4, 16, False, (4, 0)),
    ],
)
def test_thread_split(threads: int, cores: int, up: bool, split: tuple[int, int]) -> None:
    assert ServerConfig(threads=threads).thread_split(cores, up) == split


def test_config_is_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerConfig().http_port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"http_port": 70000}, "http_port must be between 0 and 65535, got 70000"),
        ({"grpc_port": -1}, "grpc_port must be between 0 and 65535, got -1"),
        (
            {"http_port": 4000, "grpc_port": 4000},
            "http_port and grpc_port must differ, both are 4000",
        ),
        ({"max_n": 1}, "max_n must be between 2 and 256, got 1"),
        ({"max_n": 257}, "max_n must be between 2 and 256, got 257"),
        ({"max_tokens_limit": 0}, "max_tokens_limit must be between 1 and 65536, got 0"),
        ({"max_body_bytes": 1023}, "max_body_bytes must be between 1024 and 1073741824, got 1023"),
        (
            {"max_prompt_tokens": (1 << 20) + 1},
            "max_prompt_tokens must be between 1 and 1048576, got 1048577",
        ),
        ({"device": "tpu"}, "device must be auto, cpu or cuda[:N], got 'tpu'"),
        ({"backend": "tgi"}, "backend must be one of torch, vllm, got 'tgi'"),
        ({"challenger_share": 1.5}, "challenger_share must be in [0, 1], got 1.5"),
        ({"challenger_share": float("nan")}, "challenger_share must be in [0, 1], got nan"),
        (
            {"challenger_promote_above": -0.1},
            "challenger_promote_above must be in [0, 1], got -0.1",
        ),
        ({"challenger_confidence": 1.0}, "challenger_confidence must be in (0, 1), got 1.0"),
        ({"challenger_confidence": 0.0}, "challenger_confidence must be in (0, 1), got 0.0"),
        (
            {"challenger_min_rankings": 0},
            "challenger_min_rankings must be between 1 and 1048576, got 0",
        ),
        (
            {"challenger_retire_below": 0.6},
            "challenger_retire_below (0.6) must not exceed challenger_promote_above (0.5): one "
            "tally could then both promote and retire",
        ),
        (
            {"backend": "vllm", "vllm_url": "127.0.0.1:8000"},
            "vllm_url must start with http:// or https://, got '127.0.0.1:8000'",
        ),
    ],
)
def test_bounds(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ServerConfig(**kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"http_port": 0, "grpc_port": 0},  # both ephemeral is fine
        {"http_port": 65535, "grpc_port": 0},
        {"max_n": 2},
        {"max_n": 256},
        {"max_tokens_limit": 1},
        {"max_body_bytes": 1024},
        {"device": "cpu"},
        {"device": "cuda"},
        {"device": "cuda:1"},
        {"backend": "vllm", "vllm_url": "http://127.0.0.1:8000"},
        {"challenger_share": 0.0},
        {"challenger_share": 1.0},
        {"challenger_promote_above": 0.6, "challenger_retire_below": 0.6},
        {"challenger_promote_above": 1.0, "challenger_retire_below": 0.0},
        {"challenger_min_rankings": 1},
    ],
)
def test_bounds_are_inclusive(kwargs: dict[str, Any]) -> None:
    c = ServerConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(c, name) == value


# -- derived values ------------------------------------------------------------------------------


def test_database_url_defaults_to_sqlite_under_data_dir(tmp_path: Path) -> None:
    c = ServerConfig(data_dir=tmp_path / "data")
    assert c.database_url == f"sqlite:///{tmp_path.resolve()}/data/flywheel.db"


def test_relative_data_dir_is_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert ServerConfig().database_url == f"sqlite:///{tmp_path.resolve()}/.flywheel/flywheel.db"


def test_an_explicit_db_wins() -> None:
    assert ServerConfig(db="postgresql://u@h/db").database_url == "postgresql://u@h/db"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("example.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert ServerConfig(host=host).is_loopback is loopback


# -- environment -----------------------------------------------------------------------------------


def test_from_env_reads_flywheel_variables() -> None:
    c = ServerConfig.from_env(
        {
            "FLYWHEEL_HTTP_PORT": "8080",
            "FLYWHEEL_MODEL": "/models/tiny",
            "FLYWHEEL_DATA_DIR": "/var/flywheel",
            "FLYWHEEL_DB": "sqlite:///x.db",
            "FLYWHEEL_MAX_N": "4",
            "FLYWHEEL_DEVICE": "cpu",
            "FLYWHEEL_GRPC_PORT": "",  # empty means not set
            "HTTP_PORT": "1",  # no prefix: ignored
        }
    )
    assert c.http_port == 8080
    assert c.model == Path("/models/tiny")
    assert isinstance(c.model, Path)
    assert c.data_dir == Path("/var/flywheel")
    assert c.db == "sqlite:///x.db"
    assert c.max_n == 4
    assert c.device == "cpu"
    assert c.grpc_port == 50051
    assert c.database_url == "sqlite:///x.db"


def test_from_env_overrides_win_over_variables() -> None:
    c = ServerConfig.from_env(
        {"FLYWHEEL_HTTP_PORT": "8080", "FLYWHEEL_HOST": "0.0.0.0"}, http_port=9090
    )
    assert (c.http_port, c.host) == (9090, "0.0.0.0")


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_HTTP_PORT", "8181")
    assert ServerConfig.from_env().http_port == 8181


def test_from_env_validates() -> None:
    with pytest.raises(ValueError, match=r"^http_port must be between 0 and 65535, got 70000$"):
        ServerConfig.from_env({"FLYWHEEL_HTTP_PORT": "70000"})
    with pytest.raises(ValueError):
        ServerConfig.from_env({"FLYWHEEL_HTTP_PORT": "eighty"})


def test_flywheel_api_keys_variable_is_not_taken_as_a_key_file() -> None:
    environ = {"FLYWHEEL_API_KEYS": "secret-key-1=admin"}
    c = ServerConfig.from_env(environ)
    assert c.api_keys_file is None
    assert (
        Authenticator.load(c.api_keys_file, environ).check("Bearer secret-key-1", "admin")
        == "env-1"
    )


# -- command line ----------------------------------------------------------------------------------


def test_every_field_has_a_flag_defaulting_to_none() -> None:
    args = parser().parse_args([])
    assert vars(args) == {f.name: None for f in dataclasses.fields(ServerConfig)}
    assert from_arguments(args) == ServerConfig()


def test_flags_round_trip() -> None:
    args = parser().parse_args(
        [
            "--model",
            "/models/tiny",
            "--data-dir",
            "/tmp/fw",
            "--db",
            "sqlite:///a.db",
            "--host",
            "0.0.0.0",
            "--http-port",
            "8000",
            "--grpc-port",
            "8001",
            "--api-keys-file",
            "/etc/keys.json",
            "--device",
            "cpu",
            "--max-tokens-limit",
            "100",
            "--max-n",
            "8",
            "--max-body-bytes",
            "4096",
            "--max-prompt-tokens",
            "300",
            "--log-level",
            "DEBUG",
        ]
    )
    assert args.http_port == 8000
    assert isinstance(args.model, Path)
    assert from_arguments(args) == ServerConfig(
        model=Path("/models/tiny"),
        data_dir=Path("/tmp/fw"),
        db="sqlite:///a.db",
        host="0.0.0.0",
        http_port=8000,
        grpc_port=8001,
        api_keys_file=Path("/etc/keys.json"),
        device="cpu",
        max_tokens_limit=100,
        max_n=8,
        max_body_bytes=4096,
        max_prompt_tokens=300,
        log_level="DEBUG",
    )


def test_flags_override_the_environment_which_overrides_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLYWHEEL_HTTP_PORT", "8080")
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", "8081")
    monkeypatch.setenv("FLYWHEEL_MODEL", "/env/model")
    c = from_arguments(parser().parse_args(["--http-port", "9000", "--model", "/flag/model"]))
    assert c.http_port == 9000
    assert c.model == Path("/flag/model")
    assert c.grpc_port == 8081  # not given as a flag: from the environment
    assert c.max_n == 16  # neither: the default


def test_a_bad_flag_value_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["--http-port", "eighty"])
    assert info.value.code == 2
    assert "--http-port" in capsys.readouterr().err


def test_flag_help_names_the_default() -> None:
    text = parser().format_help()
    assert "--http-port HTTP_PORT" in text
    assert "(default: 3000)" in text
    assert "(default: 50051)" in text


def test_float_flags_and_variables_are_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_CHALLENGER_CONFIDENCE", "0.9")
    c = from_arguments(
        parser().parse_args(["--challenger-share", "1", "--challenger-min-rankings", "4"])
    )
    assert (c.challenger_share, c.challenger_confidence, c.challenger_min_rankings) == (1.0, 0.9, 4)
    assert isinstance(c.challenger_share, float)
    with pytest.raises(SystemExit):
        parser().parse_args(["--challenger-share", "half"])


def test_flags_are_validated_by_the_config() -> None:
    with pytest.raises(ValueError, match=r"^max_n must be between 2 and 256, got 1$"):
        from_arguments(parser().parse_args(["--max-n", "1"]))
