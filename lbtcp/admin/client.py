"""A small client of the admin HTTP API, for ``lbtcp status|drain|enable|disable|weight``.

Theory of operation: one ``AdminClient`` holds one keep-alive ``http.client`` connection (the
stdlib is enough for a handful of JSON requests to 127.0.0.1). Every way a request can go wrong
(refused, timed out, reset, a 401/404/5xx, a body that is not JSON) becomes one ``AdminError``
whose message is a single line fit for an operator, so that the command line prints it and
exits 1 instead of showing a traceback. The server's own JSON ``{"error": ...}`` text is kept
in the message: it names the unknown pool or server better than the client could.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from lbtcp.addresses import Endpoint
from lbtcp.config import AdminConfig

DEFAULT_ADMIN = Endpoint("127.0.0.1", 9900)
DEFAULT_TIMEOUT = 5.0
ACTIONS = ("drain", "enable", "disable")
# A /status document of 1,000 servers is well under 1 MiB; this bound only stops a wrong peer
# (something else listening on the port) from filling the memory.
MAX_BODY = 64 * 1024 * 1024

TOKEN_HINT = "give the token with --token, LBTCP_ADMIN_TOKEN or -c CONFIG"


class AdminError(Exception):
    """A request to the admin API failed; ``str()`` is one line saying what and why.

    ``status`` is the HTTP status when the server answered, else 0.
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def connect_target(endpoint: Endpoint) -> Endpoint:
    """Where to connect to reach an admin server listening on ``endpoint``: a wildcard listen
    address (``0.0.0.0``, ``::``) is reached through the loopback of the same family."""
    if endpoint.host in ("0.0.0.0", ""):
        return Endpoint("127.0.0.1", endpoint.port)
    if endpoint.host == "::":
        return Endpoint("::1", endpoint.port)
    return endpoint


def choose_target(
    admin: Endpoint | None,
    settings: AdminConfig | None,
    token_option: str | None,
    environ: Mapping[str, str],
) -> tuple[Endpoint, str]:
    """The admin address and token, by DESIGN.md section 1's precedence.

    Address: ``--admin``, else the config's ``[admin] listen`` (``settings``, given with
    ``-c``), else 127.0.0.1:9900. Token: ``--token``, else ``LBTCP_ADMIN_TOKEN`` (an empty
    variable counts as unset), else the config's token (``token`` or ``token_file``, already
    read by the config loader).
    """
    endpoint = admin or (settings.listen if settings is not None else DEFAULT_ADMIN)
    if endpoint.port == 0:
        raise AdminError(
            "the config's [admin] listen has port 0 (a port picked at start):"
            " give the address with --admin HOST:PORT"
        )
    if token_option is not None:
        token = token_option
    elif environ.get("LBTCP_ADMIN_TOKEN"):
        token = environ["LBTCP_ADMIN_TOKEN"]
    else:
        token = settings.token if settings is not None else ""
    return connect_target(endpoint), check_token(token)


def find_server(document: Mapping[str, Any], pool: str, server: str) -> Mapping[str, Any] | None:
    """The server's entry in a /status document, or None."""
    for entry in document.get("pools") or ():
        if isinstance(entry, Mapping) and entry.get("name") == pool:
            for candidate in entry.get("servers") or ():
                if isinstance(candidate, Mapping) and candidate.get("name") == server:
                    return candidate
    return None


# What each action means for the server's sessions, said once after the change.
_CONSEQUENCE = {
    "drain": "no new sessions, live ones go on, probes go on",
    "disable": "out of rotation and not probed, live sessions go on",
    "enable": "back in rotation as its health allows",
}


