"""The test helpers' own promises: ``Backends.close()`` closes every server connection,
whatever protocol served it. A connection it left open was collected later, inside some other
test, which then failed with "unclosed transport" (a ResourceWarning, an error under pytest);
a full run saw it in test_e2e_proxy.py::test_haproxy_on_both_sides."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket

from tests.proxy_support import Recorder
from tests.support import Backends, wait_until


def test_backends_close_closes_recording_and_streams_connections() -> None:
    backends = Backends()
    received: list[bytearray] = []
    recorders: list[Recorder] = []

    def recorder(_box: list[int]) -> Recorder:
        recorders.append(Recorder(received))
        return recorders[-1]

    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client's EOF, which never comes: close() must end it

    ports = [backends.start(recorder), backends.stream(hold), backends.echo()]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for port in ports]
    try:
        clients[2].sendall(b"x")
        assert clients[2].recv(1) == b"x"
        wait_until(lambda: len(recorders) == 1 and len(writers) == 1, what="both accepted")
        transports = [recorders[0].transport, writers[0].transport, *backends.transports]
        backends.close()
        assert all(t is not None and t.is_closing() for t in transports), transports
        assert not backends.transports
        for client in clients:  # what a client notices: its server connection is gone
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""
        transports.clear()
        recorders.clear()
        writers.clear()
        gc.collect()  # an unclosed transport would warn here (an error under pytest)
    finally:
        for client in clients:
            client.close()
