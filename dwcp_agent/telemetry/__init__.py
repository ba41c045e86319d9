"""Metrics, logs, traces and health: what operators see of the agent (policy lives in rollout/)."""
