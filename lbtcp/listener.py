"""Accepting clients: ACL, limits, the no-healthy refusal, and connecting with retries.

Theory of operation. A ``Listener`` owns its listening sockets and its live sessions. For each
accepted client the loop creates a ``relay.Session``, whose ``connection_made`` calls
``session_accepted`` here. That runs the checks in the order an operator expects: deny/allow
CIDRs (``AC``), the per-source rate (``ratelimit.RateLimiter``) and connection limits
(``LM``), then asks the pool for a server. With ``proxy_protocol`` on, a
``proxy_accept.HeaderReader`` reads the PROXY header first and hands the connection to the
session with the header's client address (or closes it, ``PP``). With ``routes`` the same
reader then reads the TLS ClientHello and binds the session to the route's pool
(``tls_hello.Router``); every step after that uses ``session.pool``. Without PROXY, a listener
with ``routes`` has no reader: its sessions (``proxy_accept.RoutingSession``) read the
ClientHello themselves, and the listener bounds that wait for all of them with one FIFO and one
timer (``inspect_started``). No server means
the refusal of DESIGN.md §3 (``NH``): the client was accepted and is closed at once, by FIN, by
RST, or after a banner, without connecting anywhere. Otherwise ``connector.Connecting`` runs the
connect attempts, starting in the same loop turn: each attempt on a server not yet tried, with
``connect_timeout`` per attempt and ``retry_budget`` across all of them. On success the server
transport is handed to the session and bytes flow; if every attempt failed the client is
closed with ``CT`` (every attempt timed out) or ``CR`` (at least one was refused or failed
otherwise).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import monotonic

from lbtcp.acceptor import Acceptor
from lbtcp.addresses import format_address, parse_endpoint
from lbtcp.config import ListenerConfig
from lbtcp.connector import Connecting
from lbtcp.counters import SESSION_BUCKETS, Histogram
from lbtcp.events import Event
from lbtcp.log import Log
from lbtcp.pool import Pool, Server
from lbtcp.proxy_accept import HeaderReader, InspectedSession, RoutingSession
from lbtcp.proxy_protocol import encode
from lbtcp.ratelimit import RateLimiter
from lbtcp.relay import CLOSED, Session, UpstreamProtocol, idle_step, reset_transport
from lbtcp.tls_hello import Router

TERM_NO_HEALTHY = "NH"
TERM_ACL = "AC"
TERM_LIMIT = "LM"
TERM_PROXY_PROTOCOL = "PP"

REFUSAL_REASONS = ("no_healthy", "acl", "limit", "proxy_protocol")

# The protocol classes, chosen once at import: the traced ones only for a debugging run
# (lbtcp.sessiontrace), so that a release pays nothing per session for the option.
SessionClass: type[Session] = Session
UpstreamClass: type[UpstreamProtocol] = UpstreamProtocol
if os.environ.get("LBTCP_SESSION_TRACE"):
    from lbtcp.sessiontrace import TracedSession, TracedUpstream

    SessionClass, UpstreamClass = TracedSession, TracedUpstream


def _deadline(entry: tuple[float, RoutingSession]) -> float:
    return entry[0]


def bind_socket(address: str, backlog: int, *, reuseport: bool = False) -> socket.socket:
    """A listening TCP socket for ``IP:PORT`` or ``[IPv6]:PORT``; ``reuseport``: one of
    several sockets on the address, one per worker (SO_REUSEPORT)."""
    endpoint = parse_endpoint(address, allow_names=False)
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when it is given.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # "[::]:80" means IPv6 only; list "0.0.0.0:80" too for both, as nginx does.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((endpoint.host, endpoint.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """One ``[listeners.NAME]``: its sockets, its sessions and its counters."""

    def __init__(
        self,
        config: ListenerConfig,
        pool: Pool,
        log: Log,
        loop: asyncio.AbstractEventLoop,
        on_events: Callable[[Pool, list[Event]], None] | None = None,
        pools: Mapping[str, Pool] | None = None,
    ) -> None:
        """``pools``: the runtime's pools by name, for ``config.routes`` (needed with routes)."""
        self.name = config.name
        self.on_events = on_events
        self.config = config
        self.pool = pool
        self.log = log
        self.loop = loop
        self.servers: list[Acceptor] = []
        self.addresses: list[str] = []
        # bind string ("127.0.0.1:8080", "fd:web") -> its acceptors and their addresses
        self.bound: dict[str, list[tuple[Acceptor, str]]] = {}
        # When accept() last ran out of descriptors (logged at most once a second).
        self._accept_error_logged = -1.0
        self.sessions: set[Session] = set()
        self.per_source: dict[str, int] = {}
        self.accepting = False
        # Counters: plain ints on the hot path.
        self.connections_total = 0
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        # Durations of the sessions that reached a server, observed when they end.
        self.session_seconds = Histogram(SESSION_BUCKETS)
        self._check_acl = bool(config.allow or config.deny)
        # Chosen once here, so that a listener without PROXY headers pays nothing per client.
        self._factory: Callable[[], asyncio.Protocol]
        self.router: Router[Pool] | None = None
        # Every pool this listener's sessions may use: the default first, then the routes'.
        self.pools: tuple[Pool, ...] = (pool,)
        self._set_routes(config, pool, pools)
        # PROXY readers still waiting for their verdict (closed by a stop).
        self.readers: set[HeaderReader] = set()
        # Routing sessions still inspecting, as (deadline, session) in arrival order: every
        # client of a listener has the same inspect_timeout, so deadlines come in order and
        # one timer at the head serves them all. Entries of sessions that got their verdict
        # are dropped lazily (at the head, on the next arrival or when the timer fires).
        self.inspecting: deque[tuple[float, RoutingSession]] = deque()
        self._inspect_timer: asyncio.TimerHandle | None = None
        self.rate_limiter = (
            RateLimiter(config.max_rate_per_source) if config.max_rate_per_source else None
        )
        # The idle sweep: one timer for every session of this listener (see watch_idle).
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_due = 0.0
        self._idle_step = 0.0

    @property
    def active(self) -> int:
        return len(self.sessions)

    @property
    def awaiting_header(self) -> list[HeaderReader | RoutingSession]:
        """Clients not yet handed to a pool: PROXY readers and sessions still inspecting."""
        return [*self.readers, *(s for _, s in self.inspecting if s.inspecting)]

    def _set_routes(
        self, config: ListenerConfig, pool: Pool, pools: Mapping[str, Pool] | None
    ) -> None:
        """The route table and the accept factory for ``config`` (at build and on reload):
        a plain ``Session`` unless PROXY headers or ClientHellos must be read first."""
        self.router = None
        self.pools = (pool,)
        if config.routes:
            by_name = pools or {}
            self.router = Router((route.sni, by_name[route.pool]) for route in config.routes)
            every = (pool, *(by_name[route.pool] for route in config.routes))
            self.pools = tuple({id(p): p for p in every}.values())
        loop = self.loop
        if config.proxy_protocol == "off" and self.router is None:
            self._factory = lambda: SessionClass(self, loop)
        elif config.proxy_protocol == "off":
            self._factory = lambda: RoutingSession(self, loop)
        else:
            self._factory = lambda: HeaderReader(self)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, sockets: Mapping[str, Sequence[socket.socket]] | None = None) -> None:
        """Bind every address, or serve ``sockets`` (bind string -> sockets already bound, as
        a reload and socket activation hand them over), and start accepting. Raises OSError
        (port in use, ...)."""
        if sockets is None:
            bound: dict[str, list[socket.socket]] = {}
            try:
                for address in self.config.bind:
                    bound[address] = [bind_socket(address, self.config.backlog)]
            except BaseException:
                for group in bound.values():
                    for sock in group:
                        sock.close()
                raise
            sockets = bound
        await self.add_sockets(sockets)
        self.accepting = True

    async def add_sockets(self, sockets: Mapping[str, Sequence[socket.socket]]) -> None:
        """Accept on more listening sockets, each kept under its bind string."""
        for bind, group in sockets.items():
            for sock in group:
                # listen() again: a socket handed over (socket activation, a reload) may
                # have been listening with another backlog.
                sock.listen(self.config.backlog)
                # Through self: a reload may switch the protocol (PROXY headers on or off)
                # for the sockets that stay.
                server = Acceptor(self.loop, sock, lambda: self._factory(), self._accept_failed)
                self.servers.append(server)
                host, port = sock.getsockname()[:2]
                address = format_address(host, port)
                self.addresses.append(address)
                self.bound.setdefault(bind, []).append((server, address))

    def _accept_failed(self, exc: OSError) -> None:
        """accept() or a server connect ran out of descriptors or memory: the acceptors
        pause (lbtcp/acceptor.py). Logged at most once a second."""
        now = self.loop.time()
        if now - self._accept_error_logged >= 1.0 or self._accept_error_logged < 0:
            self._accept_error_logged = now
            self.log.event(
                "accept_paused",
                "out of descriptors or memory: new clients wait in the kernel's queue "
                "(raise LimitNOFILE / ulimit -n?)",
                listener=self.name,
                error=exc.strerror or str(exc),
            )

    def close_binds(self, binds: Iterable[str]) -> None:
        """Stop accepting on these bind strings (a reload dropped them); sessions go on."""
        for bind in binds:
            for server, address in self.bound.pop(bind, []):
                server.close()
                self.servers.remove(server)
                self.addresses.remove(address)

    def reconfigure(
        self, config: ListenerConfig, pool: Pool, pools: Mapping[str, Pool] | None = None
    ) -> None:
        """A reload changed this listener: new clients get the new settings, pool and routes
        at once; live sessions keep the server they have (and a client still sending its
        PROXY header or ClientHello finishes under the new listener settings)."""
        old = self.config
        self.config = config
        self.pool = pool
        self._check_acl = bool(config.allow or config.deny)
        self._set_routes(config, pool, pools)
        if config.max_rate_per_source != old.max_rate_per_source:
            # A new limit starts counting afresh (the old window was for another limit).
            self.rate_limiter = (
                RateLimiter(config.max_rate_per_source) if config.max_rate_per_source else None
            )

    def stop_accepting(self) -> None:
        """Close the listening sockets; live sessions go on. New clients get ECONNREFUSED."""
        self.accepting = False
        for server in self.servers:
            server.close()

    def close_sessions(self, term: str) -> None:
        self.stop_idle_sweep()
        for reader in list(self.readers):
            reader.abandon()
        inspecting = self.inspecting
        while inspecting:
            _, routing = inspecting.popleft()
            if routing.inspecting:
                routing.abandon()
        if self._inspect_timer is not None:
            self._inspect_timer.cancel()
            self._inspect_timer = None
        for session in list(self.sessions):
            session.close(term, abort=True)

    # --- accepting -----------------------------------------------------------------------

    def session_accepted(self, session: Session) -> None:
        """Called from ``Session.connection_made`` for every accepted client."""
        self.connections_total += 1
        pool = session.pool
        if pool is None:  # not routed by SNI
            pool = session.pool = self.pool
        ip = session.client_ip
        if self._check_acl and not self._acl_allows(ip):
            self._refuse(session, "acl", TERM_ACL)
            return
        config = self.config
        rate_limiter = self.rate_limiter
        if rate_limiter is not None and not rate_limiter.admit(ip, self.loop.time()):
            self._refuse(session, "limit", TERM_LIMIT)
            return
        if config.max_connections and len(self.sessions) >= config.max_connections:
            self._refuse(session, "limit", TERM_LIMIT)
            return
        if config.max_per_source and self.per_source.get(ip, 0) >= config.max_per_source:
            self._refuse(session, "limit", TERM_LIMIT)
            return
        client = pool.client(ip, session.client_port)
        server = pool.choose(client)
        if server is None:
            self._refuse_no_healthy(session)
            return
        self.sessions.add(session)
        if config.max_per_source:
            self.per_source[ip] = self.per_source.get(ip, 0) + 1
        session.idle_timeout = config.idle_timeout
        connecting = Connecting(self, session, server, self.loop, UpstreamClass)
        session.connecting = connecting
        connecting.start()

    def inspect_started(self, session: RoutingSession) -> None:
        """Called from ``RoutingSession.connection_made``: bound its wait for a ClientHello
        by ``inspect_timeout``, with the listener's one timer."""
        queue = self.inspecting
        # Sessions ahead that got their verdict need no timer: drop them now, so the queue
        # holds about the clients in flight (and no ended session stays referenced long).
        while queue and not queue[0][1].inspecting:
            queue.popleft()
        loop = self.loop
        deadline = loop.time() + self.config.inspect_timeout
        if queue and deadline < queue[-1][0]:
            # A reload shortened inspect_timeout: keep the queue in deadline order.
            entries = sorted([*queue, (deadline, session)], key=_deadline)
            queue.clear()
            queue.extend(entries)
            if self._inspect_timer is not None:
                self._inspect_timer.cancel()
                self._inspect_timer = None
        else:
            queue.append((deadline, session))
        if self._inspect_timer is None:
            self._inspect_timer = loop.call_at(queue[0][0], self._inspect_expired)

    def _inspect_expired(self) -> None:
        """Timer callback: route every session whose inspect_timeout has passed to the
        default pool, then wait for the next deadline."""
        self._inspect_timer = None
        queue = self.inspecting
        now = self.loop.time()
        while queue and queue[0][0] <= now:
            _, session = queue.popleft()
            if session.inspecting:
                try:
                    session.inspect_expired()
                except Exception as exc:  # a bug must cost one session, not the others
                    self.loop.call_exception_handler(
                        {"message": "inspect_expired failed", "exception": exc}
                    )
        while queue and not queue[0][1].inspecting:
            queue.popleft()
        if queue:
            self._inspect_timer = self.loop.call_at(queue[0][0], self._inspect_expired)

    def _acl_allows(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        config = self.config
        if any(address in network for network in config.deny):
            return False
        return not config.allow or any(address in network for network in config.allow)

    def trusts_proxy(self, ip: str) -> bool:
        """Whether ``ip`` (a peer's own address) may send a PROXY header."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.config.proxy_protocol_from)

    def header_refused(
        self, peer: tuple[str, int], started_at: float, received: int, why: str
    ) -> None:
        """Called by ``HeaderReader`` once per trusted client closed for its header (``PP``)."""
        self.connections_total += 1
        self.refused["proxy_protocol"] += 1
        self._access_without_server(peer, started_at, received, TERM_PROXY_PROTOCOL, reason=why)

    def inspect_abandoned(self, peer: tuple[str, int], started_at: float) -> None:
        """Called by ``HeaderReader`` for a client lost (reset) before its ClientHello was
        read: counted and logged like a plain client that left before its server was
        chosen."""
        self.connections_total += 1
        self._access_without_server(peer, started_at, 0, "--", sni="-", alpn="-")

    def _access_without_server(
        self, peer: tuple[str, int], started_at: float, received: int, term: str, **more: object
    ) -> None:
        """The access line of a client closed by ``HeaderReader`` before a server was chosen
        (no server, no connect time, nothing sent); ``more`` are the fields after ``term``."""
        log = self.log
        if log.access_enabled:
            log.access(
                listener=self.name,
                client=format_address(*peer),
                pool=self.pool.name,
                server="-",
                connect_ms=-1,
                duration_ms=round((monotonic() - started_at) * 1000.0, 3),
                bytes_in=received,
                bytes_out=0,
                term=term,
                **more,
            )

    def _refuse(self, session: Session, reason: str, term: str) -> None:
        self.refused[reason] += 1
        session.term = term
        session.close(term)

    def _refuse_no_healthy(self, session: Session) -> None:
        """The layer-4 "503": accepted, then closed at once, the way the listener says."""
        self.refused["no_healthy"] += 1
        session.term = TERM_NO_HEALTHY
        session.up_state = session.down_state = CLOSED  # nothing more is relayed
        mode = self.config.no_healthy
        client = session.client
        if mode == "reset":
            reset_transport(client)
        else:
            if mode == "banner":
                client.write(self.config.no_healthy_banner)
            client.close()

    # --- connecting (lbtcp/connector.py runs the attempts) --------------------------------

    def out_of_resources(self, exc: OSError) -> None:
        """A server connect failed for lbtcp's own lack of descriptors or memory: no new
        clients for a moment (the waiting ones stay in the kernel's queue)."""
        self._accept_failed(exc)
        for acceptor in self.servers:
            acceptor.pause()

    def proxy_header(self, session: Session, version: str) -> bytes:
        """The header sent to a server: the client's address, and the original destination
        from an accepted header, else the address the client connected to."""
        destination = session.destination
        if destination is None:
            sockname = session.client.get_extra_info("sockname")
            destination = (sockname[0], sockname[1]) if sockname else None
        try:
            return encode(version, (session.client_ip, session.client_port), destination)
        except ValueError:  # no usable address (a socket without peername): say "unknown"
            return encode(version, None, None)

    def report_connect(self, pool: Pool, server: Server, ok: bool, kind: str = "") -> None:
        """Passive health: tell the server's pool how a real connect attempt went (``kind``
        of a failure: "refused", "timeout", "other"). The pool is the one the attempt started
        with: a reload may have pointed the listener elsewhere since."""
        events = pool.connect_result(server, ok, self.loop.time(), kind)
        if events and self.on_events is not None:
            self.on_events(pool, events)

    def sessions_of(self, server: Server) -> list[Session]:
        return [session for session in self.sessions if session.server is server]

    # --- idle timeout --------------------------------------------------------------------

    def watch_idle(self, session: Session) -> None:
        """Called by ``Session.attach_upstream`` for a session with an idle timeout: make sure
        the sweep runs at least every ``idle_step`` of that timeout."""
        step = idle_step(session.idle_timeout)
        handle = self._idle_handle
        if handle is not None and self._idle_step <= step:
            return  # already sweeping often enough
        due = self.loop.time() + step
        if handle is not None:
            if self._idle_due <= due:
                self._idle_step = step  # keeps the sooner turn, then sweeps at this step
                return
            handle.cancel()
        self._idle_step = step
        self._idle_due = due
        self._idle_handle = self.loop.call_at(due, self._sweep_idle)

    def _sweep_idle(self) -> None:
        """Timer callback: check every watched session, close the idle ones (``CI``), and run
        again at the smallest step still needed; stop while no session has a timeout.

        Each session is seen every step of its own timeout or more often, so it is closed
        between ``idle_timeout`` and ``idle_timeout`` + two steps (1/4 of it) after its last
        byte: the byte is noticed up to one step late, the silence up to one more. That is the
        bound a timer per session had (tests/test_idle_sweep.py checks it)."""
        self._idle_handle = None
        now = self.loop.time()
        step = 0.0
        for session in list(self.sessions):
            if session.idle_timeout > 0 and session.upstream is not None:
                try:
                    watched = session.check_idle(now)
                except Exception as exc:  # a bug must cost one session, not the sweep
                    self.loop.call_exception_handler(
                        {"message": "idle check failed", "exception": exc, "protocol": session}
                    )
                    continue
                if watched:
                    own = idle_step(session.idle_timeout)
                    step = own if step == 0.0 or own < step else step
        if step > 0.0:
            self._idle_step = step
            self._idle_due = now + step
            self._idle_handle = self.loop.call_at(self._idle_due, self._sweep_idle)

    def stop_idle_sweep(self) -> None:
        """Cancel the sweep timer (the listener is going away)."""
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    # --- ending --------------------------------------------------------------------------

    def session_finished(self, session: Session) -> None:
        """Called once per session from ``Session._finish``: counters and the access log."""
        if session in self.sessions:
            self.sessions.discard(session)
            if self.config.max_per_source:
                ip = session.client_ip
                left = self.per_source.get(ip, 1) - 1
                if left > 0:
                    self.per_source[ip] = left
                else:
                    self.per_source.pop(ip, None)
        server = session.server
        pool = session.pool or self.pool
        if server is not None:
            pool.session_ended(server, session.bytes_from_client, session.bytes_to_client)
            self.session_seconds.observe(session.duration_ms() / 1000.0)
        log = self.log
        if log.access_enabled:
            fields: dict[str, object] = {
                "listener": self.name,
                "client": format_address(session.client_ip, session.client_port),
                "pool": pool.name,
                "server": server.name if server is not None else "-",
                "connect_ms": round(session.connect_ms, 3) if session.connect_ms >= 0 else -1,
                "duration_ms": round(session.duration_ms(), 3),
                "bytes_in": session.bytes_from_client,
                "bytes_out": session.bytes_to_client,
                "term": session.term,
            }
            if isinstance(session, InspectedSession):
                fields["sni"] = session.sni or "-"
                fields["alpn"] = ",".join(session.alpn) or "-"
            log.access(**fields)
