"""How evenly do N accepting processes share connections on Linux? (issue 10, item 1)

Two ways for ``workers > 1`` to accept on one address: (a) every worker accepts on the one
listening socket the parent bound and the workers inherited by fork; (b) each worker has its
own socket on the address with ``SO_REUSEPORT`` (the kernel hashes each new connection's
4-tuple to one of them). This forks ``--workers`` uvloop processes that run an asyncio server
the way lbtcp's listener does, opens ``--connections`` connections from 127.0.0.1 (``--parallel``
at a time, each sends one byte and waits for the one-byte reply naming the process that served
it), and prints each process's share for both ways, interleaved ``--rounds`` times.

Bounded: at most rounds * 2 * connections connections, each waited for at most 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time


def listening_socket(port: int, reuseport: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Answer(asyncio.Protocol):
    def __init__(self, index: int) -> None:
        self.index = index
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(bytes([self.index]))
            self.transport.close()


def child(index: int, sock: socket.socket, ready: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: Answer(index), sock=sock)
        os.write(ready, b"r")
        await asyncio.Event().wait()

    uvloop.run(main())


async def load(port: int, connections: int, parallel: int, workers: int) -> list[int]:
    counts = [0] * workers
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            writer.write(b"x")
            answer = await asyncio.wait_for(reader.read(1), 5)
            counts[answer[0]] += 1
            writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts


def run_way(reuseport: bool, workers: int, connections: int, parallel: int) -> list[int]:
    first = listening_socket(0, reuseport)
    port = first.getsockname()[1]
    socks = [first] + [
        listening_socket(port, True) if reuseport else first for _ in range(workers - 1)
    ]
    ready_r, ready_w = os.pipe()
    pids = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                child(index, socks[index], ready_w)
            finally:
                os._exit(0)
        pids.append(pid)
    for sock in set(socks):
        sock.close()
    for _ in range(workers):
        os.read(ready_r, 1)
    try:
        return asyncio.run(load(port, connections, parallel, workers))
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        for way, reuseport in (("inherited", False), ("reuseport", True)):
            started = time.monotonic()
            counts = run_way(reuseport, args.workers, args.connections, args.parallel)
            shares = [round(100 * c / args.connections, 1) for c in counts]
            rows.append({"round": round_, "way": way, "counts": counts, "shares": shares})
            print(
                f"round {round_} {way:9s} counts={counts} shares%={shares} "
                f"min={min(shares)}% ({time.monotonic() - started:.1f}s)",
                flush=True,
            )
    print(f"load average: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "loadavg": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
