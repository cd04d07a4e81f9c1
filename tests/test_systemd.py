"""systemd: the notify protocol (a test playing the service manager), the watchdog, socket
activation through Debian's systemd-socket-activate, the privilege drop, shutdown grace, and
the example unit files checked by systemd-analyze."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbtcp.systemd import (
    ListenFdsError,
    Notifier,
    monotonic_usec,
    notify_address,
    parse_listen_fds,
    watchdog_interval,
)
from tests.support import REPO, Backends, Lbtcp, closed_port, config, open_session, roundtrip

# --- pure parts --------------------------------------------------------------------------

fd_names = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789_-."), min_size=1, max_size=8
)


@given(st.lists(fd_names, min_size=1, max_size=10), st.integers(1, 1 << 22))
def test_listen_fds_map_names_to_descriptors_in_order(names: list[str], pid: int) -> None:
    env = {"LISTEN_FDS": str(len(names)), "LISTEN_PID": str(pid), "LISTEN_FDNAMES": ":".join(names)}
    fds = parse_listen_fds(env, pid)
    assert sorted(fd for group in fds.values() for fd in group) == list(range(3, 3 + len(names)))
    for name, group in fds.items():
        assert [names[fd - 3] for fd in group] == [name] * len(group)
    # Passed to another process (a wrapper's parent): none of them are ours.
    assert parse_listen_fds(env, pid + 1) == {}


def test_listen_fds_defaults_and_errors() -> None:
    assert parse_listen_fds({}, 1) == {}
    assert parse_listen_fds({"LISTEN_FDS": "2", "LISTEN_PID": "7"}, 7) == {"unknown": [3, 4]}
    for env in (
        {"LISTEN_FDS": "x", "LISTEN_PID": "7"},
        {"LISTEN_FDS": "2", "LISTEN_PID": "seven"},
        {"LISTEN_FDS": "2", "LISTEN_PID": "7", "LISTEN_FDNAMES": "web"},
    ):
        with pytest.raises(ListenFdsError):
            parse_listen_fds(env, 7)


def test_watchdog_interval_is_half_the_period_and_honours_the_pid() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, 5) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "5"}, 5) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "6"}, 5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 5) is None
    assert watchdog_interval({}, 5) is None


def test_notify_addresses() -> None:
    assert notify_address("@lbtcp/notify") == b"\0lbtcp/notify"
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("") is None
    assert notify_address("vsock:2:1") is None


def test_notifier_writes_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        notifier.ready("2 sessions")
        notifier.reloading()
        assert manager.recv(4096) == b"READY=1\nSTATUS=2 sessions"
        fields = dict(line.split("=", 1) for line in manager.recv(4096).decode().splitlines())
        assert fields["RELOADING"] == "1"
        assert abs(int(fields["MONOTONIC_USEC"]) - monotonic_usec()) < 5_000_000
        notifier.close()
    # No manager: sending is a no-op, never an error.
    silent = Notifier({})
    assert not silent.enabled
    assert silent.send(ready=1) is False


# --- a test playing the service manager ----------------------------------------------------


class FakeManager:
    """A datagram socket as $NOTIFY_SOCKET (abstract name); records every message with the
    time it arrived."""

    def __init__(self) -> None:
        self.name = f"@lbtcp-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name[1:].encode())
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.lock = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))
                self.lock.notify_all()

    def wait_for(self, key: str, timeout: float = 15.0, after: int = 0) -> int:
        """The index of the first message from ``after`` on that sets ``key``."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for index in range(after, len(self.messages)):
                    if key in self.messages[index][1]:
                        return index
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key} from lbtcp; got {self.messages!r}")
                self.lock.wait(left)

    def pings(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [at for at, f in self.messages if "WATCHDOG" in f and start <= at <= end]

    def sequence(self) -> list[str]:
        """The state messages in order (READY, RELOADING, STOPPING), watchdog pings left out."""
        order = []
        with self.lock:
            for _at, fields in self.messages:
                order += [k for k in ("READY", "RELOADING", "STOPPING") if k in fields]
        return order

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.thread.join(2)


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    fake = FakeManager()
    yield fake
    fake.close()


WATCHDOG_USEC = 400_000  # pings expected every 200 ms


def test_service_manager_sees_ready_reloading_ready_stopping_and_the_watchdog(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], manager: FakeManager
) -> None:
    port = backends.echo()
    health = '[pools.app.health]\ninterval = "200ms"\nfast_interval = "100ms"\nrise = 2\n'
    lbtcp = start_lbtcp(
        config([port]) + health,
        env={"NOTIFY_SOCKET": manager.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )
    ready = manager.wait_for("READY")
    # READY only once the first verdicts are in: the server had to pass `rise` probes.
    healthy_line = lbtcp.wait_line(r"server_state .*new=healthy", timeout=1)
    assert lbtcp.lines.index(healthy_line) < lbtcp.lines.index(lbtcp.wait_line(r" ready "))
    status = manager.messages[ready][1]["STATUS"]
    assert re.fullmatch(r"0 sessions; pools: 1 ok, 0 degraded, 0 empty", status), status

    # Watchdog: one ping per half period, from the event loop.
    start = time.monotonic()
    time.sleep(2.0)
    pings = manager.pings(start, time.monotonic())
    assert 7 <= len(pings) <= 12, pings
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 0.2 * 2.5, gaps

    # STATUS follows the live session count.
    session = open_session(lbtcp.address())
    manager.wait_for("STATUS", after=ready + 1, timeout=5)
    with manager.lock:
        statuses = [f["STATUS"] for _at, f in manager.messages[ready + 1 :] if "STATUS" in f]
    assert any(s.startswith("1 sessions") for s in statuses), statuses

    before = len(manager.messages)
    lbtcp.reload(config([port]) + health)
    reloading = manager.wait_for("RELOADING", after=before)
    fields = manager.messages[reloading][1]
    assert abs(int(fields["MONOTONIC_USEC"]) - monotonic_usec()) < 10_000_000
    manager.wait_for("READY", after=reloading + 1)

    session.close()
    lbtcp.signal(signal.SIGTERM)
    manager.wait_for("STOPPING", after=reloading + 1)
    assert lbtcp.wait(15) == 0
    assert manager.sequence() == ["READY", "RELOADING", "READY", "STOPPING"]


def test_a_stopped_process_stops_feeding_the_watchdog(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], manager: FakeManager
) -> None:
    port = backends.echo()
    lbtcp = start_lbtcp(
        config([port]), env={"NOTIFY_SOCKET": manager.name, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    )
    manager.wait_for("READY")
    t0 = time.monotonic()
    time.sleep(0.6)
    assert len(manager.pings(t0, time.monotonic())) >= 2
    lbtcp.signal(signal.SIGSTOP)
    try:
        time.sleep(0.15)  # a ping already in flight may still land
        stopped_at = time.monotonic()
        time.sleep(1.0)
        assert manager.pings(stopped_at, time.monotonic()) == []
    finally:
        lbtcp.signal(signal.SIGCONT)
    resumed = time.monotonic()
    time.sleep(0.6)
    assert len(manager.pings(resumed, time.monotonic())) >= 2


def test_watchdog_meant_for_another_process_is_not_fed(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], manager: FakeManager
) -> None:
    port = backends.echo()
    start_lbtcp(
        config([port]),
        env={
            "NOTIFY_SOCKET": manager.name,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
            "WATCHDOG_PID": "1",
        },
    )
    manager.wait_for("READY")
    t0 = time.monotonic()
    time.sleep(0.8)
    assert manager.pings(t0 - 5, time.monotonic()) == []


