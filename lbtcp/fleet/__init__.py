"""The fleet: shared desired state for several lbtcp nodes, in etcd v3 (DESIGN.md section 12)."""
