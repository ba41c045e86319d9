"""Metrics, logs, traces, health and SLA guard: what operators see of the agent."""
