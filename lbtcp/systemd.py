"""systemd integration without libsystemd: sd_notify, the watchdog, socket activation.

Theory of operation. systemd's notify protocol is one datagram per message on the
``AF_UNIX``/``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name
written with a leading ``@``), holding newline-separated ``KEY=VALUE`` assignments. lbtcp sends
``READY=1`` once it serves, ``RELOADING=1`` with ``MONOTONIC_USEC`` when a reload starts (and
``READY=1`` when it ends), ``STOPPING=1`` on SIGTERM, ``STATUS=...`` with live counts, and
``WATCHDOG=1`` from a timer on the event loop at half of ``$WATCHDOG_USEC``: a loop that is
stuck (or a stopped process) stops the pings, and systemd restarts the service. Sending never
blocks and never raises: a service manager that went away must not stop the data plane.

Socket activation: systemd passes listening sockets as file descriptors 3, 4, ... with
``$LISTEN_FDS`` (how many), ``$LISTEN_PID`` (for whom) and ``$LISTEN_FDNAMES`` (colon-separated
names, from ``FileDescriptorName=``; "unknown" when absent). ``parse_listen_fds`` is the pure
part; ``bind = "fd:NAME"`` takes the sockets passed under NAME.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Mapping

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
DEFAULT_FD_NAME = "unknown"  # what systemd calls a socket without FileDescriptorName=


class ListenFdsError(ValueError):
    """$LISTEN_FDS and friends are inconsistent."""


def parse_listen_fds(env: Mapping[str, str], pid: int) -> dict[str, list[int]]:
    """The sockets systemd passed to process ``pid``: name -> file descriptors, in order.

    Empty when nothing was passed, or when it was passed to another process (``LISTEN_PID``
    names the parent that exec'd us through a wrapper: the fds are not ours to use).
    Raises ``ListenFdsError`` for malformed values.
    """
    raw_count = env.get("LISTEN_FDS", "")
    if not raw_count:
        return {}
    raw_pid = env.get("LISTEN_PID", "")
    if raw_pid:
        if not raw_pid.isdigit():
            raise ListenFdsError(f"LISTEN_PID={raw_pid!r} is not a process id")
        if int(raw_pid) != pid:
            return {}
    if not raw_count.isdigit():
        raise ListenFdsError(f"LISTEN_FDS={raw_count!r} is not a count")
    count = int(raw_count)
    if count > 65536:
        raise ListenFdsError(f"LISTEN_FDS={count} is not a plausible count")
    raw_names = env.get("LISTEN_FDNAMES")
    names = raw_names.split(":") if raw_names else [DEFAULT_FD_NAME] * count
    if len(names) != count:
        raise ListenFdsError(
            f"LISTEN_FDNAMES has {len(names)} name(s) for LISTEN_FDS={count} descriptor(s)"
        )
    fds: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        fds.setdefault(name or DEFAULT_FD_NAME, []).append(LISTEN_FDS_START + index)
    return fds


def take_listen_fds(environ: dict[str, str] | None = None) -> dict[str, list[socket.socket]]:
    """The passed sockets as socket objects (close-on-exec), and the variables removed from
    the environment so that nothing started later believes they are its own."""
    env = os.environ if environ is None else environ
    fds = parse_listen_fds(env, os.getpid())
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)
    sockets: dict[str, list[socket.socket]] = {}
    for name, numbers in fds.items():
        for fd in numbers:
            os.set_inheritable(fd, False)
            sockets.setdefault(name, []).append(socket.socket(fileno=fd))
    return sockets


def check_listening(sock: socket.socket, name: str) -> None:
    """``OSError`` unless ``sock`` is a listening TCP socket (what ``bind = "fd:NAME"`` needs)."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"fd:{name}: descriptor {sock.fileno()} is not a TCP socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(f"fd:{name}: descriptor {sock.fileno()} is not listening")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when the
    watchdog is off or meant for another process (``WATCHDOG_PID``)."""
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid and (not raw_pid.isdigit() or int(raw_pid) != pid):
        return None
    return int(raw) / 1e6 / 2


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as ``RELOADING=1`` wants it in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify_address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address: a path, or an abstract name ('@' -> NUL)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and relative paths are not spoken here


class Notifier:
    """Sends notify messages to the service manager; does nothing when there is none."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = notify_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog = watchdog_interval(env, os.getpid())
        self.sent = 0
        self.failures = 0
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        if self.address is not None:
            # Made now, before privileges are dropped; the address is given on every send
            # (as libsystemd does) so that a restarted manager's socket is found again.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: object) -> bool:
        """One datagram of ``KEY=VALUE`` lines (keys upper-cased). False if not delivered."""
        sock = self._sock
        if sock is None or self.address is None:
            return False
        text = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            sock.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError:
            # A full or vanished manager socket: the next message tries again.
            self.failures += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> None:
        if status:
            self.send(ready=1, status=status)
        else:
            self.send(ready=1)

    def reloading(self) -> None:
        self.send(reloading=1, monotonic_usec=monotonic_usec())

    def stopping(self, status: str = "") -> None:
        if status:
            self.send(stopping=1, status=status)
        else:
            self.send(stopping=1)

    def status(self, text: str) -> None:
        self.send(status=text)

    def start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ping at half the watchdog period from a timer on ``loop`` (see module doc)."""
        if self.watchdog is None or self._sock is None or self._timer is not None:
            return
        self._ping(loop)

    def _ping(self, loop: asyncio.AbstractEventLoop) -> None:
        """Timer callback (the event loop, every ``watchdog`` seconds): feed the watchdog."""
        assert self.watchdog is not None
        self.send(watchdog=1)
        self._timer = loop.call_later(self.watchdog, self._ping, loop)

    def stop_watchdog(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self.stop_watchdog()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
