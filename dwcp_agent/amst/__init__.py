"""AMST: adaptive multi-stream transport."""

# The modules other packages use; the rest are internal to amst/.
__all__ = ["channel", "rdma", "samples", "select", "tcp", "tuning"]
