"""The BentoML HTTP service: our /v1 routes and the labeling page (/ui/) mounted into a Bento,
with BentoML's /livez, /readyz and /metrics.

`flywheel serve` builds the runtime (engine, store, service) first and installs it here, then
runs this service's ASGI app in its own event loop beside the gRPC server, so both transports
share one engine. BentoML's new-style services have no gRPC of their own.
"""

from __future__ import annotations

from typing import Any

import bentoml

from flywheel_model import memory
from flywheel_server import bento_timeout, metrics
from flywheel_server.http_api import create_app
from flywheel_server.ui_app import create_ui

bento_timeout.install()  # BentoML's own leaks every request's state for the whole timeout

_runtime: dict[str, Any] = {}


def install(runtime: Any) -> None:
    _runtime["current"] = runtime


def current() -> Any:
    try:
        return _runtime["current"]
    except KeyError:
        raise RuntimeError("the Flywheel runtime is not started; run `flywheel serve`") from None


http_app = create_app(current)
ui_app = create_ui(current)


@bentoml.service(name="flywheel", traffic={"timeout": 3600})
@bentoml.asgi_app(http_app, path="/v1")
@bentoml.asgi_app(ui_app, path="/ui")
class Flywheel:
    """OpenAI-compatible completions, feedback and policy routes over one shared engine."""

    def __init__(self) -> None:
        self.runtime = current()

    async def __is_ready__(self) -> bool:
        return bool(self.runtime.ready and self.runtime.store_ok)


def _sample_gauges() -> None:
    if runtime := _runtime.get("current"):
        service = runtime.service
        metrics.sample(
            service.engine.load,
            service.registry.live(),
            service.adapters.last_challenge,
            memory.peak_bytes(str(service.engine.device)),
        )


Flywheel.add_asgi_middleware(metrics.RefreshOnScrape, refresh=_sample_gauges)  # type: ignore[attr-defined]
