"""The admin API's routes: a parsed request in, a response out.

Theory of operation. ``server.py`` speaks HTTP (h11) and hands each complete request to
``Router.handle``, which never raises: every outcome is a ``Response``. The decisions are pure
functions, testable without sockets: ``match`` maps (method, path) to a route or to a 404/405,
``authorize`` checks the bearer token, ``parse_weight`` validates a weight body. Only the
handlers touch the runtime, through the few attributes and control methods it exposes.

Order of checks: the path shape (404) and the method (405) first, then the token (401), then
the handler (404 naming an unknown pool or server, 400 naming a bad body). The token is checked
before any pool or server name is looked up, so a caller without it learns nothing about the
topology from the 404s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from lbtcp.config import MAX_WEIGHT, AdminConfig
from lbtcp.health import AdminAction

if TYPE_CHECKING:  # the runtime imports this module (through server.py) at run time
    from lbtcp.runtime import Runtime

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
# Names echoed back in error messages are cut to this length: a hostile path is not reflected
# whole.
MAX_ECHO = 120


@dataclass(frozen=True, slots=True)
class Request:
    """One complete HTTP request as the admin server received it."""

    method: str
    target: str  # the request target as sent, e.g. "/status?x=1"
    headers: tuple[tuple[bytes, bytes], ...] = ()  # lower-case names, as h11 gives them
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # answer with "Connection: close" and end the connection


# What a handler gives the server: a response now, or one later (POST /reload awaits the
# runtime's reload; the connection answers when the future is done).
Answer = Response | asyncio.Future[Response]


def json_response(status: int, document: object) -> Response:
    return Response(status, json.dumps(document, allow_nan=False).encode() + b"\n")


def error(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = (), close: bool = False
) -> Response:
    """Every error the admin API gives: a JSON body ``{"error": "..."}``."""
    body = json.dumps({"error": message}).encode() + b"\n"
    return Response(status, body, JSON, headers, close)


def _echo(text: str) -> str:
    """``text`` quoted for an error message, cut to ``MAX_ECHO`` characters."""
    return repr(text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "...")


# --- matching (pure) ---------------------------------------------------------------------


class Endpoint(str, Enum):
    PAGE = "page"
    STATUS = "status"
    METRICS = "metrics"
    HEALTHZ = "healthz"
    SERVER_ACTION = "server_action"
    RELOAD = "reload"


SERVER_ACTIONS = ("drain", "enable", "disable", "weight")
GET_ALLOW = "GET, HEAD"
POST_ALLOW = "POST"

_GET_PATHS = {
    "/": Endpoint.PAGE,
    "/status": Endpoint.STATUS,
    "/metrics": Endpoint.METRICS,
    "/healthz": Endpoint.HEALTHZ,
}


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: Endpoint
    params: tuple[str, ...] = ()  # (pool, server, action) for SERVER_ACTION

    @property
    def is_write(self) -> bool:
        return self.endpoint is Endpoint.SERVER_ACTION or self.endpoint is Endpoint.RELOAD


def split_target(target: str) -> str | None:
    """The path of an origin-form target (the query is dropped), or None if the target is
    not origin-form (``*``, ``http://host/...``)."""
    if not target.startswith("/"):
        return None
    return target.split("?", 1)[0].split("#", 1)[0]


def match(method: str, path: str) -> Route | Response:
    """The route for ``method`` and ``path``, or the 404/405 response."""
    shown = method[:MAX_ECHO]  # a method is any HTTP token, up to the 16 KiB head
    endpoint = _GET_PATHS.get(path)
    if endpoint is not None:
        if method in ("GET", "HEAD"):
            return Route(endpoint)
        return error(405, f"{shown} is not allowed on {path}", (("Allow", GET_ALLOW),))
    parts = path.split("/")
    # "", "pools", POOL, "servers", SERVER, ACTION
    if len(parts) == 6 and parts[0] == "" and parts[1] == "pools" and parts[3] == "servers":
        # Each segment is decoded on its own, so that an encoded "/" stays inside its name.
        pool, server, action = (unquote(parts[i], errors="replace") for i in (2, 4, 5))
        if not pool or not server:
            return error(404, f"no such path {_echo(path)}: the pool or server name is empty")
        if action not in SERVER_ACTIONS:
            return error(
                404,
                f"no such action {_echo(action)} (actions: {', '.join(SERVER_ACTIONS)})",
            )
        if method != "POST":
            return error(405, f"{shown} is not allowed on {_echo(path)}", (("Allow", POST_ALLOW),))
        return Route(Endpoint.SERVER_ACTION, (pool, server, action))
    if path == "/reload":
        if method != "POST":
            return error(405, f"{method} is not allowed on /reload", (("Allow", POST_ALLOW),))
        return Route(Endpoint.RELOAD)
    return error(404, f"no such path {_echo(path)}")


# --- auth (pure) -------------------------------------------------------------------------

_CHALLENGE = 'Bearer realm="lbtcp"'


def authorize(request: Request, route: Route, config: AdminConfig) -> Response | None:
    """None if the request may go on, else the 401. Writes always need the token when one is
    set; reads need it with ``auth_reads``."""
    token = config.token
    if not token or not (route.is_write or config.auth_reads):
        return None
    if route.endpoint is Endpoint.PAGE:
        # The page holds no data (it reads /status, which does need the token) and a browser
        # cannot send a Bearer header when it opens a page: it takes the token from #token=.
        return None
    value = request.header(b"authorization")
    if value is None:
        return error(401, "this endpoint needs 'Authorization: Bearer <token>'", _challenge(""))
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not credentials.strip():
        return error(401, "the Authorization header is not 'Bearer <token>'", _challenge(""))
    # Constant time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.strip(), token.encode()):
        return error(401, "wrong token", _challenge("invalid_token"))
    return None


def _challenge(code: str) -> tuple[tuple[str, str], ...]:
    value = f'{_CHALLENGE}, error="{code}"' if code else _CHALLENGE
    return (("WWW-Authenticate", value),)


# --- bodies (pure) -----------------------------------------------------------------------


def parse_weight(body: bytes) -> int | str:
    """The weight of a ``{"weight": N}`` body, or a message saying what is wrong with it."""
    if not body.strip():
        return 'the body is empty; send {"weight": N} with N in 0..256'
    try:
        document: Any = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return f"the body is not JSON: {str(exc)[:MAX_ECHO]}"
    if not isinstance(document, dict):
        return f'the body must be a JSON object {{"weight": N}}, not {type(document).__name__}'
    unknown = sorted(key for key in document if key != "weight")
    if unknown:
        return f"unknown key {_echo(unknown[0])} in the body; only 'weight' is allowed"
    if "weight" not in document:
        return 'the body has no "weight"'
    weight = document["weight"]
    if isinstance(weight, float) and math.isfinite(weight) and weight.is_integer():
        weight = int(weight)  # 3.0 is a whole number; 3.5 is not
    if isinstance(weight, bool) or not isinstance(weight, int):
        return f"weight must be a whole number in 0..{MAX_WEIGHT}, got {_echo(repr(weight))}"
    if not 0 <= weight <= MAX_WEIGHT:
        return f"weight {weight} is out of range (0..{MAX_WEIGHT})"
    return weight


# --- handlers ----------------------------------------------------------------------------

PAGE_RESOURCE = "page.html"


def _read_page() -> bytes | None:
    try:
        return resources.files("lbtcp.admin").joinpath(PAGE_RESOURCE).read_bytes()
    except OSError:
        return None


class Router:
    """Answers the admin API's requests for one runtime."""

    def __init__(
        self,
        runtime: Runtime,
        config: AdminConfig,
        on_error: Callable[[str, BaseException], None] | None = None,
        page: Callable[[], bytes | None] = _read_page,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.on_error = on_error
        self._page = page

    def handle(self, request: Request) -> Answer:
        """The response to ``request``, or for ``POST /reload`` a future of it (the server
        answers when it is done). Never raises: a handler's bug is a 500 (and logged)."""
        path = split_target(request.target)
        if path is None:
            return error(400, "the request target must be a path such as /status")
        route = match(request.method, path)
        if isinstance(route, Response):
            return route
        denied = authorize(request, route, self.config)
        if denied is not None:
            return denied
        try:
            return self._dispatch(request, route)
        except Exception as exc:
            if self.on_error is not None:
                self.on_error(f"{request.method} {path}", exc)
            return error(500, f"internal error: {type(exc).__name__}")

    def _dispatch(self, request: Request, route: Route) -> Answer:
        endpoint = route.endpoint
        if endpoint is Endpoint.RELOAD:
            return asyncio.ensure_future(self._reload())
        if endpoint is Endpoint.HEALTHZ:
            if self.runtime.draining:
                return Response(503, b"draining\n", TEXT)
            return Response(200, b"ok\n", TEXT)
        if endpoint is Endpoint.STATUS:
            return json_response(200, _status_document(self.runtime))
        if endpoint is Endpoint.METRICS:
            accept = (request.header(b"accept") or b"").decode("latin-1")
            body, content_type = _render_metrics(self.runtime, accept)
            return Response(200, body, content_type)
        if endpoint is Endpoint.PAGE:
            page = self._page()
            if page is None:
                return error(404, "the status page is not installed (lbtcp/admin/page.html)")
            return Response(200, page, HTML)
        return self._server_action(request, *route.params)

    async def _reload(self) -> Response:
        """``POST /reload``: as SIGHUP. 200 with what changed, or 400 with every error (the
        running configuration is then untouched)."""
        try:
            result = await self.runtime.reload()
        except Exception as exc:  # Runtime.reload never raises; a bug is still only a 500
            if self.on_error is not None:
                self.on_error("POST /reload", exc)
            return error(500, f"internal error: {type(exc).__name__}")
        document = result.to_dict()
        if result.ok:
            return json_response(200, document)
        count = len(result.errors)
        document["error"] = (
            f"the new config was not applied: {count} error(s); the running one is unchanged"
        )
        return json_response(400, document)

    def _server_action(self, request: Request, pool_name: str, name: str, action: str) -> Response:
        pool = self.runtime.pools.get(pool_name)
        if pool is None:
            known = ", ".join(sorted(self.runtime.pools)) or "none"
            return error(404, f"no pool named {_echo(pool_name)} (pools: {known})")
        server = pool.servers.get(name)
        if server is None:
            return error(404, f"pool {_echo(pool_name)} has no server named {_echo(name)}")
        if action == "weight":
            weight = parse_weight(request.body)
            if isinstance(weight, str):
                return error(400, weight)
            self.runtime.server_weight(pool_name, name, weight)
        else:
            self.runtime.server_admin(pool_name, name, AdminAction(action))
        return json_response(
            200,
            {
                "pool": pool_name,
                "server": name,
                "state": pool.health.state(name).value,
                "weight": server.weight,
            },
        )


# The /status document and /metrics are built by their own modules; imported on first use,
# which keeps prometheus_client out of the import of the runtime.
def _status_document(runtime: Runtime) -> Mapping[str, object]:
    from lbtcp.admin.status import status_document

    return status_document(runtime)


def _render_metrics(runtime: Runtime, accept: str) -> tuple[bytes, str]:
    from lbtcp.metrics import render

    return render(runtime, accept)
