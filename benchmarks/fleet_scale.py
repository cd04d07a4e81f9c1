#!/usr/bin/env python3
"""The fleet at size: N server keys in etcd, listed and watched by several ``lbtcp serve``.

Starts a private etcd (127.0.0.1, free ports, a temporary data dir), writes ``--servers``
extra-server keys under /lbtcp/pools/app/servers/ (in transactions of 128 puts), then starts
``--nodes`` lbtcp nodes on that prefix and reports, per node: the listing time and the apply
time (from the node's own ``fleet_connected`` line), its RSS against a node without fleet keys,
then the time for one more change (a weight override) to be applied by every node (from
``etcdctl put`` returning to each node's ``fleet_update`` line), the size of each node's
registry entry, and etcd's database size.

    .venv/bin/python benchmarks/fleet_scale.py --servers 10000 --nodes 3 --json out.json

Only 127.0.0.1 is used; every process started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.etcd_support import Etcd
from tests.support import Lbtcp


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_servers(etcd: Etcd, count: int) -> float:
    started = time.perf_counter()
    with httpx.Client(base_url=etcd.url, timeout=30) as client:
        for first in range(0, count, 128):
            ops = []
            for index in range(first, min(first + 128, count)):
                port = 20000 + index % 40000
                host = f"127.{1 + index // 40000}.0.1"
                value = json.dumps({"address": f"{host}:{port}", "weight": 1 + index % 5})
                ops.append(
                    {
                        "request_put": {
                            "key": _b64(f"/lbtcp/pools/app/servers/x{index}"),
                            "value": _b64(value),
                        }
                    }
                )
            answer = client.post("/v3/kv/txn", json={"success": ops})
            answer.raise_for_status()
    return time.perf_counter() - started


def node_config(url: str, node: str) -> str:
    return (
        f'[fleet]\netcd = ["{url}"]\nnode = "{node}"\ntimeout = "10s"\n'
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n'
        '[pools.app]\nbalance = "round_robin"\n'
        '[[pools.app.servers]]\nname = "file"\naddress = "127.0.0.1:9"\n'
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    result: dict[str, object] = {"servers": args.servers, "nodes": args.nodes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        etcd = Etcd(root / "etcd-data")
        etcd.start()
        nodes: list[Lbtcp] = []
        try:
            # A node without any fleet key first: the memory baseline.
            (root / "base").mkdir()
            base = Lbtcp(node_config(etcd.url, "base"), root / "base")
            nodes.append(base)
            base.wait_line("fleet_connected", 30)
            result["rss_mib_without_keys"] = round(base.rss_bytes() / 2**20, 1)
            base.stop()
            nodes.remove(base)
            result["write_s"] = round(write_servers(etcd, args.servers), 2)
            per_node = []
            for index in range(args.nodes):
                folder = root / f"n{index}"
                folder.mkdir()
                node = Lbtcp(node_config(etcd.url, f"n{index}"), folder, wait=False)
                nodes.append(node)
            for node in nodes:
                line = node.wait_line("fleet_connected", 120)
                node.wait_line(r"\bstart\b", 60)
                fields = dict(re.findall(r"(\w+)=(\S+)", line))
                per_node.append(
                    {
                        "keys": int(fields["keys"]),
                        "list_ms": float(fields["list_ms"]),
                        "apply_ms": float(fields["apply_ms"]),
                    }
                )
            # The registry entries are written once the health verdicts are in.
            deadline = time.monotonic() + 30
            entries: dict[str, str] = {}
            while time.monotonic() < deadline:
                entries = etcd.get_prefix("/lbtcp/nodes/")
                if len(entries) == args.nodes and all(
                    len(json.loads(v)["health"].get("app", {})) == args.servers + 1
                    for v in entries.values()
                ):
                    break
                time.sleep(0.2)
            for node, info in zip(nodes, per_node, strict=True):
                info["rss_mib"] = round(node.rss_bytes() / 2**20, 1)
            result["per_node"] = per_node
            result["registry_entry_bytes"] = sorted(len(v) for v in entries.values())
            marks = [len(node.lines) for node in nodes]
            etcd.ctl("put", "/lbtcp/overrides/app/x7", '{"weight": 200}')
            returned = time.monotonic()
            seen = []
            for node, mark in zip(nodes, marks, strict=True):
                node.wait_line("fleet_update.*overrides/app/x7", 30, start=mark)
                seen.append(time.monotonic() - returned)
            result["one_change_applied_by_all_s"] = round(max(seen), 3)
            status = httpx.post(etcd.url + "/v3/maintenance/status", json={}, timeout=5).json()
            result["etcd_db_size_mib"] = round(int(status["dbSize"]) / 2**20, 1)
        finally:
            for node in nodes:
                node.stop()
            etcd.kill()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
