"""HTTP connections whose client stops reading are cut off after a write timeout.

A streamed completion is written as fast as it decodes. When the client stops reading, the
socket's buffers fill, the transport calls `pause_writing`, and the response's `send` waits for
`resume_writing`, which never comes: the stream would hold its request, its buffered events and
its connection for as long as the client likes. So a connection whose writes stay paused for
`seconds` is aborted. The abort drops the transport's buffer (bounded meanwhile by uvicorn's flow
control: it stops taking writes past its high-water mark) and ends the request as a client
disconnect, which cancels the generation and frees its rows in the engine.

asyncio's `close()` would wait for the buffer to drain, so only the protocol, which holds the
transport, can abort; hence a subclass of uvicorn's protocol rather than ASGI middleware.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("flywheel")


def with_write_timeout(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, aborting a connection paused for writing `seconds`."""
    if not seconds > 0:
        raise ValueError(f"the write timeout must be > 0 seconds, got {seconds}")

    class WriteTimeoutProtocol(HttpToolsProtocol):
        _stalled: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stalled is None:
                self._stalled = self.loop.call_later(seconds, self._cut_off)

        def resume_writing(self) -> None:
            self._cancel_timer()
            super().resume_writing()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timer()
            super().connection_lost(exc)

        def _cancel_timer(self) -> None:
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None

        def _cut_off(self) -> None:
            self._stalled = None
            log.warning("HTTP client %s read nothing for %.3g s; connection aborted",
                        self.client, seconds)  # fmt: skip
            from flywheel_server import metrics  # prometheus-client loads after prepare_process

            metrics.STALLED_STREAMS.labels("http").inc()
            self.transport.abort()

    return WriteTimeoutProtocol
