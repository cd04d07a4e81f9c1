"""An example lbtcp balancer plugin: ``FirstAvailable``, active/standby in config order.

Every new client goes to the first server, in the pool's config order, that can take it: it
is healthy, not full (``max_connections``) and of positive weight, which the pool has already
checked before calling the balancer. Only when it cannot take the client (down, full, or it
already refused this client's connect) does the next server get anything. This is HAProxy's
``balance first``: it keeps as few servers busy as possible, so that the spare ones can be
stopped or scaled down, or so that a standby only sees traffic when the primary is gone.

Use it by putting this directory on the module path and naming the class in the config::

    # PYTHONPATH=/path/to/examples lbtcp serve lbtcp.toml
    [pools.app]
    balance = "plugin_balancer:FirstAvailable"

``balance = "module.path:ClassName"`` names any importable class. lbtcp imports the module,
calls the class with no arguments (one instance per pool), and then calls two methods:

* ``update(servers)`` whenever the pool's membership changes (start, reload, DNS answers,
  weight changes), with every server of the pool in config order. Never on the hot path, so
  this is the place for any precomputation.
* ``pick(candidates, client)`` for each connect attempt, with the servers that may be used
  right now. It must return one of those objects, or None if it cannot choose (the pool then
  treats the client as having no server). It runs on the event loop: keep it fast, never
  block, never do I/O.

Each server has ``.name`` (unique in the pool), ``.effective_weight`` (> 0 for a candidate)
and ``.active`` (live sessions). ``client`` has ``.ip``, ``.port`` and ``.key`` (the bytes
to hash, chosen by the pool's ``hash_key``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from lbtcp.balancing import Candidate, Client

CandidateT = TypeVar("CandidateT", bound=Candidate)


class FirstAvailable:
    """Send each client to the first usable server in config order."""

    def __init__(self) -> None:
        # Config position by server name. Names, not objects: a reload may rebuild the
        # server objects, and names are what stay stable.
        self._position: dict[str, int] = {}

    def update(self, servers: Sequence[Candidate]) -> None:
        """Remember the config order; called with every server, usable or not."""
        self._position = {server.name: index for index, server in enumerate(servers)}

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """The candidate that comes first in the config.

        A server the pool added without an update() yet (unknown name) sorts last, so a
        missing notification degrades the order instead of failing the client.
        """
        if not candidates:
            return None
        position = self._position
        unknown = len(position)
        return min(candidates, key=lambda server: position.get(server.name, unknown))
