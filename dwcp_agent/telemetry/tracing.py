"""OpenTelemetry tracing: one migration is one trace, on the source and the destination host.

`setup_tracing(config)` installs an SDK tracer provider once per process:

* sampler: parent-based, trace-id ratio `TRACE_SAMPLING` percent for new traces (a span whose
  parent came over the wire follows the parent's decision, so both hosts keep or drop the same
  migration). An explicit standard `OTEL_TRACES_SAMPLER` wins over TRACE_SAMPLING.
* export: OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
  `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; the exporter and the batch processor read the
  other standard variables themselves (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`,
  `OTEL_BSP_SCHEDULE_DELAY`, ...). Without an endpoint spans are still created, so log lines
  carry `trace_id`/`span_id`, but nothing is exported.
* resource: `service.name` (OTEL_SERVICE_NAME wins), `service.version`, `host.name` = node id,
  plus `OTEL_RESOURCE_ATTRIBUTES`.

The trace context crosses agents in the wire handshake as a small string dict:
`inject_context()` on the sender, `extract_context(hello.trace)` on the receiver, then start the
receiver's spans with `context=`. W3C `traceparent`/`tracestate` are used whatever
`OTEL_PROPAGATORS` says, because both ends of the wire must agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dwcp_agent import __version__
from dwcp_agent.config import Config

__all__ = [
    "extract_context",
    "get_tracer",
    "inject_context",
    "make_sampler",
    "setup_tracing",
    "shutdown_tracing",
    "trace_ids",
]

TRACER_NAME = "dwcp_agent"
_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def make_sampler(percent: float, environ: Mapping[str, str] | None = None) -> Sampler | None:
    """Parent-based ratio sampler for TRACE_SAMPLING `percent` (0..100).

    None when OTEL_TRACES_SAMPLER is set: the SDK then builds the sampler from the standard
    variables itself.
    """
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_TRACES_SAMPLER"):
        return None
    return ParentBased(TraceIdRatioBased(max(0.0, min(100.0, percent)) / 100.0))


def exporter_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP endpoint traces go to, or None when export is off."""
    environ = os.environ if environ is None else environ
    return (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or None)


def build_provider(config: Config, service_name: str = "dwcp-agent",
                   environ: Mapping[str, str] | None = None,
                   processors: tuple[SpanProcessor, ...] = ()) -> TracerProvider:
    """A provider configured from `config` and the OTEL_* environment, not installed globally.

    `processors` are added after the OTLP one (tests pass an in-memory exporter's processor).
    """
    environ = os.environ if environ is None else environ
    attributes = {
        "service.name": environ.get("OTEL_SERVICE_NAME") or service_name,
        "service.version": __version__,
        "host.name": config.node_id,
    }
    provider = TracerProvider(sampler=make_sampler(config.trace_sampling, environ),
                              resource=Resource.create(attributes))
    if exporter_endpoint(environ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def setup_tracing(config: Config, service_name: str = "dwcp-agent",
                  environ: Mapping[str, str] | None = None) -> TracerProvider:
    """Install the process-wide tracer provider (first call wins; later calls return it)."""
    global _provider
    if _provider is None:
        _provider = build_provider(config, service_name, environ)
        trace.set_tracer_provider(_provider)
    return _provider


def shutdown_tracing(timeout_s: float = 5.0) -> None:
    """Flush queued spans to the collector; call once on agent stop."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def get_tracer(name: str = TRACER_NAME) -> trace.Tracer:
    """Tracer for agent spans (a no-op tracer until `setup_tracing` ran)."""
    return trace.get_tracer(name, __version__)


def inject_context(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace context of `ctx` (default: the current one) as a dict for the wire handshake.

    Empty when there is no sampled-or-not valid span, so an untraced migration sends nothing.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """Context to parent the receiver's spans on; an empty or garbled carrier gives a root context."""
    return _PROPAGATOR.extract(dict(carrier or {}))


def trace_ids(span: trace.Span | None = None) -> tuple[str, str] | None:
    """(trace_id, span_id) as hex of `span` (default: current), None when there is none."""
    ctx = (span or trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