# --- shutdown grace ------------------------------------------------------------------------


def test_shutdown_grace_keeps_accepting_then_refuses_and_drains(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], manager: FakeManager
) -> None:
    port = backends.echo()
    lbtcp = start_lbtcp(
        config([port], global_extra='shutdown_grace = "2s"\ndrain_timeout = "10s"'),
        env={"NOTIFY_SOCKET": manager.name},
    )
    address = lbtcp.address()
    live = open_session(address, b"live")
    manager.wait_for("READY")
    lbtcp.signal(signal.SIGTERM)
    sent_at = time.monotonic()
    manager.wait_for("STOPPING", timeout=2)
    lbtcp.wait_line(r"shutdown_grace ")
    # New clients are still served during the grace...
    served = 0
    while time.monotonic() - sent_at < 1.6:
        assert roundtrip(address, b"still served") == b"still served"
        served += 1
    assert served > 0
    # ...and refused after it.
    lbtcp.wait_line(r" drain ", timeout=5)
    assert time.monotonic() - sent_at >= 1.9
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()
    # The live session drains: still spliced, then it ends and lbtcp exits 0.
    live.sendall(b"during the drain")
    assert live.recv(100) == b"during the drain"
    live.close()
    assert lbtcp.wait(15) == 0
    assert lbtcp.matching(r"stop .*closed_sessions=0")


