"""Compare lbtcp with HAProxy (`mode tcp`) and nginx (`stream`) on the same backends and load.

    .venv/bin/python benchmarks/run.py [--quick] [--duration S] [--repeats N] [--out DIR]

Theory of operation. The backends (``lbtcp echo``, ``lbtcp sink``, a tiny HTTP responder and
``iperf3 -s`` for the cross-check) start once, pinned to the load core. Every proxy found on
the machine starts once, pinned to the proxy core, with one generated config (in a temp dir)
that maps the same four listener kinds to the same backends; ``direct`` is the no-proxy
baseline (the load generator talks to the backends), which shows the ceiling of the load core.

Each scenario runs ``--repeats`` times, and within a repeat every target in turn (A, B, C, then
A, B, C ...), so drift on this shared machine hits all of them alike; the report shows medians.
``lbtcp bench`` (pinned to the load core) makes the load and reports JSON. While it runs, this
script samples the proxy's CPU time (``/proc/PID/task/*/schedstat``, nanoseconds) and how busy
each core was (``/proc/stat``), to report whether the proxy was the bottleneck, whether other
processes disturbed the run, and what one operation costs the proxy in CPU: a comparison of
efficiency that holds even when the load core, not the proxy, set the pace.

``idle_mem`` restarts each proxy first (a fresh process: memory freed by earlier scenarios would
otherwise be reused and hide the real cost), opens N sessions through it, each proven spliced
by a one-byte echo, and divides the RSS growth by N.

The cross-check runs ``lbtcp bench`` and an independent C tool through a proxy in ABBA order
with matched bytes: iperf3 for bulk (64 KiB writes), wrk for rr and connect through the HTTP
responder, whose requests and responses are padded to exactly the rr message size.

The code is the package ``benchmarks/lbbench/``: ``procs`` (child processes, /proc readings,
pinning), ``proxies`` (backends, HAProxy/nginx/lbtcp configs), ``scenarios`` (the runner and the
cross-check), ``report`` (tables, the matplotlib chart, notes) and ``cli``. This file is the
entry point, and it still offers every name it used to define (``import run`` from the other
benchmark scripts), looked up in those modules.

It never installs anything: a missing proxy or tool is skipped with the package to install
(``benchmarks/install-tools``). Every child runs in its own process group and is stopped by its
id in a ``finally``, on errors and Ctrl-C too.
"""

from __future__ import annotations

import sys
from typing import Any

from lbbench import cli, common, procs, proxies, report, scenarios

_MODULES = (common, procs, proxies, scenarios, report, cli)


def __getattr__(name: str) -> Any:
    """``run.Children``, ``run.LbtcpProxy``, ...: the names this module had before the split."""
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'run' has no attribute {name!r}")


main = cli.main

if __name__ == "__main__":
    sys.exit(main())
