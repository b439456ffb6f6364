"""API keys and scopes on both transports; no keys means loopback only."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from flywheel_client import (
    FlywheelClient,
    HttpClient,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from flywheel_model import loading
from tests.support import FLYWHEEL, ServerProcess, make_adapter

pytestmark = pytest.mark.integration

ADMIN = "admin-key-0123456789"
APP = "app-key-0123456789"
LABELER = "labeler-key-0123456789"
GREEDY = "greedy-key-0123456789"  # two requests at once, then one per 20 s
BUDGET = "budget-key-0123456789"  # 12 tokens a minute
TEAM = "team-key-0123456789"  # a labeling team's shared key: labeler "alice" is "team/alice"


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
                    {
                        "name": "budget",
                        "key": BUDGET,
                        "scopes": ["generate"],
                        "tokens_per_min": 12,
                    },
                    {
                        "name": "team",
                        "key": TEAM,
                        "scopes": ["generate", "feedback"],
                        "sub_labelers": True,
                    },
                    {
                        "name": "greedy",
                        "key": GREEDY,
                        "scopes": ["generate"],
                        "rate_per_s": 0.05,
                        "burst": 2,
                    },
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
    assert guarded.post("/v1/feedback", {"ranking": ids}, bearer(LABELER))[0] == 201
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


def fresh_ids(server: ServerProcess) -> list[str]:
    body = {"prompt": "add: 2 + 2", "max_tokens": 2, "n": 2}
    status, generated = server.post("/v1/completions", body, bearer(APP))
    assert status == 200
    return [c["completion_id"] for c in generated["choices"]]


def test_a_token_budget_limits_what_a_key_may_ask_to_generate(guarded):
    body = {"prompt": "add: 1 + 1", "max_tokens": 8}
    assert guarded.post("/v1/completions", body, bearer(BUDGET))[0] == 200  # 4 of 12 left
    with httpx.Client(timeout=60) as http:
        url = f"{guarded.http}/v1/completions"
        spent = http.post(url, json=body, headers=bearer(BUDGET))
        assert spent.status_code == 429 and 1 <= int(spent.headers["retry-after"]) <= 60
        assert "spent its 12 tokens per minute" in spent.json()["error"]["message"]
        too_big = http.post(url, json={**body, "n": 2}, headers=bearer(BUDGET))
        assert too_big.status_code == 429 and "ask for fewer" in too_big.json()["error"]["message"]
        assert http.post(url, json=body, headers=bearer(APP)).status_code == 200  # APP: no budget


def test_feedback_is_recorded_under_the_keys_name(guarded):
    with FlywheelClient(guarded.grpc, api_key=ADMIN) as ops:
        before = len(ops.export_rankings())
        # HTTP: a feedback key cannot rank as another labeler; nothing is stored
        status, error = guarded.post(
            "/v1/feedback", {"ranking": fresh_ids(guarded), "labeler": "mallory"}, bearer(LABELER)
        )
        assert status == 403 and error["error"]["param"] == "labeler"
        assert "'env-1', not 'mallory'" in error["error"]["message"]
        assert len(ops.export_rankings()) == before
        # gRPC, likewise
        with FlywheelClient(guarded.grpc, api_key=LABELER) as labeler:
            with pytest.raises(PermissionDenied, match="sub_labelers"):
                labeler.rank(fresh_ids(guarded), labeler="mallory")
            assert len(ops.export_rankings()) == before
            labeler.rank(fresh_ids(guarded), labeler="")  # the key's name
            labeler.rank(fresh_ids(guarded), labeler="env-1")  # the same, named
        # a team key may name its members, recorded under the key
        status, _ = guarded.post(
            "/v1/feedback",
            {"ranking": fresh_ids(guarded), "labeler": "alice", "idempotency_key": "team-1"},
            bearer(TEAM),
        )
        assert status == 201
        with FlywheelClient(guarded.grpc, api_key=TEAM) as team:
            team.rank(fresh_ids(guarded), labeler="")
        names = [r.labeler for r in ops.export_rankings()[before:]]
        assert names == ["env-1", "env-1", "team/alice", "team"]
        # another labeler's idempotency key is not a duplicate of theirs: it is refused
        status, error = guarded.post(
            "/v1/feedback",
            {"ranking": fresh_ids(guarded), "idempotency_key": "team-1"},
            bearer(LABELER),
        )
        assert status == 409 and "another labeler" in error["error"]["message"]
        assert len(ops.export_rankings()) == before + 4


def test_a_greedy_key_is_limited_while_another_is_served(guarded):
    models = guarded.http + "/v1/models"
    with httpx.Client(timeout=60) as http:
        statuses = [http.get(models, headers=bearer(GREEDY)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        limited = http.get(models, headers=bearer(GREEDY))
        assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 20
        error = limited.json()["error"]
        assert (
            error["type"] == "rate_limit_error" and "'greedy' is over its limit" in error["message"]
        )
        assert [http.get(models, headers=bearer(APP)).status_code for _ in range(10)] == [200] * 10
        metrics = http.get(guarded.http + "/metrics").text
    assert 'flywheel_key_rejected_total{key="greedy",reason="RateLimited"}' in metrics
    # Both transports share the key's bucket, and both clients read the wait.
    with (
        FlywheelClient(guarded.grpc, api_key=GREEDY) as grpc_client,
        pytest.raises(Overloaded) as e,
    ):
        grpc_client.generate("x", max_tokens=1)
    assert e.value.retry_after is not None and 0 < e.value.retry_after <= 20
    with HttpClient(guarded.http, api_key=GREEDY) as http_client, pytest.raises(Overloaded) as e:
        http_client.generate("x", max_tokens=1)
    assert e.value.retry_after is not None and 1 <= e.value.retry_after <= 20
    with FlywheelClient(guarded.grpc, api_key=APP) as app:
        assert len(app.generate("x", max_tokens=1).completions) == 1


def test_the_audit_trail_names_the_key_behind_each_change(guarded, tmp_path):
    with FlywheelClient(guarded.grpc, api_key=ADMIN) as ops:
        after = ops.audit()[-1].cursor if ops.audit() else 0
        version = ops.publish_adapter(
            make_adapter(guarded.model, tmp_path / "p", seed=3),
            name="policy",
            base_model=loading.base_fingerprint(guarded.model),
        )
        ops.promote("policy", version.version)
        with FlywheelClient(guarded.grpc, api_key=APP) as app, pytest.raises(PermissionDenied):
            app.rollback("policy")  # a generate key: refused, and tallied under its name
        status, _ = guarded.post("/v1/policies/rollback", {"name": "policy"}, bearer(ADMIN))
        assert status == 200
        entries = ops.audit(after)
        changes = [e for e in entries if e.action != "key_rejected"]  # earlier tests' refusals
        trail = [(e.actor, e.action, e.target) for e in changes]
        assert trail == [
            ("ops", "publish", version.id),
            ("ops", "promote", version.id),
            ("ops", "rollback", trail[2][2]),
        ]
        assert trail[2][2] != version.id  # back to what was live before
        assert ("app", "key_rejected", "PermissionDenied") in [
            (e.actor, e.action, e.target) for e in entries
        ]
        times = [e.at for e in changes]
        assert times == sorted(times) and times[0] > 0
    # HTTP reads the same trail, for admin keys only
    with httpx.Client(timeout=60) as http:
        read = http.get(f"{guarded.http}/v1/audit", params={"after": after}, headers=bearer(ADMIN))
        assert read.status_code == 200
        body = read.json()
        actions = [e["action"] for e in body["entries"] if e["action"] != "key_rejected"]
        assert actions == ["publish", "promote", "rollback"]
        assert body["next"] == body["entries"][-1]["cursor"]
        assert http.get(f"{guarded.http}/v1/audit", headers=bearer(APP)).status_code == 403
        bad = http.get(f"{guarded.http}/v1/audit", params={"after": "-1"}, headers=bearer(ADMIN))
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "after"


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
