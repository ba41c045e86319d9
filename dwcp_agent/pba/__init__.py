"""PBA: measure the path (probe, active), predict its bandwidth (predictor), name its mode (mode)."""

from dwcp_agent.pba.active import ProbeResult, run_probe, run_probe_async, serve_probe, serve_probe_async
from dwcp_agent.pba.mode import ModeDetector, Thresholds, classify
from dwcp_agent.pba.predictor import Prediction, Predictor
from dwcp_agent.pba.probe import LinkMeter, LinkSample, TcpSample, read_tcp_info

__all__ = [
    "LinkMeter", "LinkSample", "ModeDetector", "Prediction", "Predictor", "ProbeResult", "TcpSample",
    "Thresholds", "classify", "read_tcp_info", "run_probe", "run_probe_async", "serve_probe",
    "serve_probe_async",
]
