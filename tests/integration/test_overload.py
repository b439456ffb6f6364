"""Overload: past the admission bound, requests get 429 at once; admitted ones complete."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.support import ServerProcess

pytestmark = pytest.mark.integration

BOUND = 4


async def stream_one(client: httpx.AsyncClient, url: str) -> tuple[int, str, str | None]:
    body = {"prompt": "reverse: abc", "max_tokens": 200, "temperature": 1.0, "stream": True}
    async with client.stream("POST", url, json=body) as r:
        text = (await r.aread()).decode()
        return r.status_code, text, r.headers.get("retry-after")


def test_four_times_the_bound(tiny_model, tmp_path):
    server = ServerProcess(
        tiny_model, tmp_path / "data", args=["--max-pending", str(BOUND)]
    ).start()
    try:

        async def burst() -> list[tuple[int, str, str | None]]:
            async with httpx.AsyncClient(timeout=120) as client:
                url = f"{server.http}/v1/completions"
                return await asyncio.gather(*(stream_one(client, url) for _ in range(4 * BOUND)))

        results = asyncio.run(burst())
        statuses = [s for s, _, _ in results]
        assert statuses.count(429) >= 1
        assert set(statuses) <= {200, 429}
        for status, text, retry_after in results:
            if status == 429:
                assert "at capacity (4 requests admitted)" in text
                assert retry_after == "1"
            else:  # admitted: ran to the end
                assert text.rstrip().endswith("data: [DONE]")
        # Capacity comes back: the next request is served.
        assert server.post("/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200
    finally:
        server.stop()
