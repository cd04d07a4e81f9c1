"""``workers > 1``: the parent is the control plane, its workers the data plane (DESIGN.md §3)."""
