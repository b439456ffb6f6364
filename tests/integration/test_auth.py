"""API keys and scopes on both transports; no keys means loopback only."""

from __future__ import annotations

import json
import subprocess

import pytest

from flywheel_client import FlywheelClient, PermissionDenied, Unauthenticated
from tests.support import FLYWHEEL, ServerProcess

pytestmark = pytest.mark.integration

ADMIN = "admin-key-0123456789"
APP = "app-key-0123456789"
LABELER = "labeler-key-0123456789"


@pytest.fixture(scope="module")
def guarded(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("guarded")
    keys = data / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "app", "key": APP, "scopes": ["generate"]},
                    {"name": "ops", "key": ADMIN, "scopes": ["admin"]},
                ]
            }
        )
    )
    proc = ServerProcess(
        tiny_model,
        data,
        args=["--api-keys-file", str(keys)],
        env={"FLYWHEEL_API_KEYS": f"{LABELER}=feedback"},
    ).start()
    yield proc
    proc.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_http_scopes(guarded):
    body = {"prompt": "add: 1 + 1", "max_tokens": 2}
    assert guarded.post("/v1/completions", body)[0] == 401
    assert guarded.post("/v1/completions", body, bearer("wrong-key-000"))[0] == 401
    status, generated = guarded.post("/v1/completions", {**body, "n": 2}, bearer(APP))
    assert status == 200
    ids = [c["completion_id"] for c in generated["choices"]]
    status, error = guarded.post("/v1/feedback", {"ranking": ids, "labeler": "x"}, bearer(APP))
    assert status == 403 and "feedback" in error["error"]["message"]
    assert guarded.post("/v1/feedback", {"ranking": ids, "labeler": "x"}, bearer(LABELER))[0] == 201
    assert guarded.post("/v1/completions", body, bearer(ADMIN))[0] == 200  # admin implies generate


def test_grpc_scopes(guarded):
    with FlywheelClient(guarded.grpc) as anonymous, pytest.raises(Unauthenticated):
        anonymous.generate("x", max_tokens=1)
    with FlywheelClient(guarded.grpc, api_key=APP) as app:
        assert len(app.generate("x", max_tokens=1).completions) == 1
        with pytest.raises(PermissionDenied, match="admin"):
            app.export_rankings()
    with FlywheelClient(guarded.grpc, api_key=ADMIN) as ops:
        assert ops.server_info().base_model


def test_no_keys_refuses_public_bind(tiny_model, tmp_path):
    result = subprocess.run(
        [
            FLYWHEEL,
            "serve",
            "--model",
            str(tiny_model),
            "--data-dir",
            str(tmp_path),
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode != 0
    assert "refusing to bind 0.0.0.0 without API keys" in result.stderr + result.stdout