def describe_change(
    pool: str,
    server: str,
    action: str,
    before: Mapping[str, Any] | None,
    after: object,
) -> str:
    """The one line ``lbtcp drain|enable|disable|weight`` prints.

    ``before`` is the server's /status entry read just before the request (None when that
    read failed: the line then has no "was"); ``after`` is the POST's answer, ``{"pool",
    "server", "state", "weight"}``.
    """
    name = f"{pool}/{server}"
    answer = after if isinstance(after, Mapping) else {}
    state = answer.get("state")
    state = printable(state) if isinstance(state, str) else None
    weight = answer.get("weight")
    old_state = before.get("state") if before is not None else None
    old_state = printable(old_state) if isinstance(old_state, str) else None
    old_weight = before.get("weight") if before is not None else None
    active = before.get("active") if before is not None else None
    if action == "weight":
        if not isinstance(weight, int):
            return f"{name}: weight set"
        if old_weight == weight:
            return f"{name}: weight already {weight}, unchanged"
        was = f"{old_weight} -> " if isinstance(old_weight, int) else ""
        tail = f" (state {state})" if isinstance(state, str) else ""
        return f"{name}: weight {was}{weight}{tail}"
    if not isinstance(state, str):
        return f"{name}: {action} done"
    if old_state == state:
        return f"{name}: already {state}, unchanged"
    was = f" (was {old_state})" if isinstance(old_state, str) else ""
    line = f"{name}: {state}{was}: {_CONSEQUENCE.get(action, action)}"
    if action in ("drain", "disable") and isinstance(active, int) and active:
        line += f"; {active} live session{'s' if active != 1 else ''} now"
    return line


def check_token(token: str) -> str:
    """The token as it goes into the header, or AdminError if it cannot go into one.

    Surrounding whitespace is dropped: a token read from a file or pasted from a terminal
    often ends in a newline that is not part of it.
    """
    token = token.strip()
    if not all(" " < char <= "~" for char in token):
        raise AdminError("the admin token holds characters that cannot go in an HTTP header")
    return token


def printable(text: str) -> str:
    """``text`` with every non-printable character (newlines, escape sequences) shown as
    ``?``: what the admin API sends is printed on an operator's terminal, where a stray
    escape sequence could rewrite the screen and a newline would break one-line output."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else "?" for char in text)


def _error_text(body: bytes) -> str:
    """The ``error`` member of a JSON error body, else the body's first line (bounded)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep for the parser
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return printable(" ".join(data["error"].split()))
    text = body.decode("utf-8", "replace").strip()
    first = text.splitlines()[0] if text else ""
    return printable(first[:200])


