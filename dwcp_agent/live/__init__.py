"""Live migration of running QEMU VMs: QMP control, the tunnel between agents, convergence
policy and the ownership handover (docs/live-migration.md)."""
