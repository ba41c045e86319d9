"""Live migration of running QEMU VMs: QMP control, the tunnel between agents, convergence
policy and the ownership handover (docs/live-migration.md)."""

# The modules other packages use; the rest are internal to live/.
__all__ = ["cli", "demo", "service"]
