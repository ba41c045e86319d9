"""Tracing: TRACE_SAMPLING drives the sampler, context crosses the handshake dict, and spans
reach a real OTLP/HTTP receiver on loopback."""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otlp_support import OtlpReceiver

from dwcp_agent.telemetry.tracing import build_provider, extract_context, inject_context, trace_ids


def provider_with_memory(config, percent, environ=None):
    exporter = InMemorySpanExporter()
    provider = build_provider(dataclasses.replace(config, trace_sampling=percent), environ=environ or {},
                              processors=(SimpleSpanProcessor(exporter),))
    return provider, exporter


def test_trace_sampling_percent_drives_the_sampler(config):
    for percent, expected in ((0.0, 0), (100.0, 200)):
        provider, exporter = provider_with_memory(config, percent)
        tracer = provider.get_tracer("t")
        for i in range(200):
            with tracer.start_as_current_span(f"migration {i}"):
                pass
        assert len(exporter.get_finished_spans()) == expected
    provider, exporter = provider_with_memory(config, 25.0)
    tracer = provider.get_tracer("t")
    for i in range(2000):
        with tracer.start_as_current_span(f"migration {i}"):
            pass
    assert 350 < len(exporter.get_finished_spans()) < 650


def test_standard_otel_sampler_variable_wins(config, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    provider, exporter = provider_with_memory(config, 0.0, environ={"OTEL_TRACES_SAMPLER": "always_on"})
    with provider.get_tracer("t").start_as_current_span("migration"):
        pass
    assert len(exporter.get_finished_spans()) == 1


def test_context_crosses_the_handshake_and_the_receiver_follows_the_sender(config):
    source, source_spans = provider_with_memory(config, 100.0)
    # The destination samples nothing on its own: it must follow the sender's decision.
    destination, destination_spans = provider_with_memory(config, 0.0)
    with source.get_tracer("src").start_as_current_span("migration") as span:
        carrier = inject_context()
        ids = trace_ids(span)
    assert set(carrier) == {"traceparent"} and ids is not None
    version, trace_id, parent_id, flags = carrier["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", *ids) and int(flags, 16) & 1  # sampled
    with destination.get_tracer("dst").start_as_current_span("receive", context=extract_context(carrier)):
        pass
    (received,) = destination_spans.get_finished_spans()
    (sent,) = source_spans.get_finished_spans()
    assert received.context.trace_id == sent.context.trace_id
    assert received.parent is not None and received.parent.span_id == sent.context.span_id


def test_untraced_migration_sends_an_empty_carrier_and_garbage_is_a_root():
    assert inject_context() == {}
    assert trace_ids() is None
    ctx = extract_context({"traceparent": "not-a-trace"})
    from opentelemetry import trace

    assert not trace.get_current_span(ctx).get_span_context().is_valid


@pytest.fixture
def otlp():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def test_spans_are_exported_over_otlp_http_when_the_endpoint_is_set(config, otlp, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "dwcp-agent-test")
    provider = build_provider(dataclasses.replace(config, trace_sampling=100.0))
    with provider.get_tracer("t").start_as_current_span("migration") as span:
        ids = trace_ids(span)
    provider.force_flush(5000)
    assert otlp.got.wait(10)
    assert otlp.spans() == [("dwcp-agent-test", "migration", ids[0])]
    provider.shutdown()


def test_no_endpoint_means_no_exporter(config, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    provider = build_provider(config)
    assert provider._active_span_processor._span_processors == ()
