"""The dashboard's routes: pages rendered on the server, live updates by server-sent events, optional controls.

Pages: `/` (every MLTask), `/tasks/<ns>/<name>` (stages, gates, coverage plot, events, federated
rounds), `/tasks/<ns>/<name>/aggregate`, `/fleet?filter=<target document>`. Each page opens one
EventSource on `/live/...`; the hub fans one upstream poll out to all of them, and each message
carries the page's fragments re-rendered from the same templates plus the plot's data, so the
page never reloads. Controls (only with `allow_controls`): GET `/tasks/<ns>/<name>/control/<action>`
is a confirmation page holding a CSRF token; its POST sends `tether rollout`'s patch.

Security: every route but `/login`, `/healthz` and `/static` needs the session cookie or the bearer
token; responses carry a strict Content-Security-Policy (scripts and styles from `/static` only),
`X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`, and `Cache-Control: no-store`. Pages show
no token, credential or signed URL: the views read named status fields only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tether.common import errors, rollout_controls
from tether.dashboard import livehub, views
from tether.dashboard import sessions as sessions_mod
from tether.dashboard import subjects as subjects_mod
from tether.dashboard import upstream as upstream_mod

PACKAGE = importlib.resources.files("tether.dashboard")
HEARTBEAT_S = 15.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


def _check_name(value: str, *, field: str) -> str:
    """Kubernetes object names only: anything else is refused before it reaches a URL or an API call."""
    if not value or len(value) > 253 or not set(value) <= NAME_CHARS:
        raise errors.InvalidArgument(f"{field}: {errors.excerpt(value)} is not a Kubernetes name")
    return value


def create_app(
    source: upstream_mod.Upstream,
    *,
    token: str,
    auth: str = "token",
    allow_controls: bool = False,
    interval_s: float = 2.0,
    secure_cookies: bool = False,
    session_key: bytes | None = None,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> Starlette:
    sessions = (
        sessions_mod.Sessions(token=token, key=session_key) if session_key else sessions_mod.Sessions(token=token)
    )
    # --auth kubernetes: each session's own Kubernetes token, held here only (never in the cookie, never
    # rendered); a restart forgets them, so everyone logs in again.
    user_tokens: dict[str, tuple[str, float]] = {}
    subjects = subjects_mod.Subjects(source)
    hub = livehub.Hub(subjects.fetch, interval_s=interval_s)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(PACKAGE / "templates")), autoescape=True)
    templates = Jinja2Templates(env=env)
    templates.env.globals["actions"] = rollout_controls.ACTIONS
    fragments = templates.env.get_template("fragments.html")

    def viewer(request: Request) -> str | None:
        """The session id (or "bearer" for a script presenting the token), None when not logged in."""
        header = request.headers.get("authorization", "")
        if auth == "token" and header.lower().startswith("bearer ") and sessions.token_ok(header[7:].strip()):
            return "bearer"
        sid = sessions.session(request.cookies.get(sessions_mod.COOKIE), now=time.time())
        if auth == "kubernetes" and sid not in user_tokens:
            return None
        return sid

    def page(request: Request, name: str, context: dict[str, Any], *, status_code: int = 200) -> Response:
        sid = viewer(request)
        base = {"controls": allow_controls, "csrf": sessions.csrf(sid) if sid else "", "logged_in": sid is not None}
        response = templates.TemplateResponse(request, name, {**base, **context}, status_code=status_code)
        response.headers.update(SECURITY_HEADERS)
        return response

    def render(macro: str, *args: Any) -> str:
        return str(getattr(fragments.module, macro)(*args))

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            if viewer(request) is None:
                if request.url.path.startswith("/live/") or request.method != "GET":
                    return JSONResponse({"error": "not logged in"}, status_code=401, headers=SECURITY_HEADERS)
                target = urllib.parse.quote(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
                return RedirectResponse(f"/login?next={target}", status_code=303)
            try:
                return await handler(request)
            except errors.InvalidArgument as e:
                return page(request, "error.html", {"title": "Bad request", "message": str(e)}, status_code=400)
            except errors.NotFound as e:
                return page(request, "error.html", {"title": "Not found", "message": str(e)}, status_code=404)
            except errors.PermissionDenied as e:
                return page(request, "error.html", {"title": "Not allowed", "message": str(e)}, status_code=403)
            except errors.TetherError as e:
                return page(request, "error.html", {"title": "Upstream error", "message": str(e)}, status_code=502)

        return wrapped

    def task_key(request: Request) -> tuple[str, str]:
        return (
            _check_name(request.path_params["namespace"], field="namespace"),
            _check_name(request.path_params["name"], field="name"),
        )

    # ------------------------------------------------------------ login
    async def login_form(request: Request) -> Response:
        context = {"next": _safe_next(request.query_params.get("next")), "failed": "", "auth": auth}
        return page(request, "login.html", context)

    async def login(request: Request) -> Response:
        form = await request.form()
        target = _safe_next(str(form.get("next") or "/"))
        presented = str(form.get("token") or "")
        now = time.time()
        cookie: str | None
        if auth == "kubernetes":
            try:
                if not presented:
                    raise errors.Unauthenticated("no token given")
                await source.authenticate(presented)
            except (errors.Unauthenticated, errors.PermissionDenied) as e:
                context = {"next": target, "failed": f"The API server refused: {e}", "auth": auth}
                return page(request, "login.html", context, status_code=401)
            except errors.TetherError as e:
                context = {"next": target, "failed": f"The API server could not check it: {e}", "auth": auth}
                return page(request, "login.html", context, status_code=502)
            cookie = sessions.issue(now=now)
            for sid, (_, expires) in list(user_tokens.items()):
                if expires < now:
                    del user_tokens[sid]
            user_tokens[str(sessions.session(cookie, now=now))] = (presented, now + sessions.ttl_s)
        else:
            cookie = sessions.login(presented, now=now)
        if cookie is None:
            context = {"next": target, "failed": "That token is not the dashboard's token.", "auth": auth}
            return page(request, "login.html", context, status_code=401)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            sessions_mod.COOKIE,
            cookie,
            max_age=sessions.ttl_s,
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        sid = sessions.session(request.cookies.get(sessions_mod.COOKIE), now=time.time())
        user_tokens.pop(str(sid), None)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(sessions_mod.COOKIE, path="/")
        return response

    # ------------------------------------------------------------ pages
    async def tasks_page(request: Request) -> Response:
        snap = await hub.current("tasks")
        return page(request, "tasks.html", {"snap": snap, "live": "/live/tasks"})

    async def task_page(request: Request) -> Response:
        namespace, name = task_key(request)
        snap = await hub.current(subjects_mod.task_subject(namespace, name))
        done = request.query_params.get("done", "")
        return page(
            request,
            "task.html",
            {
                "snap": snap,
                "live": f"/live/tasks/{namespace}/{name}",
                "plot_json": _script_json(snap.get("plot")),
                "fplot_json": _script_json(snap.get("federated_plot")),
                "done": rollout_controls.PAST.get(done, ""),
            },
        )

    async def aggregate_page(request: Request) -> Response:
        namespace, name = task_key(request)
        snap = await hub.current(subjects_mod.task_subject(namespace, name))
        return page(request, "aggregate.html", {"snap": snap, "live": f"/live/tasks/{namespace}/{name}"})

    async def fleet_page(request: Request) -> Response:
        text = request.query_params.get("filter", "")
        try:
            target = views.parse_filter(text)
            problem = ""
        except errors.InvalidSpec as e:
            target, problem = views.parse_filter(""), str(e)
        snap = await hub.current("fleet")
        rows = views.device_rows(snap.get("devices") or [], target=target, now=time.time())
        live = "/live/fleet" + (f"?filter={urllib.parse.quote(text)}" if text and not problem else "")
        return page(
            request,
            "fleet.html",
            {"snap": snap, "rows": rows, "filter": text, "problem": problem, "live": live},
            status_code=400 if problem else 200,
        )

    # ------------------------------------------------------------ controls
    async def confirm_page(request: Request) -> Response:
        namespace, name = task_key(request)
        action = _action(request, allow_controls)
        return page(request, "confirm.html", {"namespace": namespace, "name": name, "action": action})

    async def control(request: Request) -> Response:
        namespace, name = task_key(request)
        action = _action(request, allow_controls)
        sid = viewer(request)
        form = await request.form()
        if sid != "bearer" and not (sid and sessions.csrf_ok(sid, str(form.get("csrf") or ""))):
            return page(
                request,
                "error.html",
                {"title": "Refused", "message": "csrf: the form's token is missing or stale; open the page again"},
                status_code=403,
            )
        user_token = user_tokens[sid][0] if auth == "kubernetes" and sid in user_tokens else None
        await source.control(action, namespace, name, user_token=user_token)
        return RedirectResponse(f"/tasks/{namespace}/{name}?done={action}", status_code=303)

    # ------------------------------------------------------------ live updates
    def fragments_for(kind: str, snap: dict[str, Any], request: Request) -> dict[str, Any]:
        if "error" in snap:
            return {"fragments": {"live-status": render("upstream_error", snap["error"])}}
        out: dict[str, Any] = {"fragments": {"live-status": render("upstream_ok", time.strftime("%H:%M:%S"))}}
        if kind == "tasks":
            out["fragments"]["tasks"] = render("tasks_table", snap["rows"])
        elif kind == "task":
            out["fragments"].update(
                summary=render("task_summary", snap),
                stages=render("stages_table", snap["stages"]),
                events=render("events_table", snap["events"]),
                federated=render("federated_part", snap["federated"]),
                aggregate=render("aggregate_table", snap["aggregate"], snap["aggregate_round"]),
            )
            out["plot"] = snap["plot"]
            out["fplot"] = snap["federated_plot"]
        else:
            target = views.parse_filter(request.query_params.get("filter", ""))
            rows = views.device_rows(snap.get("devices") or [], target=target, now=time.time())
            out["fragments"]["devices"] = render("devices_table", rows)
        return out

    def live(kind: str, subject_of: Callable[[Request], str]) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            subject = subject_of(request)
            if kind == "fleet":
                views.parse_filter(request.query_params.get("filter", ""))  # refused before the stream opens

            async def stream() -> AsyncIterator[str]:
                async with hub.subscribe(subject) as queue:
                    yield "retry: 3000\n\n"
                    while True:
                        try:
                            snap = await asyncio.wait_for(queue.get(), timeout=HEARTBEAT_S)
                        except TimeoutError:
                            yield ": heartbeat\n\n"
                            continue
                        yield f"data: {json.dumps(fragments_for(kind, snap, request))}\n\n"

            headers = {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}
            return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

        return handler

    def task_subject_of(request: Request) -> str:
        return subjects_mod.task_subject(*task_key(request))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_startup is not None:
            await on_startup()
        try:
            yield
        finally:
            await hub.close()
            if on_shutdown is not None:
                await on_shutdown()

    routes = [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/", guarded(tasks_page)),
        Route("/fleet", guarded(fleet_page)),
        Route("/tasks/{namespace}/{name}", guarded(task_page)),
        Route("/tasks/{namespace}/{name}/aggregate", guarded(aggregate_page)),
        Route("/tasks/{namespace}/{name}/control/{action}", guarded(confirm_page), methods=["GET"]),
        Route("/tasks/{namespace}/{name}/control/{action}", guarded(control), methods=["POST"]),
        Route("/live/tasks", guarded(live("tasks", lambda r: "tasks"))),
        Route("/live/tasks/{namespace}/{name}", guarded(live("task", task_subject_of))),
        Route("/live/fleet", guarded(live("fleet", lambda r: "fleet"))),
        Mount("/static", app=StaticFiles(directory=str(PACKAGE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.hub = hub
    return app


def _action(request: Request, allowed: bool) -> str:
    if not allowed:
        raise errors.PermissionDenied("rollout controls are off on this dashboard (--allow-controls turns them on)")
    action = str(request.path_params["action"])
    if action not in rollout_controls.ACTIONS:
        raise errors.NotFound(f"action: {errors.excerpt(action)} is not one of {', '.join(rollout_controls.ACTIONS)}")
    return action


def _safe_next(target: str | None) -> str:
    """Only a path of this site (no scheme, no host, no `//`) is a place to go after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _script_json(value: Any) -> str:
    """JSON safe inside a <script type="application/json"> element (no `</script>`, no `<!--`)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
