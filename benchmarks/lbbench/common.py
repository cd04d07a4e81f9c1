"""Constants shared by the benchmark modules."""

from __future__ import annotations

from pathlib import Path

# benchmarks/, where httpd.py and results/ are.
HERE = Path(__file__).resolve().parent.parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
BENCH_SLACK = 60.0
CPU_SAMPLE_INTERVAL = 0.1
CPU_WINDOW = 0.5
RR_SIZE = 64
BULK_WRITE = 64 * 1024
RR_CONNECTIONS = 64
CONNECT_WORKERS = 32
AGREEMENT = 0.20
# Through a proxy, a result at this share of the no-proxy ceiling says the load core, not the
# proxy, may have been the limit.
LOAD_BOUND_SHARE = 0.8
# Other processes busier than this on the proxy core (while it should idle) spoil a run.
QUIET_PCT = 10.0


# ---------------------------------------------------------------------------- child processes
