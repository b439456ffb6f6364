"""The request timeout that replaces BentoML's: 504 when nothing started, and no timer (holding
the request's state) left behind once a request is done."""

from __future__ import annotations

import asyncio
import gc

import pytest

from flywheel_server.bento_timeout import TimeoutMiddleware, install

pytestmark = pytest.mark.unit


async def answer(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def silent(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    await asyncio.sleep(60)


async def call(app: TimeoutMiddleware) -> list[dict]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    await app({"type": "http"}, receive, send)
    return sent


def live_timers() -> list[asyncio.TimerHandle]:
    gc.collect()
    return [
        h for h in gc.get_objects()
        if isinstance(h, asyncio.TimerHandle) and not h.cancelled()
        and "_expire" in repr(h)
    ]  # fmt: skip


async def test_a_finished_request_leaves_no_timer_behind() -> None:
    app = TimeoutMiddleware(answer, timeout=3600)
    for _ in range(20):
        sent = await call(app)
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    # BentoML's own kept a live timer per request, holding its state for the hour
    assert live_timers() == []


async def test_a_response_that_never_starts_gets_a_504_and_is_cancelled() -> None:
    app = TimeoutMiddleware(silent, timeout=0.05)
    sent = await call(app)
    assert sent[0]["status"] == 504
    assert b"did not start within 0.05 seconds" in sent[1]["body"]
    assert live_timers() == []
    await asyncio.sleep(0)  # the cancelled request unwinds
    assert not [t for t in asyncio.all_tasks() if "silent" in repr(t.get_coro())]


def test_bentoml_builds_its_apps_with_this_middleware() -> None:
    from bentoml._internal.server.http import traffic

    import flywheel_server.bento_service  # noqa: F401  (installs it on import)

    assert install() is traffic
    assert traffic.TimeoutMiddleware is TimeoutMiddleware