class AdminClient:
    """Requests to one admin server; one connection, reopened when the server closed it."""

    def __init__(
        self, endpoint: Endpoint, token: str = "", timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.endpoint = connect_target(endpoint)
        self.token = check_token(token)
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the API ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``GET /status``: the document (README "Admin API")."""
        document = self._request("GET", "/status")
        if not isinstance(document, dict):
            raise AdminError(f"{self._where()}: GET /status did not answer a JSON object")
        return document

    def server_action(self, pool: str, server: str, action: str) -> Any:
        """``POST /pools/{pool}/servers/{server}/{action}``, action one of ``ACTIONS``."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        return self._request("POST", self._server_path(pool, server, action), {})

    def set_weight(self, pool: str, server: str, weight: int) -> Any:
        """``POST .../weight`` with ``{"weight": N}``."""
        return self._request("POST", self._server_path(pool, server, "weight"), {"weight": weight})

    def reload(self) -> dict[str, Any]:
        """``POST /reload``: the result document (``ok``, ``summary``, ``errors``, ...). A 400
        (the new config is invalid) is a result too, not an ``AdminError``."""
        document = self._request("POST", "/reload", {}, results=(400,))
        if not isinstance(document, dict) or "ok" not in document:
            raise AdminError(f"{self._where()}: POST /reload did not answer a reload result")
        return document

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _server_path(pool: str, server: str, action: str) -> str:
        # Server names default to their address ("10.0.0.5:9001", "[fd00::5]:9001"): quote
        # every reserved character so that a name is always exactly one path segment.
        return f"/pools/{quote(pool, safe='')}/servers/{quote(server, safe='')}/{action}"

    def _where(self) -> str:
        return f"the admin API at {self.endpoint}"

    def _request(
        self, method: str, path: str, body: Any = None, results: tuple[int, ...] = ()
    ) -> Any:
        """The JSON answer; AdminError for an HTTP error, unless its status is in
        ``results`` (an answer that carries a result, such as /reload's 400)."""
        payload = b"" if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json", "Host": str(self.endpoint)}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            status, reason, data = self._exchange(method, path, payload, headers)
        except AdminError:
            self.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise AdminError(f"cannot reach {self._where()}: {self._describe(exc)}") from None
        if status >= 400 and status not in results:
            raise self._http_error(method, path, status, reason, data)
        if not data:
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError):
            raise AdminError(
                f"{self._where()} answered {method} {path} with a body that is not JSON"
                " (is something else listening on that port?)",
                status,
            ) from None

    def _exchange(
        self, method: str, path: str, payload: bytes, headers: dict[str, str]
    ) -> tuple[int, str, bytes]:
        """One request and its whole answer. A kept-alive connection that the server closed
        in between (its idle timeout) fails at once: that one case is retried once on a new
        connection. Retrying a POST is safe: every action sets a state or a weight, so doing
        it twice is doing it once."""
        for attempt in (1, 2):
            fresh = self._conn is None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    self.endpoint.host, self.endpoint.port, timeout=self.timeout
                )
            conn = self._conn
            try:
                conn.request(method, path, body=payload or None, headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh or attempt == 2:
                    raise
                continue
            data = response.read(MAX_BODY + 1)
            if len(data) > MAX_BODY:
                raise AdminError(f"{self._where()} sent an answer larger than 64 MiB")
            if response.will_close:
                self.close()
            return response.status, response.reason, data
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused (is lbtcp serve running with an [admin] table?)"
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g}s"
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve {self.endpoint.host!r}: {exc.strerror}"
        if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
            return "the connection was closed before an answer came"
        if isinstance(exc, http.client.HTTPException):
            return f"not a valid HTTP answer ({type(exc).__name__})"
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror.lower()
        return str(exc) or type(exc).__name__

    def _http_error(
        self, method: str, path: str, status: int, reason: str, data: bytes
    ) -> AdminError:
        detail = _error_text(data)
        if status == 401:
            hint = "the token was refused" if self.token else "a token is needed"
            message = f"{self._where()} refused {method} {path}: {hint} (401)"
            if detail:
                message += f": {detail}"
            if not self.token:
                message += f"; {TOKEN_HINT}"
            return AdminError(message, status)
        if status == 404 and detail:
            # The server names what it did not find ("no server 'x' in pool 'app'").
            return AdminError(f"{detail} (404)", status)
        message = f"{self._where()} answered {method} {path} with {status} {reason}".rstrip()
        if detail:
            message += f": {detail}"
        return AdminError(message, status)


def apply_change(client: AdminClient, pool: str, server: str, action: str, weight: int = 0) -> str:
    """Run one of ``drain``, ``enable``, ``disable`` or ``weight`` and return the line saying
    what changed; AdminError when it could not be done.

    The server's entry is read from /status first, only to say what it was before. When that
    read gets no answer at all the admin API is unreachable and the change is not tried (one
    timeout is enough to wait); when it gets an HTTP error the change is still tried, since
    the POST's own error (the 404 naming the unknown server, the 401) says more.
    """
    before: Mapping[str, Any] | None = None
    try:
        before = find_server(client.status(), pool, server)
    except AdminError as exc:
        if exc.status == 0:
            raise
    if action == "weight":
        answer = client.set_weight(pool, server, weight)
    else:
        answer = client.server_action(pool, server, action)
    return describe_change(pool, server, action, before, answer)
