"""How long a scrape of a big pool takes: /metrics and /status of a 1,000-server pool.

    .venv/bin/python benchmarks/metrics_render.py [--servers N] [--repeats R] [--json FILE]

Theory of operation. A real ``Runtime`` (as ``lbtcp serve`` runs it, on uvloop) serves one
listener over a pool of N servers (127.0.0.x addresses nobody connects to: no probes, no
traffic, so every series exists and nothing changes while measuring). In that process the
script times, R times each, what the admin server calls per request: ``metrics.render`` for
the text format 0.0.4 and for OpenMetrics, and ``status_document`` plus ``json.dumps``. For
comparison it also times prometheus_client's own exposition of the same families
(``generate_latest`` over ``registry_for(runtime)``), which ``render`` does not use because
of this figure. It prints one line per measure (median, p90, max in ms) and the sample count.
A measurement, not a test: the unit tests check the content, this only reports the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import exposition

from lbtcp.admin.status import status_document
from lbtcp.config import parse_config
from lbtcp.log import Log
from lbtcp.metrics import families, registry_for, render
from lbtcp.runtime import Runtime

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_text(servers: int) -> str:
    lines = ["[listeners.web]", 'bind = "127.0.0.1:0"', 'pool = "big"', "[pools.big]"]
    for i in range(servers):
        host = f"127.0.{1 + i // 250}.{1 + i % 250}"
        lines += ["[[pools.big.servers]]", f'address = "{host}:8080"', f'name = "srv-{i:04d}"']
    return "\n".join(lines) + "\n"


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    fn()  # warm up: first-use caches, the registry
    times = []
    for _ in range(repeats):
        begun = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begun) * 1000.0)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(len(times) * 0.9))],
        "max_ms": times[-1],
    }


async def measure(servers: int, repeats: int) -> dict[str, Any]:
    config = parse_config(tomllib.loads(config_text(servers)), source="metrics_render")
    runtime = Runtime(config, Log("text", access_log=False))
    task = asyncio.get_running_loop().create_task(runtime.run())
    try:
        while not all(listener.accepting for listener in runtime.listeners.values()) or not (
            runtime.listeners
        ):
            if task.done():
                raise RuntimeError("the runtime stopped while starting")
            await asyncio.sleep(0.01)
        body, _ = render(runtime, "")
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        registry = registry_for(runtime)
        results = {
            "servers": servers,
            "samples": samples,
            "bytes": len(body),
            "families": timed(lambda: families(runtime), repeats),
            "render_text": timed(lambda: render(runtime, ""), repeats),
            "render_openmetrics": timed(
                lambda: render(runtime, "application/openmetrics-text; version=1.0.0"), repeats
            ),
            "status_json": timed(lambda: json.dumps(status_document(runtime)), repeats),
            "prometheus_client_generate_latest": timed(
                lambda: exposition.generate_latest(registry), max(3, repeats // 6)
            ),
        }
    finally:
        runtime.request_stop("now")
        await task
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=1000, help="servers in the pool [1000]")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measure [30]")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = uvloop.run(measure(args.servers, args.repeats))
    print(
        f"{results['servers']} servers: {results['samples']} samples, "
        f"{results['bytes'] / 1024:.0f} KiB of text 0.0.4"
    )
    for key in (
        "render_text",
        "render_openmetrics",
        "families",
        "status_json",
        "prometheus_client_generate_latest",
    ):
        r = results[key]
        print(
            f"  {key:34} median {r['median_ms']:7.1f} ms   p90 {r['p90_ms']:7.1f} ms   "
            f"max {r['max_ms']:7.1f} ms"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