# --- socket activation ----------------------------------------------------------------------


def test_socket_activation_serves_on_fd_web(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing: scripts/install-test-deps installs it"
    port = closed_port()
    echo = backends.echo()
    text = config([echo]).replace('bind = "127.0.0.1:0"', 'bind = "fd:web"')
    lbtcp = start_lbtcp(
        text, wait=False, prefix=(activate, "-l", f"127.0.0.1:{port}", "--fdname=web")
    )
    lbtcp.wait_line(rf"Listening on 127.0.0.1:{port}")
    # systemd-socket-activate starts lbtcp on the first connection; it waits in the backlog.
    assert roundtrip(("127.0.0.1", port), b"activated") == b"activated"
    lbtcp.wait_line(r"listening listener=web ")
    for i in range(5):
        assert roundtrip(("127.0.0.1", port), b"again %d" % i) == b"again %d" % i
    # A reload keeps fd:web (same bind); one naming an fd that was not passed is refused.
    assert " reload msg=" in lbtcp.reload(text)
    bad = text + '[listeners.other]\nbind = "fd:other"\npool = "app"\n'
    assert " reload_failed msg=" in lbtcp.reload(bad)
    assert lbtcp.matching(r"reload_error .*fd:other: systemd passed no socket named 'other'")
    assert roundtrip(("127.0.0.1", port), b"after the reloads") == b"after the reloads"


def test_a_passed_socket_that_is_not_tcp_is_a_start_up_error(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    activate = shutil.which("systemd-socket-activate")
    assert activate
    port = closed_port()
    text = config([backends.echo()]).replace('bind = "127.0.0.1:0"', 'bind = "fd:web"')
    lbtcp = start_lbtcp(
        text, wait=False, prefix=(activate, "-d", "-l", f"127.0.0.1:{port}", "--fdname=web")
    )
    lbtcp.wait_line(rf"Listening on 127.0.0.1:{port}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # starts lbtcp
        udp.sendto(b"wake up", ("127.0.0.1", port))
    assert lbtcp.wait(15) == 1
    line = lbtcp.wait_line(r"cannot listen")
    assert "listeners.web.bind: fd:web: descriptor 3 is not a TCP socket" in line


def test_an_fd_name_not_passed_is_a_start_up_error(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    text = config([backends.echo()]).replace('bind = "127.0.0.1:0"', 'bind = "fd:web"')
    lbtcp = start_lbtcp(text, wait=False)
    assert lbtcp.wait(15) == 1
    line = lbtcp.wait_line(r"error ")
    assert "listeners.web.bind: fd:web: systemd passed no socket named 'web'" in line


# --- privileges -----------------------------------------------------------------------------


def _readable_python() -> tuple[str, dict[str, str]]:
    """An interpreter and packages user nobody can read: Debian's /usr/bin/python3 with this
    checkout and its virtualenv's site-packages on PYTHONPATH (the default Python lives under
    /root, which nobody cannot read)."""
    python = "/usr/bin/python3"
    assert os.path.exists(python), "Debian's python3 is needed for the privilege tests"
    site = sysconfig.get_paths()["purelib"]
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    assert version == str(sys.version_info[:2]), f"{python} is {version}, the venv is not"
    for path in (REPO, Path(site)):
        assert os.stat(path).st_mode & 0o005 == 0o005, f"{path} is not readable by everyone"
    return python, {"PYTHONPATH": f"{REPO}:{site}", "PYTHONNOUSERSITE": "1"}


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory everyone can read (pytest's tmp_path is private to root): the config file
    must stay readable after the drop, for a reload."""
    path = Path(tempfile.mkdtemp(prefix="lbtcp-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _low_port() -> socket.socket:
    """A free port below 1024 on 127.0.0.1, held (closed by the caller before lbtcp binds)."""
    for port in range(700, 1024):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        return sock
    pytest.fail("no free port below 1024")


def _status_fields(pid: int) -> list[dict[str, str]]:
    fields = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "status").read_text()
        fields.append(dict(line.split(":", 1) for line in text.splitlines() if ":" in line))
    return fields


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_drops_to_nobody_after_binding_a_low_port(
    backends: Backends, public_dir: Path, dns_servers: Any
) -> None:
    from tests.dns_server import DOMAIN

    python, env = _readable_python()
    echo = backends.echo()
    held = _low_port()
    port = held.getsockname()[1]
    held.close()
    # A server by name: the resolver (pycares) runs its own thread from before the drop, so
    # "every thread" is more than the main one.
    dns = dns_servers(hosts={f"app.{DOMAIN}": ["127.0.0.1"]})
    text = config([echo], global_extra='user = "nobody"').replace(
        "127.0.0.1:0", f"127.0.0.1:{port}"
    ) + (
        f'[[pools.app.servers]]\naddress = "app.{DOMAIN}:{echo}"\n'
        f'[resolver]\nnameservers = ["{dns.nameserver}"]\nfamily = "ipv4"\n'
    )
    lbtcp = Lbtcp(text, public_dir, env=env, python=python)
    try:
        lbtcp.wait_line(r"privileges .*user=nobody")
        nobody = "65534"
        threads = _status_fields(lbtcp.proc.pid)
        assert len(threads) >= 2, "expected the resolver's thread beside the main one"
        for status in threads:
            assert status["Uid"].split() == [nobody] * 4, status["Uid"]
            assert status["Gid"].split() == [nobody] * 4, status["Gid"]
            assert status["Groups"].strip() == ""
            for cap in ("CapEff", "CapPrm", "CapAmb"):
                assert int(status[cap], 16) == 0, (cap, status[cap])
        assert roundtrip(("127.0.0.1", port), b"as nobody") == b"as nobody"
        # A reload still works as nobody (nothing left to import that nobody cannot read).
        line = lbtcp.reload(text.replace("retries", "retries") + "\n")
        assert " reload msg=" in line
        assert roundtrip(("127.0.0.1", port), b"after reload") == b"after reload"
    finally:
        lbtcp.stop()


def _unreadable_by_others(path: Path) -> bool:
    """Some directory on the way to ``path`` denies "others" read or search access."""
    for parent in [path, *path.parents]:
        if parent.exists() and os.stat(parent).st_mode & 0o005 != 0o005:
            return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_after_the_drop_nothing_needs_the_unreadable_installation(
    backends: Backends, public_dir: Path
) -> None:
    """The tests' own interpreter lives under /root: after dropping to nobody it cannot
    import anything more. Every admin endpoint and a reload must still work, which proves
    that lbtcp imported all it needs before the drop."""
    from tests.test_admin_server import admin_address, get, post

    prefix = Path(sys.base_prefix).resolve()  # the standard library
    if not _unreadable_by_others(prefix):
        pytest.skip(f"{prefix} is readable by everyone here: nothing to prove")
    echo = backends.echo()
    text = '[admin]\nlisten = "127.0.0.1:0"\n' + config(
        [echo], global_extra='user = "nobody"', pool_extra="[pools.app.health]\n"
    )
    lbtcp = Lbtcp(text, public_dir)
    try:
        lbtcp.wait_line(r"privileges .*user=nobody")
        admin = admin_address(lbtcp)
        for path in ("/", "/status", "/metrics", "/healthz"):
            assert get(admin, path).status == 200, path
        openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
        assert get(admin, "/metrics", openmetrics).status == 200
        lbtcp.wait_line(r"server_state .*new=healthy", timeout=15)  # probes run as nobody
        assert roundtrip(lbtcp.address(), b"as nobody") == b"as nobody"
        lbtcp.config_path.write_text(text.replace('balance = "round_robin"', 'balance = "random"'))
        reply = post(admin, "/reload")
        assert reply.status == 200, reply.body
        assert post(admin, "/pools/app/servers/127.0.0.1%3A" + str(echo) + "/drain").status == 200
        assert not lbtcp.matching(r"admin_error|Traceback|ModuleNotFoundError")
    finally:
        lbtcp.stop()


def test_an_unknown_user_is_a_start_up_error(backends: Backends, tmp_path: Path) -> None:
    text = config([backends.echo()], global_extra='user = "no-such-user-lbtcp"')
    lbtcp = Lbtcp(text, tmp_path, wait=False)
    assert lbtcp.wait(15) == 2
    assert lbtcp.matching(r"global.user: no user named 'no-such-user-lbtcp'")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a process as nobody")
def test_a_failed_drop_exits_1_and_never_serves(backends: Backends, public_dir: Path) -> None:
    """Started as nobody and asked to become another user: exit 1 with a clear message."""
    python, env = _readable_python()
    text = config([backends.echo()], global_extra='user = "daemon"')
    path = public_dir / "lbtcp.toml"
    path.write_text(text)
    done = subprocess.run(
        [python, "-m", "lbtcp", "serve", str(path)],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=30,
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
    )
    assert done.returncode == 1, done.stderr
    assert "cannot drop privileges: cannot switch to user 'daemon'" in done.stderr
    assert " start " not in done.stderr


# --- the unit files ---------------------------------------------------------------------------


def _units(tmp_path: Path) -> Path:
    """The example units, with ExecStart= pointing at an lbtcp that exists here."""
    lbtcp = shutil.which("lbtcp", path=str(Path(sys.executable).parent))
    assert lbtcp, "the lbtcp script of this venv"
    units = tmp_path / "units"
    units.mkdir()
    for name in ("lbtcp.service", "lbtcp.socket"):
        text = (REPO / "examples" / name).read_text().replace("/usr/local/bin/lbtcp", lbtcp)
        (units / name).write_text(text)
    return units


def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/install-test-deps installs systemd"
    units = _units(tmp_path)
    done = subprocess.run(
        [analyze, "verify", str(units / "lbtcp.service"), str(units / "lbtcp.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    mine = [line for line in done.stderr.splitlines() if "lbtcp." in line]
    assert mine == [], mine  # no warning about our units (unknown keys, bad values, ...)


def test_service_exposure_is_below_2(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze
    units = _units(tmp_path)
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(units / "lbtcp.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for lbtcp.service: ([0-9.]+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) < 2.0
    assert match.group(2) == "OK"


MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: what MemoryDenyWriteExecute=yes enforces, kept
# across execve.
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_memory_deny_write_execute_is_fine_for_lbtcp(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], tmp_path: Path, dns_servers: object
) -> None:
    """The unit sets MemoryDenyWriteExecute=yes: lbtcp (uvloop, the resolver, a reload) must
    run with no writable-and-executable memory at all."""
    from tests.dns_server import DOMAIN

    wrapper = tmp_path / "mdwe.py"
    wrapper.write_text(MDWE_WRAPPER)
    echo = backends.echo()
    dns = dns_servers(hosts={f"app.{DOMAIN}": ["127.0.0.1"]})  # type: ignore[operator]
    text = config([echo]) + (
        f'[[pools.app.servers]]\naddress = "app.{DOMAIN}:{echo}"\n'
        f'[resolver]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\nfamily = "ipv4"\n'
    )
    text = '[admin]\nlisten = "127.0.0.1:0"\n' + text
    lbtcp = start_lbtcp(text, prefix=(sys.executable, str(wrapper)))
    lbtcp.wait_line(r"dns_change ", timeout=10)
    for i in range(6):
        assert roundtrip(lbtcp.address(), b"mdwe %d" % i) == b"mdwe %d" % i
    from tests.test_admin_server import admin_address, get

    admin = admin_address(lbtcp)
    for path in ("/", "/status", "/metrics"):
        assert get(admin, path).status == 200, path
    assert " reload msg=" in lbtcp.reload(text)
    assert roundtrip(lbtcp.address(), b"after") == b"after"
    assert lbtcp.proc.poll() is None


@pytest.mark.parametrize(
    ("global_extra", "bind", "error"),
    [
        ("", "fd:", "listeners.web.bind[0]: 'fd:': expected 'fd:NAME'"),
        ("", "fd:a:b", "listeners.web.bind[0]: 'fd:a:b': expected 'fd:NAME'"),
        ('group = "nogroup"', "fd:web", "global.group: needs 'user' too"),
        ('user = "nobody"\ngroup = "no-such-group-x"', "fd:web", "global.group: no group named"),
        ('shutdown_grace = "soon"', "fd:web", "global.shutdown_grace: 'soon' is not a duration"),
    ],
)
def test_config_errors_of_the_systemd_keys(global_extra: str, bind: str, error: str) -> None:
    from lbtcp.config import ConfigError, parse_config
    from tests.support import config as config_text

    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    text = config_text([9000], global_extra=global_extra).replace("127.0.0.1:0", bind)
    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text))
    assert any(e.startswith(error) for e in caught.value.errors), caught.value.errors


def test_fd_binds_and_the_new_global_keys_parse() -> None:
    from lbtcp.config import parse_config

    config_ = parse_config(
        {
            "global": {"user": "nobody", "group": "nogroup", "shutdown_grace": "1.5s"},
            "listeners": {"web": {"bind": ["fd:web", "fd:web-v6"], "pool": "app"}},
            "pools": {"app": {"servers": [{"address": "127.0.0.1:1"}]}},
        }
    )
    assert config_.listeners["web"].bind == ("fd:web", "fd:web-v6")
    assert (config_.global_.user, config_.global_.group) == ("nobody", "nogroup")
    assert config_.global_.shutdown_grace == 1.5
