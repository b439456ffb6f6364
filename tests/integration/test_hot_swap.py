"""Hot-swap under load: promoting versions while clients stream fails no request, and a request
that started on a version finishes on it."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from flywheel_client import FlywheelClient
from flywheel_model import loading
from tests.support import make_adapter

# Marked tests run against the torch engine and against vLLM (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.both_backends]

CLIENTS = 6
SWAPS = 4


async def stream_versions(client: httpx.AsyncClient, url: str) -> set[str]:
    body = {"prompt": "sort: dcba", "max_tokens": 24, "temperature": 1.0, "stream": True}
    models: set[str] = set()
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                models.add(json.loads(line[6:])["model"])
    return models


def test_promotions_under_streaming_load(server, tmp_path):
    base = loading.base_fingerprint(server.model)
    adapters = [make_adapter(server.model, tmp_path / f"a{i}", seed=10 + i) for i in range(SWAPS)]

    async def scenario() -> tuple[list[set[str]], list[str]]:
        stop = asyncio.Event()
        seen: list[set[str]] = []

        async def client_loop() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                while not stop.is_set():
                    seen.append(await stream_versions(client, f"{server.http}/v1/completions"))

        clients = [asyncio.create_task(client_loop()) for _ in range(CLIENTS)]
        promoted = []
        for adapter in adapters:
            await asyncio.sleep(0.3)
            version = await asyncio.to_thread(_publish, server.grpc, adapter, base)
            promoted.append(version)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*clients)
        return seen, promoted

    seen, promoted = asyncio.run(scenario())
    assert len(seen) >= CLIENTS
    assert all(len(models) == 1 for models in seen)  # each stream on exactly one version
    with FlywheelClient(server.grpc) as client:
        assert client.versions().live["policy"] == promoted[-1]
        assert client.generate("x", max_tokens=2).completions[0].policy == promoted[-1]
        # Drained retired versions are unloaded beyond --keep-versions (default 2).
        assert _eventually(lambda: _retired(client) <= 2)
        client.rollback("policy")  # leave the shared server as other tests expect it
        while client.versions().live["policy"] != "policy-v0":
            client.rollback("policy")


def _publish(target: str, adapter, base: str) -> str:
    with FlywheelClient(target) as client:
        return client.publish_adapter(adapter, name="policy", base_model=base, promote=True).id


def _retired(client: FlywheelClient) -> int:
    return sum(v.state == "retired" for v in client.versions("policy").versions)


def _eventually(condition, attempts: int = 300) -> bool:
    """Poll a condition (a bound on waiting, not a timing assertion)."""
    for _ in range(attempts):
        if condition():
            return True
        time.sleep(0.1)
    return False
