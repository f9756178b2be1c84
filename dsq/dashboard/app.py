"""The dashboard's Starlette application: read-only pages and their JSON, behind an optional token.

Routes (all GET): ``/`` the queue, ``/jobs/{id}``, ``/jobs/{id}/images/{index}`` (``?answers=K``: a certify-api
image's stored answers from query K on) and its preview ``.../preview.png``, ``/experiments/{name}``; JSON
``/api/queue`` (the live poll), ``/api/jobs``, ``/api/jobs/{id}``, ``/api/jobs/{id}/images/{index}``,
``/api/experiments/{name}``; ``/static/...``.

With a token, every request needs it: ``Authorization: Bearer TOKEN``, the cookie a ``?token=TOKEN`` link sets, or
401. Tokens are compared in constant time. A job, image or experiment that does not exist is a 404 page (or JSON
under ``/api``), never a traceback.
"""

from __future__ import annotations

import hmac
import json
from datetime import timedelta
from typing import Callable
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from dsq.dashboard import pages, render
from dsq.db.models import utcnow
from dsq.db.session import session_scope
from dsq.errors import DsqError, InvalidArgument
from dsq.report import intervals

COOKIE = "dsq_token"
POLL_SECONDS = 2


def create_app(engine, stale_after: timedelta, *, token: str | None = None) -> Starlette:
    """The dashboard over ``engine`` (read-only use); ``stale_after`` as the CLI's settings say."""
    from dsq import bounds  # noqa: F401  (scipy.special, half a second: at start, not on a first page's view)

    cache = pages.Cache()

    def read(function: Callable, *args, **kwargs):
        with session_scope(engine) as session:
            return function(session, *args, **kwargs)

    def html(template: str, **values) -> HTMLResponse:
        return HTMLResponse(render.page(template, **values))

    def home(request: Request):
        return html("queue.html", every=POLL_SECONDS, **read(pages.queue, utcnow(), stale_after))

    def queue_json(request: Request):
        return JSONResponse(read(pages.progress))

    def jobs_json(request: Request):
        return JSONResponse(read(pages.queue, utcnow(), stale_after)["jobs"])

    def job_page(request: Request):
        found = read(pages.job, _id(request, "job_id"), utcnow(), stale_after, linf=_flag(request, "linf"),
                     cache=cache)
        return html("job.html", **found)

    def job_json(request: Request):
        text = read(pages.job_json, _id(request, "job_id"), utcnow(), stale_after, cache=cache)
        return Response(text, media_type="application/json")

    def image_page(request: Request):
        return html("image.html", **read(pages.image, _id(request, "job_id"), _id(request, "index"),
                                         answers_from=_offset(request, "answers")))

    def image_json(request: Request):
        return _json(read(pages.image, _id(request, "job_id"), _id(request, "index"),
                          answers_from=_offset(request, "answers")))

    def preview_png(request: Request):
        return Response(read(pages.preview_png, _id(request, "job_id"), _id(request, "index")),
                        media_type="image/png")

    def image_form(request: Request):  # the job page's "image N" box
        job_id, index = _id(request, "job_id"), request.query_params.get("index", "").strip()
        if not index.isdigit():
            raise HTTPException(404, f"no image {index!r}: an image is a number >= 0")
        return RedirectResponse(f"/jobs/{job_id}/images/{int(index)}", 303)

    def experiment_page(request: Request):
        found = read(pages.experiment, request.path_params["name"], linf=_flag(request, "linf"),
                     ci=_ci(request), cache=cache)
        return html("experiment.html", **found)

    def experiment_json(request: Request):
        found = read(pages.experiment_json, request.path_params["name"], by_sigma=_flag(request, "by_sigma"),
                     ci=_ci(request), linf=_flag(request, "linf"), cache=cache)
        return _json(found)

    def static(request: Request):
        name = request.path_params["name"]
        paths = {"plotly.min.js": render.plotly_path(), "dashboard.js": render.dashboard_js_path()}
        if name not in paths:
            raise HTTPException(404, f"no file {name}")
        return FileResponse(paths[name], media_type="text/javascript")

    routes = [Route("/", home), Route("/api/queue", queue_json), Route("/api/jobs", jobs_json),
              Route("/api/jobs/{job_id}", job_json), Route("/api/experiments/{name:path}", experiment_json),
              Route("/jobs/{job_id}", job_page), Route("/jobs/{job_id}/images", image_form),
              Route("/jobs/{job_id}/images/{index}", image_page), Route("/api/jobs/{job_id}/images/{index}", image_json),
              Route("/jobs/{job_id}/images/{index}/preview.png", preview_png),
              Route("/experiments/{name:path}", experiment_page),
              Route("/static/{name}", static)]
    handlers = {DsqError: _not_found, HTTPException: _http_error, Exception: _server_error}
    middleware = [Middleware(TokenGuard, token=token)] if token else []
    return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)


def _id(request: Request, name: str) -> int:
    text = request.path_params[name]
    if not text.isdigit():
        raise InvalidArgument(f"{name.replace('_', ' ')} {text!r} is not a number")
    return int(text)


def _offset(request: Request, name: str) -> int:
    text = request.query_params.get(name, "0").strip() or "0"
    if not text.isdigit():
        raise InvalidArgument(f"{name} {text!r}: a number >= 0")
    return int(text)


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "0") not in ("", "0", "false", "no")


def _ci(request: Request) -> float | None:
    given = request.query_params.get("ci")
    if given in (None, "", "0"):
        return None
    try:
        return intervals.check_alpha(float(given))
    except ValueError:
        raise InvalidArgument(f"ci {given!r}: an alpha between 0 and 1, e.g. 0.05") from None


def _json(value) -> Response:
    """JSON as the CLI writes it (``json.dumps``), in one pass: an export of 10,000 images is megabytes."""
    return Response(json.dumps(value, default=str), media_type="application/json")


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _error(request: Request, status: int, reason: str, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return HTMLResponse(render.page("error.html", status=status, reason=reason, message=message),
                        status_code=status)


async def _not_found(request: Request, error: DsqError) -> Response:
    """A job, image or experiment that is not there, or a bad id: one line, 404."""
    return _error(request, 404, "not found", str(error).splitlines()[0] if str(error) else "not found")


async def _http_error(request: Request, error: HTTPException) -> Response:
    return _error(request, error.status_code, "not found" if error.status_code == 404 else "refused",
                  str(error.detail))


async def _server_error(request: Request, error: Exception) -> Response:
    return _error(request, 500, "server error", f"{type(error).__name__} (the dashboard's log says more)")


class TokenGuard:
    """Pure ASGI middleware: a request passes with the token (header, cookie, or ``?token=``, which sets the
    cookie and redirects to the same page without it); any other gets 401."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    def same(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = request.query_params.get("token")
        if self.same(given):
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), 303)
            response.set_cookie(COOKIE, self.token.decode(), httponly=True, samesite="strict")
            return await response(scope, receive, send)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header[:7].lower() == "bearer " else None
        if self.same(bearer) or self.same(request.cookies.get(COOKIE)):
            return await self.app(scope, receive, send)
        response = _error(request, 401, "unauthorized", "this dashboard needs its token: open the URL it printed "
                          "(?token=...) or send Authorization: Bearer TOKEN")
        response.headers["WWW-Authenticate"] = "Bearer"
        return await response(scope, receive, send)
