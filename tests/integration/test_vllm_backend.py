"""What only the vLLM backend has: versions held by vLLM under their own names, and a vLLM
sidecar given by URL. The shared behaviour runs in the `both_backends` tests."""

from __future__ import annotations

import re

import httpx
import pytest

from flywheel_client import Conflict, FlywheelClient
from flywheel_model import loading
from tests.support import ServerProcess, make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


def vllm_url(server: ServerProcess) -> str:
    match = re.search(r"\(vllm at (http://[\d.:]+)\)", server.log.read_text())
    assert match, "the server did not say which vLLM it serves from"
    return match.group(1)


def vllm_adapters(url: str) -> set[str]:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    return {m["id"] for m in models if m.get("parent")}


def test_versions_live_in_vllm_under_their_own_names(vllm_server, tmp_path):
    url = vllm_url(vllm_server)
    base = loading.base_fingerprint(vllm_server.model)
    with FlywheelClient(vllm_server.grpc) as client:
        published = []
        for i in range(4):  # more than the live version and the 2 retired ones kept
            adapter = make_adapter(vllm_server.model, tmp_path / f"v{i}", seed=30 + i)
            published.append(
                client.publish_adapter(adapter, name="policy", base_model=base, promote=True).id
            )
            loaded = {v.id for v in client.versions("policy").versions if v.version > 0}
            assert vllm_adapters(url) == loaded  # vLLM holds exactly what the registry lists
        assert published[-1] in vllm_adapters(url)
        assert published[0] not in vllm_adapters(url)  # retired, drained, unloaded
        assert client.generate("x", max_tokens=2).completions[0].policy == published[-1]


def test_a_sidecar_given_by_url(vllm_server, tmp_path):
    url = vllm_url(vllm_server)
    sidecar_user = ServerProcess(
        vllm_server.model, tmp_path / "b", args=["--backend", "vllm", "--vllm-url", url]
    ).start()
    try:
        with FlywheelClient(sidecar_user.grpc) as client:
            out = client.generate("sort: cba", n=2, max_tokens=6, temperature=1.0, seed=1)
        assert [c.policy for c in out.completions] == ["policy-v0", "policy-v0"]
        assert all(c.completion_tokens > 0 for c in out.completions)
        assert not (tmp_path / "b" / "vllm.log").exists()  # it started no vLLM of its own
    finally:
        assert sidecar_user.stop() == 0
    # Stopping a server leaves a vLLM it did not start running.
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_vllm_own_refusal_is_passed_on(vllm_server, tmp_path):
    base = loading.base_fingerprint(vllm_server.model)
    too_big = make_adapter(vllm_server.model, tmp_path / "r128", r=128)  # flywheel starts vLLM
    with FlywheelClient(vllm_server.grpc) as client:  # with --max-lora-rank 64
        live_before = client.versions().live
        with pytest.raises(Conflict, match="vLLM refused adapter policy-v"):
            client.publish_adapter(too_big, name="policy", base_model=base, promote=True)
        assert client.versions().live == live_before
