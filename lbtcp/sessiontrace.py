"""Per-session timestamps for finding where a session's time goes (a debugging aid).

With ``LBTCP_SESSION_TRACE=FILE`` in the environment of ``lbtcp serve``, the listeners build
``TracedSession`` / ``TracedUpstream`` instead of the plain protocols, and every finished
session appends one line to FILE::

    accept=<monotonic s> connect_start=+ms connect_done=+ms first_up=+ms first_down=+ms term=..

(times after ``accept``, -1 for what never happened). Without the variable nothing here is
imported and the release classes run unchanged, so the hot path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from time import monotonic
from typing import IO, TYPE_CHECKING

from lbtcp.relay import Session, UpstreamProtocol

if TYPE_CHECKING:
    from lbtcp.pool import Server

ENV = "LBTCP_SESSION_TRACE"

_out: IO[str] | None = None


def _sink() -> IO[str]:
    global _out
    if _out is None:
        # Line-buffered: a trace read while lbtcp runs has every finished session.
        _out = open(os.environ[ENV], "a", buffering=1)  # noqa: SIM115 - lives as the process
    return _out


class TracedSession(Session):
    """A ``Session`` that notes when each step of its life happened."""

    __slots__ = ("t_accept", "t_connect_done", "t_connect_start", "t_first_down", "t_first_up")

    def __init__(self, owner: object, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(owner, loop)  # type: ignore[arg-type]
        self.t_accept = -1.0
        self.t_connect_start = -1.0
        self.t_connect_done = -1.0
        self.t_first_up = -1.0
        self.t_first_down = -1.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop for an accepted client (as ``Session.connection_made``)."""
        self.t_accept = monotonic()
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Called by the loop with client bytes (as ``Session.data_received``)."""
        if self.t_first_up < 0:
            self.t_first_up = monotonic()
        super().data_received(data)

    def attach_upstream(self, transport: asyncio.Transport, server: Server) -> None:
        """Called by the connector once the server connection is up."""
        self.t_connect_done = monotonic()
        super().attach_upstream(transport, server)

    def trace_line(self) -> str:
        def rel(t: float) -> str:
            return f"{(t - self.t_accept) * 1000.0:.3f}" if t >= 0 else "-1"

        return (
            f"accept={self.t_accept:.6f} connect_start={rel(self.t_connect_start)} "
            f"connect_done={rel(self.t_connect_done)} first_up={rel(self.t_first_up)} "
            f"first_down={rel(self.t_first_down)} term={self.term}\n"
        )

    def _finish(self) -> None:
        was = self.finished
        super()._finish()
        if self.finished and not was:
            # A debugging aid must not end the process.
            with contextlib.suppress(OSError):
                _sink().write(self.trace_line())


class TracedUpstream(UpstreamProtocol):
    """An ``UpstreamProtocol`` that notes the connect start and the first server byte."""

    __slots__ = ()

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        if isinstance(session, TracedSession) and session.t_connect_start < 0:
            session.t_connect_start = monotonic()

    def data_received(self, data: bytes) -> None:
        """Called by the loop with server bytes (as ``UpstreamProtocol.data_received``)."""
        session = self.session
        if isinstance(session, TracedSession) and session.t_first_down < 0:
            session.t_first_down = monotonic()
        super().data_received(data)
