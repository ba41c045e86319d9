"""AMST: adaptive multi-stream transport."""
