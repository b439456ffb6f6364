"""BentoML's request timeout, without its leak.

BentoML (1.4.x) wraps every HTTP request in `TimeoutMiddleware`: it schedules `call_later(timeout,
...)` to answer 504 if the response has not started by then, and never cancels that timer. The
timer holds the request's context (its OpenTelemetry spans, its scope) until it fires, so with
the service's timeout of an hour every request's state stayed in memory for an hour: about 5 KB
a request, 600 MiB in the first 30 minutes of a soak at 80 requests/s (docs/benchmarks.md).

`TimeoutMiddleware` here keeps BentoML's behaviour (a 504 when the response has not started
within the timeout; the request then cancelled) and cancels its timer as soon as the request
no longer needs it. `install()` puts it where BentoML looks the class up when it builds the app.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class TimeoutMiddleware:
    """504 when a request's response has not started within `timeout` seconds."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.timeout, _expire, started)

        async def send_started(message: Message) -> None:
            if not started.done():
                started.set_result(None)
                timer.cancel()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, send_started))
        try:
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
            if started.done() and started.exception() is not None and task.cancel():
                answer = {"error": f"the response did not start within {self.timeout:g} seconds"}
                await JSONResponse(answer, status_code=504)(scope, receive, send)
                return
            await task
        finally:
            timer.cancel()  # the point of this class: nothing of the request outlives it
            if not started.done():
                started.cancel()
            if not task.done():
                task.cancel()


def _expire(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_exception(TimeoutError())


def install() -> Any:
    """Make BentoML build its apps with this TimeoutMiddleware; return the module patched."""
    from bentoml._internal.server.http import traffic

    if not isinstance(getattr(traffic, "TimeoutMiddleware", None), type):
        raise RuntimeError(
            "bentoml._internal.server.http.traffic.TimeoutMiddleware is gone: this BentoML "
            "version is not the one Flywheel was built against (see constraints.txt)"
        )
    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc,assignment]
    return traffic
