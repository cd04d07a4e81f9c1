"""etcd v3 through its documented JSON gateway (``/v3/kv/range``, ``/v3/watch``, leases), on
httpx.

Why the gateway over an HTTP client rather than a gRPC client (aetcd): the gateway is part of
every etcd v3 server (3.4 in Debian bookworm answers it on the client port), httpx is pure
Python and already shares h11 with the admin API, while aetcd pulls grpcio and protobuf (tens
of MB of native code) into a load balancer's control plane. The gateway gives everything the
fleet needs: ranges with a revision, puts and deletes, a streaming watch from a revision with
compaction reported in-band, leases with keep-alives and revocation, and user/password auth.
Keys and values travel base64-encoded; 64-bit numbers travel as strings.

Nothing here is on the data plane's hot path: this module is imported only with ``[fleet]``.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from lbtcp.config import FleetConfig


class EtcdError(Exception):
    """etcd could not be reached, or answered with an error; the message says which."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away: list again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


class Rewound(Compacted):
    """etcd's revision is behind the one asked for: a store restored from a backup or made
    anew. Watching on would wait for revisions that mean something else: list again."""

    def __init__(self, revision: int) -> None:
        EtcdError.__init__(self, f"etcd's revision went back to {revision}")
        self.compact_revision = revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes | None  # None: deleted (a watch's DELETE event)
    mod_revision: int


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes end in '/', never in 0xff
    return raw.decode()


def _key_value(kv: dict[str, Any], deleted: bool) -> KeyValue:
    key = _unb64(kv.get("key", "")).decode("utf-8", "replace")
    value = None if deleted else _unb64(kv.get("value", ""))
    return KeyValue(key, value, int(kv.get("mod_revision", 0)))


class EtcdClient:
    """One etcd endpoint list; requests go to the first endpoint that answers."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.endpoints = list(config.etcd)
        verify: ssl.SSLContext | bool = True
        if config.ca_file or config.cert_file:
            context = ssl.create_default_context(cafile=config.ca_file or None)
            if config.cert_file:
                context.load_cert_chain(config.cert_file, config.key_file)
            verify = context
        self._http = httpx.AsyncClient(timeout=config.timeout, verify=verify, trust_env=False)
        self._token = ""

    async def close(self) -> None:
        await self._http.aclose()

    def _rotate(self) -> None:
        self.endpoints.append(self.endpoints.pop(0))

    async def _authenticate(self) -> None:
        if not self.config.username:
            return
        answer = await self._post_once(
            "/v3/auth/authenticate",
            {"name": self.config.username, "password": self.config.password},
            auth=False,
        )
        self._token = str(answer.get("token", ""))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _post_once(self, path: str, body: dict[str, Any], auth: bool = True) -> Any:
        url = self.endpoints[0] + path
        try:
            response = await self._http.post(
                url, json=body, headers=self._headers() if auth else {}
            )
        except (httpx.HTTPError, ssl.SSLError) as exc:
            # ssl.SSLError: a TLS 1.3 server's alert (e.g. a refused client certificate)
            # arrives after the handshake, on the first read, where httpx does not wrap it.
            self._rotate()
            raise EtcdError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code != 200 or not isinstance(answer, dict):
            message = (
                answer.get("error") or answer.get("message") if isinstance(answer, dict) else ""
            )
            raise EtcdError(f"{url}: HTTP {response.status_code}: {message or response.text[:200]}")
        return answer

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        """One request; with auth, a first refusal for an expired token logs in again."""
        if self.config.username and not self._token:
            await self._authenticate()
        try:
            return await self._post_once(path, body)
        except EtcdError as exc:
            if not self.config.username or "token" not in str(exc):
                raise
            await self._authenticate()
            return await self._post_once(path, body)

    # --- key-value ---------------------------------------------------------------------

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the store's revision of the listing."""
        answer = await self.post(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        return [_key_value(kv, False) for kv in answer.get("kvs", [])], revision

    async def list_ranges(self, ranges: list[tuple[str, str]]) -> tuple[list[KeyValue], int]:
        """Every key of the ``[key, range_end)`` ranges, read at one revision (a txn)."""
        ops = [{"request_range": {"key": _b64(key), "range_end": _b64(end)}} for key, end in ranges]
        answer = await self.post("/v3/kv/txn", {"success": ops})
        revision = int(answer.get("header", {}).get("revision", 0))
        kvs = [
            _key_value(kv, False)
            for response in answer.get("responses", [])
            for kv in response.get("response_range", {}).get("kvs", [])
        ]
        return kvs, revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self.post("/v3/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> int:
        answer = await self.post("/v3/kv/deleterange", {"key": _b64(key)})
        return int(answer.get("header", {}).get("revision", 0))

    # --- leases ------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self.post("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; returns its TTL left, 0 if etcd no longer knows it."""
        answer = await self.post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.post("/v3/lease/revoke", {"ID": str(lease)})

    # --- watch -------------------------------------------------------------------------

    async def watch(
        self, key: str, range_end: str, start_revision: int
    ) -> AsyncIterator[list[KeyValue]]:
        try:
            async for batch in self._watch(key, range_end, start_revision):
                yield batch
        except EtcdError as exc:
            if "token" in str(exc):
                self._token = ""  # expired or revoked: log in again on the next try
            raise

    async def _watch(
        self, key: str, range_end: str, start_revision: int
    ) -> AsyncIterator[list[KeyValue]]:
        """The changes in ``[key, range_end)`` from ``start_revision`` on, one list per etcd
        response (an empty one first, once the watch is created). Raises Compacted if that
        revision is gone, EtcdError when the stream breaks. Ends only by raising (or by the
        caller leaving it)."""
        if self.config.username and not self._token:
            await self._authenticate()
        body = {
            "create_request": {
                "key": _b64(key),
                "range_end": _b64(range_end),
                "start_revision": str(start_revision),
            }
        }
        url = self.endpoints[0] + "/v3/watch"
        # No read timeout: a quiet prefix sends nothing for as long as nothing changes; the
        # caller's lease keep-alives notice a dead etcd instead.
        timeout = httpx.Timeout(self.config.timeout, read=None)
        try:
            async with self._http.stream(
                "POST", url, json=body, headers=self._headers(), timeout=timeout
            ) as response:
                if response.status_code != 200:
                    raise EtcdError(f"{url}: HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        message = json.loads(line)
                    except ValueError:
                        raise EtcdError(f"{url}: a watch message that is not JSON") from None
                    if "error" in message:
                        raise EtcdError(f"{url}: {message['error'].get('message', 'error')}")
                    result = message.get("result", {})
                    compact = int(result.get("compact_revision", 0))
                    if compact:
                        raise Compacted(compact)
                    if result.get("created"):
                        current = int(result.get("header", {}).get("revision", 0))
                        if current < start_revision - 1:
                            raise Rewound(current)
                    if result.get("canceled"):
                        raise EtcdError(f"{url}: watch canceled: {result.get('cancel_reason')}")
                    events = result.get("events", [])
                    if events or result.get("created"):
                        # The creation answer is an empty batch: the watch is in place.
                        yield [
                            _key_value(e.get("kv", {}), e.get("type") == "DELETE") for e in events
                        ]
        except (httpx.HTTPError, ssl.SSLError) as exc:
            # ssl.SSLError: a TLS 1.3 server's alert (e.g. a refused client certificate)
            # arrives after the handshake, on the first read, where httpx does not wrap it.
            self._rotate()
            raise EtcdError(f"{url}: {type(exc).__name__}: {exc}") from None
        raise EtcdError(f"{url}: the watch stream ended")
