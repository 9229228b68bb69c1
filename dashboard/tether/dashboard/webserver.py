"""Serve the dashboard with uvicorn: the live upstream clients opened at start, closed at stop."""

from __future__ import annotations

import uvicorn
from starlette.applications import Starlette

from tether.dashboard import app as app_mod
from tether.dashboard import settings as settings_mod
from tether.dashboard import upstream


def build(settings: settings_mod.Settings) -> Starlette:
    live = upstream.Live(settings)
    return app_mod.create_app(
        live,
        token=settings.token,
        auth=settings.auth,
        allow_controls=settings.allow_controls,
        interval_s=settings.interval_s,
        secure_cookies=settings.secure_cookies,
        session_key=settings.session_key,
        on_startup=live.start,
        on_shutdown=live.close,
    )


def server(settings: settings_mod.Settings, *, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for `settings` (`await server.serve()`; `server.should_exit = True` stops it)."""
    config = uvicorn.Config(
        build(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,
        lifespan="on",
    )
    return uvicorn.Server(config)


def url(settings: settings_mod.Settings, port: int | None = None) -> str:
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{port or settings.port}/"
