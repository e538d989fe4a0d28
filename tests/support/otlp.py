"""Real OTLP trace receivers on loopback: OTLP/HTTP (protobuf, ``POST /v1/traces``) and OTLP/gRPC
(the ``TraceService`` of opentelemetry-proto on a grpcio server). Both keep every span they
received, flattened to :class:`ReceivedSpan`, and the raw request bytes (for no-PII checks).

    with OtlpHttpReceiver() as otlp:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

HOST = "127.0.0.1"


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    #: The spans this one links to: (trace id, span id), in hex.
    links: tuple[tuple[str, str], ...] = ()


@dataclass
class _Store:
    spans: list[ReceivedSpan] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=tuple(
                                (link.trace_id.hex(), link.span_id.hex()) for link in span.links
                            ),
                        )
                    )
        with self.lock:
            self.raw.append(body)
            self.spans.extend(spans)


class _Receiver:
    def __init__(self) -> None:
        self._store = _Store()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._store.lock:
            return list(self._store.spans)

    def raw_bytes(self) -> bytes:
        with self._store.lock:
            return b"".join(self._store.raw)


class OtlpHttpReceiver(_Receiver):
    """``POST /v1/traces`` with an ``application/x-protobuf`` ExportTraceServiceRequest."""

    def __init__(self) -> None:
        super().__init__()
        store = self._store

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                store.add(body)
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://{HOST}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class OtlpGrpcReceiver(_Receiver):
    """The OTLP ``TraceService.Export`` on a grpcio server (plaintext, loopback)."""

    def __init__(self) -> None:
        super().__init__()
        store = self._store

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                store.add(request.SerializeToString())
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            Service(), self._server
        )
        self.port = self._server.add_insecure_port(f"{HOST}:0")
        self.endpoint = f"http://{HOST}:{self.port}"

    def __enter__(self) -> OtlpGrpcReceiver:
        self._server.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop(grace=None)
