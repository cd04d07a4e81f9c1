"""What a batch of connect results costs on the parent/worker channel: JSON (what lbtcp
sends) against a fixed struct record with names replaced by indexes (what it could send).

    .venv/bin/python benchmarks/ipc_cost.py [--entries 50] [--rounds 20000]

The batch is the worst case for the folding of ``ipc.merge_result``: two servers of which one
fails, alternating, so that no two neighbours fold into one entry. The cost shown is encode,
frame, decode and validate, per batch and per entry, on this machine (bounded: ``--rounds``
batches of each kind).
"""

from __future__ import annotations

import argparse
import struct
import sys
import timeit
from typing import Any

from lbtcp.workers.ipc import FrameDecoder, Kind, check_results, decode_json, encode, merge_result

RECORD = struct.Struct("!HHBBI")  # pool index, server index, ok, kind index, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args(argv)
    batch: list[list[Any]] = []
    for i in range(args.entries):
        ok = i % 2 == 0
        merge_result(batch, "app", f"10.0.0.{i % 2}:8080", ok, "" if ok else "refused")
    names = {"10.0.0.0:8080": 0, "10.0.0.1:8080": 1}

    def as_json() -> None:
        frames, _ = FrameDecoder().feed(encode(Kind.RESULTS, batch))
        check_results(decode_json(frames[0]))

    def as_struct() -> None:
        data = b"".join(RECORD.pack(0, names[e[1]], e[2], 0, e[4]) for e in batch)
        [RECORD.unpack_from(data, i) for i in range(0, len(data), RECORD.size)]

    size = len(encode(Kind.RESULTS, batch))
    for label, fn, nbytes in (
        ("json", as_json, size),
        ("struct", as_struct, RECORD.size * len(batch)),
    ):
        per_batch = timeit.timeit(fn, number=args.rounds) / args.rounds
        print(
            f"{label:6s} {len(batch)} entries, {nbytes} bytes: {per_batch * 1e6:.1f} us per "
            f"batch, {per_batch * 1e6 / len(batch):.2f} us per entry"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
