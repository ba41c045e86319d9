"""A minimal OTLP/HTTP traces endpoint for tests: what agents export, decoded."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


class OtlpReceiver:
    """A minimal OTLP/HTTP traces endpoint: decodes each POST /v1/traces protobuf body."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.got = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                receiver.requests.append(message)
                receiver.got.set()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, str, str]]:
        """(service.name, span name, trace id hex) of every received span."""
        out = []
        for request in self.requests:
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    out.extend((service, s.name, s.trace_id.hex()) for s in ss.spans)
        return out

    def kinds(self) -> dict[tuple[str, str], str]:
        """(service.name, span name) -> span kind name (SPAN_KIND_CLIENT, ...) of received spans."""
        from opentelemetry.proto.trace.v1.trace_pb2 import Span

        out = {}
        for request in self.requests:
            for rs in request.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    out.update({(service, s.name): Span.SpanKind.Name(s.kind) for s in ss.spans})
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
