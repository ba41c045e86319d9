"""Metrics, logs, traces and health: what operators see of the agent (policy lives in rollout/)."""

# The modules other packages use; the rest are internal to telemetry/.
__all__ = ["health", "logs", "metrics", "sdnotify", "tracing"]
