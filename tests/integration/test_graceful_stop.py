"""SIGTERM under load: admitted requests finish, the process exits cleanly."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from tests.support import ServerProcess

pytestmark = pytest.mark.integration

CLIENTS = 8


def test_sigterm_lets_admitted_streams_finish(tiny_model, tmp_path):
    server = ServerProcess(tiny_model, tmp_path / "data").start()
    url = f"{server.http}/v1/completions"

    async def scenario() -> list[str]:
        started = asyncio.Event()
        count = 0

        async def stream(client: httpx.AsyncClient) -> str:
            nonlocal count
            body = {"prompt": "reverse: abc", "max_tokens": 150, "temperature": 1.0, "stream": True}
            lines = []
            async with client.stream("POST", url, json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                        if len(lines) == 1:
                            count += 1
                            if count == CLIENTS:
                                started.set()
            return lines[-1]

        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(CLIENTS)]
            await asyncio.wait_for(started.wait(), 60)
            server.proc.send_signal(signal.SIGTERM)  # every stream is admitted and mid-flight
            return await asyncio.gather(*tasks)

    try:
        last_lines = asyncio.run(scenario())
        assert last_lines == ["data: [DONE]"] * CLIENTS
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
