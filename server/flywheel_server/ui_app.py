"""The labeling page (/ui/) and the dashboard (/ui/admin): static files shipped in the package (no script, style or font
is fetched from elsewhere), and the little it needs to know of the server (`/ui/config.json`:
whether auth is on, and the operator's guidelines). Everything else goes through /v1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent / "ui"


def create_ui(get_runtime: Callable[[], Any]) -> Starlette:
    async def config(request: Request) -> Response:
        runtime = get_runtime()
        path = runtime.service.config.guidelines
        guidelines = Path(path).read_text(encoding="utf-8") if path else ""
        return JSONResponse({"auth": runtime.auth.enabled, "guidelines": guidelines})

    async def dashboard(request: Request) -> Response:
        return FileResponse(UI_DIR / "admin.html")

    return Starlette(
        routes=[
            Route("/config.json", config, methods=["GET"]),
            Route("/admin", dashboard, methods=["GET"]),
            Mount("/", StaticFiles(directory=UI_DIR, html=True)),
        ]
    )
