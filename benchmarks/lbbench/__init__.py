"""The benchmark suite behind benchmarks/run.py (lbtcp vs HAProxy vs nginx)."""
