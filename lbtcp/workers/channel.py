"""One end of a parent/worker socketpair as an asyncio protocol (the thin I/O of ``ipc``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lbtcp.log import Log
from lbtcp.workers.ipc import Frame, FrameDecoder, IpcError, Kind, encode, encode_raw

# Beyond this many bytes waiting in the socketpair's write buffer, a sender drops what it
# would add (and counts it) rather than let the buffer grow: the data plane never waits on
# the control plane, and a stalled peer cannot make the other side hold unbounded memory.
WRITE_LIMIT = 4 * 1024 * 1024


class Channel(asyncio.Protocol):
    """Frames in, ``on_frame`` called for each; ``send`` frames out, never blocking."""

    def __init__(
        self,
        on_frame: Callable[[Frame], None],
        on_lost: Callable[[], None],
        log: Log,
        peer: str,
    ) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.log = log
        self.peer = peer
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.dropped = 0  # frames not sent because the write buffer was full
        self.closed = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop once the socketpair end is wrapped."""
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        """Called by the loop with bytes from the peer: whole frames go to ``on_frame``; a
        malformed frame is logged and dropped, and nothing raises out of here."""
        frames, errors = self.decoder.feed(data)
        for error in errors:
            self.log.event("ipc_error", f"message from {self.peer} dropped: {error}")
        for frame in frames:
            try:
                self.on_frame(frame)
            except (IpcError, TypeError, ValueError, KeyError, IndexError) as exc:
                self.log.event(
                    "ipc_error",
                    f"{frame.kind.name} message from {self.peer} dropped: {exc}",
                )
            except Exception as exc:  # a bug must not take either side down
                self.log.event(
                    "ipc_error", f"{frame.kind.name} from {self.peer}: internal error: {exc!r}"
                )

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the loop when the peer's end closed (it exited, or died)."""
        if self.decoder.pending:
            self.log.event("ipc_error", f"{self.peer} went away in the middle of a message")
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_lost()

    def send(self, kind: Kind, message: object) -> bool:
        return self.send_frame(encode(kind, message))

    def send_raw(self, kind: Kind, payload: bytes) -> bool:
        return self.send_frame(encode_raw(kind, payload))

    def send_frame(self, frame: bytes) -> bool:
        """Queue one encoded frame; False (counted) if the peer is gone or too far behind."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if transport.get_write_buffer_size() > WRITE_LIMIT:
            self.dropped += 1
            return False
        transport.write(frame)
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
