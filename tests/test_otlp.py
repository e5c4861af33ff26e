"""The OTLP sink against a real OTLP/HTTP receiver on loopback: spans and metrics
decoded field by field, retries, a slow collector, and the live pipeline."""

from __future__ import annotations

import collections
import gzip
import http.client
import http.server
import os
import pathlib
import subprocess
import sys
import threading
import time
import zlib

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from deetune.events import ConnectionEvent, ExchangeEvent
from deetune.sinks.base import SinkError
from deetune.sinks.otlp import (
    DEFAULT_ENDPOINT,
    DURATION_BUCKETS_S,
    OtlpSink,
    parse_spec,
)

HOST = __import__("socket").gethostname()
T0 = 1_700_000_000_000_000_000  # a wall-clock time, ns

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


# ---------------------------------------------------------------------------------- receiver
class Receiver:
    """An OTLP/HTTP receiver: decodes what it gets, can fail or stall on purpose."""

    def __init__(self, *, fail: dict[str, list[int]] | None = None, delay: float = 0.0):
        #: path → statuses to answer first, one per request, before answering 200.
        self.fail = {path: list(codes) for path, codes in (fail or {}).items()}
        self.delay = delay
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        #: (path, content-encoding, status answered) per request.
        self.requests: list[tuple[str, str | None, int]] = []
        self.stop = threading.Event()
        self._cond = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                encoding = self.headers.get("Content-Encoding")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.answer(self, self.path, encoding, body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()

    def answer(self, handler, path: str, encoding: str | None, body: bytes) -> None:
        with self._cond:
            pending = self.fail.get(path)
            status = pending.pop(0) if pending else 200
        if self.delay:
            self.stop.wait(self.delay)
        if status == 200:
            if path == "/v1/traces":
                message, response = ExportTraceServiceRequest(), ExportTraceServiceResponse()
            elif path == "/v1/metrics":
                message, response = ExportMetricsServiceRequest(), ExportMetricsServiceResponse()
            else:
                status = 404
        with self._cond:
            if status == 200:
                message.ParseFromString(body)
                (self.traces if path == "/v1/traces" else self.metrics).append(message)
            self.requests.append((path, encoding, status))
            self._cond.notify_all()
        payload = response.SerializeToString() if status == 200 else b""
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/x-protobuf")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            pass  # the exporter gave up waiting

    def spans(self) -> list[tuple[dict, Span]]:
        """(resource attributes, span) for every span received."""
        with self._cond:
            return [
                (attributes(rs.resource.attributes), span)
                for request in self.traces
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]

    def wait_spans(self, count: int, timeout: float = 15.0) -> list[tuple[dict, Span]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.spans()
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} spans, got {len(found)}; requests: {self.requests}")
            with self._cond:
                self._cond.wait(0.1)

    def metric(self, name: str):
        """(resource attributes, metric) from the latest export carrying ``name`` (cumulative)."""
        with self._cond:
            for request in reversed(self.metrics):
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            if metric.name == name:
                                return attributes(rm.resource.attributes), sm.scope, metric
        raise AssertionError(f"no metric {name} received; requests: {self.requests}")

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(kvs) -> dict:
    return {kv.key: value(kv.value) for kv in kvs}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def make_sink():
    sinks = []

    def make(url, **kwargs):
        kwargs.setdefault("metric_interval", 60.0)  # exported on flush only
        kwargs.setdefault("schedule_delay", 0.2)
        sink = OtlpSink(endpoint=url, **kwargs)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


# ---------------------------------------------------------------------------------- events
def exchange(**overrides) -> ExchangeEvent:
    fields = dict(
        ts=T0, ts_mono_ns=5_000, protocol="http", pid=4242, comm="nginx", role="server",
        laddr="10.0.0.1", lport=8080, raddr="10.0.0.2", rport=51000,
        method="GET", target="/users/7?full=1&x=%20", status=200, error=False,
        latency_ns=1_500_000, duration_ns=2_000_000, request_bytes=120, response_bytes=900,
        sock_id=0x1111, attributes={"host": "api.example:8080", "version": "1.1",
                                    "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    fields.update(overrides)
    return ExchangeEvent(**fields)


def connection(phase: str, **overrides) -> ConnectionEvent:
    fields = dict(ts=T0, phase=phase, role="client", pid=77, comm="curl", laddr="10.0.0.2", lport=51000,
                  raddr="10.0.0.1", rport=8080, family=4, sock_id=0x2222)
    fields.update(overrides)
    return ConnectionEvent(**fields)


def by_name(spans, kind):
    return [(res, s) for res, s in spans if s.kind == kind]


# ---------------------------------------------------------------------------------- spec
def test_spec_parsing(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert parse_spec(None).endpoint == DEFAULT_ENDPOINT == "http://127.0.0.1:4318"
    config = parse_spec("https://collector:4318/v1/traces,interval=2.5,timeout=3,queue=10,span_queue=20,batch=5,"
                        "delay=0.5,compression=none,close_timeout=1,resources=8")
    assert (config.endpoint, config.metric_interval, config.timeout, config.queue_size, config.span_queue_size,
            config.batch_size, config.schedule_delay, config.compression, config.close_timeout,
            config.max_resources) == ("https://collector:4318", 2.5, 3.0, 10, 20, 5, 0.5, "none", 1.0, 8)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://from-env:4318/")
    assert parse_spec("interval=1").endpoint == "http://from-env:4318"
    for bad, message in [
        ("ftp://x", "http:// or https://"),
        ("http://x,color=red", "unknown option 'color=red'"),
        ("http://x,queue=many", "queue needs a int"),
        ("http://x,timeout=0", "timeout must be positive"),
        ("http://x,compression=zstd", "compression"),
        ("http://x,batch=100,span_queue=10", "batch (100) cannot exceed span_queue (10)"),
    ]:
        with pytest.raises(SinkError, match="^otlp sink: .*") as info:
            parse_spec(bad)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_registered_as_builtin():
    from deetune.plugins import Plugins

    assert Plugins().sinks.get("otlp") is OtlpSink


# ---------------------------------------------------------------------------------- spans
def test_http_server_span_joins_the_callers_trace(receiver, make_sink):
    sink = make_sink(receiver.url)
    sink.handle(exchange(server_service="api"))
    assert sink.flush(10)
    ((resource, span),) = receiver.wait_spans(1)
    assert span.name == "GET"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_ID
    assert len(span.span_id) == 8 and span.span_id.hex() != PARENT_ID
    assert span.flags & 0x300 == 0x300  # parent is remote
    assert span.start_time_unix_nano == T0
    assert span.end_time_unix_nano == T0 + 2_000_000
    assert attributes(span.attributes) == {
        "http.request.method": "GET",
        "url.scheme": "http",
        "url.path": "/users/7",
        "url.query": "full=1&x=%20",
        "http.response.status_code": 200,
        "network.protocol.version": "1.1",
        "server.address": "api.example",
        "server.port": 8080,
        "client.address": "10.0.0.2",
        "client.port": 51000,
        "network.peer.address": "10.0.0.2",
        "network.peer.port": 51000,
    }
    assert span.status.code == Status.STATUS_CODE_UNSET
    assert resource["service.name"] == "api"
    assert resource["process.pid"] == 4242
    assert resource["host.name"] == HOST
    assert resource["telemetry.sdk.name"] == "opentelemetry"
    assert resource["telemetry.sdk.language"] == "python"
    assert "service.instance.id" not in resource  # the agent's, not the service's
    assert receiver.requests[0][1] == "gzip"  # compressed by default


def test_http_client_span_and_error_status(receiver, make_sink):
    sink = make_sink(receiver.url, compression="none")
    sink.handle(exchange(role="client", comm="curl", pid=77, laddr="10.0.0.2", lport=51000, raddr="10.0.0.1",
                         rport=8080, method="POST", target="/orders", status=404, attributes={"version": "1.0"},
                         latency_ns=300_000, duration_ns=None))
    assert sink.flush(10)
    ((resource, span),) = receiver.wait_spans(1)
    assert span.name == "POST" and span.kind == Span.SPAN_KIND_CLIENT
    assert span.parent_span_id == b"" and len(span.trace_id) == 16
    assert span.flags & 0x300 == 0x100  # has no remote parent
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (T0, T0 + 300_000)  # no response end: latency
    assert attributes(span.attributes) == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "url.path": "/orders",
        "url.full": "http://10.0.0.1:8080/orders",  # no Host header: the address
        "http.response.status_code": 404,
        "network.protocol.version": "1.0",
        "server.address": "10.0.0.1",
        "server.port": 8080,
        "client.address": "10.0.0.2",
        "client.port": 51000,
        "network.peer.address": "10.0.0.1",
        "network.peer.port": 8080,
        "error.type": "404",  # 4xx is an error on the client side
    }
    assert span.status.code == Status.STATUS_CODE_ERROR and span.status.message == ""
    assert resource["service.name"] == "curl" and resource["process.pid"] == 77
    assert receiver.requests[0][1] is None


def test_redis_error_span(receiver, make_sink):
    sink = make_sink(receiver.url)
    sink.handle(exchange(protocol="redis", role="client", comm="worker", pid=9, laddr="127.0.0.1", lport=40000,
                         raddr="127.0.0.1", rport=6379, method="INCR", target="page:views", status="ERR", error=True,
                         error_message="WRONGTYPE Operation against a key holding the wrong kind of value",
                         latency_ns=90_000, duration_ns=120_000, attributes={"argc": 1, "reply_type": "error"},
                         client_service="billing", server_service="cache"))
    assert sink.flush(10)
    ((resource, span),) = receiver.wait_spans(1)
    assert span.name == "INCR" and span.kind == Span.SPAN_KIND_CLIENT
    assert (span.start_time_unix_nano, span.end_time_unix_nano) == (T0, T0 + 120_000)
    assert attributes(span.attributes) == {
        "db.system": "redis",
        "db.system.name": "redis",
        "db.operation.name": "INCR",
        "db.query.text": "INCR page:views",
        "db.response.status_code": "WRONGTYPE",
        "error.type": "WRONGTYPE",
        "server.address": "127.0.0.1",
        "server.port": 6379,
        "client.address": "127.0.0.1",
        "client.port": 40000,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": 6379,
        "peer.service": "cache",
    }
    assert span.status.code == Status.STATUS_CODE_ERROR
    assert span.status.message == "WRONGTYPE Operation against a key holding the wrong kind of value"
    assert resource["service.name"] == "billing"


def test_mysql_spans_with_namespace(receiver, make_sink):
    sink = make_sink(receiver.url)
    mysql = dict(protocol="mysql", role="client", comm="php-fpm", pid=300, laddr="127.0.0.1", lport=41000,
                 raddr="127.0.0.1", rport=3306, sock_id=0x3333, status="OK", latency_ns=50_000, duration_ns=80_000)
    sink.handle(exchange(**mysql, method="LOGIN", target="", attributes={"user": "app", "database": "shop"}))
    sink.handle(exchange(**{**mysql, "ts": T0 + 1_000_000, "status": "ERR", "error": True},
                         method="QUERY", target="SELECT * FROM nope", attributes={"error_code": 1146, "sql_state": "42S02"},
                         error_message="Table 'shop.nope' doesn't exist"))
    sink.handle(exchange(**{**mysql, "ts": T0 + 2_000_000}, method="QUERY", target="USE other", attributes={}))
    sink.handle(exchange(**{**mysql, "ts": T0 + 3_000_000}, method="QUERY", target="SELECT 1", attributes={}))
    # A server-side view of another connection, never logged in: no namespace.
    sink.handle(exchange(**{**mysql, "role": "server", "comm": "mysqld", "pid": 301, "laddr": "127.0.0.1",
                            "lport": 3306, "raddr": "127.0.0.1", "rport": 41001, "sock_id": 0x4444,
                            "ts": T0 + 4_000_000}, method="PING", target="", attributes={}))
    assert sink.flush(10)
    spans = sorted(receiver.wait_spans(5), key=lambda rs: rs[1].start_time_unix_nano)
    common = {"db.system": "mysql", "db.system.name": "mysql", "server.address": "127.0.0.1", "server.port": 3306,
              "client.address": "127.0.0.1", "client.port": 41000,
              "network.peer.address": "127.0.0.1", "network.peer.port": 3306}
    (r0, login), (r1, failed), (_, use), (_, select), (r4, ping) = spans
    assert login.name == "LOGIN" and attributes(login.attributes) == {
        **common, "db.operation.name": "LOGIN", "db.namespace": "shop"}
    assert failed.name == "QUERY" and attributes(failed.attributes) == {
        **common, "db.operation.name": "QUERY", "db.query.text": "SELECT * FROM nope", "db.namespace": "shop",
        "db.response.status_code": "1146", "error.type": "1146"}
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert failed.status.message == "Table 'shop.nope' doesn't exist"
    assert attributes(use.attributes)["db.namespace"] == "shop"  # the USE itself ran in shop
    assert attributes(select.attributes) == {
        **common, "db.operation.name": "QUERY", "db.query.text": "SELECT 1", "db.namespace": "other"}
    assert select.status.code == Status.STATUS_CODE_UNSET
    assert ping.kind == Span.SPAN_KIND_SERVER and attributes(ping.attributes) == {
        **common, "client.port": 41001, "network.peer.port": 41001, "db.operation.name": "PING"}
    assert r0["service.name"] == r1["service.name"] == "php-fpm" and r0["process.pid"] == 300
    assert r4["service.name"] == "mysqld" and r4["process.pid"] == 301
    # One batch, grouped by Resource: two resources, one request.
    assert len(receiver.traces) == 1 and len(receiver.traces[0].resource_spans) == 2


def test_other_protocols_and_odd_requests(receiver, make_sink):
    sink = make_sink(receiver.url)
    sink.handle(exchange(method="BREW", target="http://pot.example/coffee?sugar=no", status=None, latency_ns=None,
                         duration_ns=None, attributes={"traceparent": "00-zzzz-bad-01"}, sock_id=1))
    sink.handle(exchange(protocol="amqp", role="unknown", method="basic.publish", target="orders", status="ERR",
                         error=True, error_message="NOT_FOUND", attributes={}, sock_id=2, ts=T0 + 1))
    assert sink.flush(10)
    (_, brew), (_, amqp) = sorted(receiver.wait_spans(2), key=lambda rs: rs[1].start_time_unix_nano)
    assert brew.name == "HTTP" and brew.parent_span_id == b""  # invalid traceparent: a root span
    assert brew.start_time_unix_nano == brew.end_time_unix_nano == T0  # no response: zero length
    attrs = attributes(brew.attributes)
    assert attrs["http.request.method"] == "_OTHER" and attrs["http.request.method_original"] == "BREW"
    assert (attrs["url.path"], attrs["url.query"]) == ("/coffee", "sugar=no")
    assert "http.response.status_code" not in attrs and brew.status.code == Status.STATUS_CODE_UNSET
    assert amqp.name == "basic.publish" and amqp.kind == Span.SPAN_KIND_INTERNAL
    assert attributes(amqp.attributes) == {
        "network.protocol.name": "amqp", "deetune.operation": "basic.publish", "deetune.target": "orders",
        "error.type": "ERR", "server.address": "10.0.0.2", "server.port": 51000,
        "client.address": "10.0.0.1", "client.port": 8080,
        "network.peer.address": "10.0.0.2", "network.peer.port": 51000}
    assert amqp.status.message == "NOT_FOUND"


def test_resources_are_bounded(receiver, make_sink):
    sink = make_sink(receiver.url, max_resources=2)
    for pid in (1, 2, 3, 1):
        sink.handle(exchange(pid=pid, ts=T0 + pid))
    assert sink.flush(10)
    spans = receiver.wait_spans(4)
    assert sorted(res["process.pid"] for res, _ in spans) == [1, 1, 2, 3]
    assert sink.stats.resources_evicted == 2  # 1 evicted by 3, then 2 by 1's return


# ---------------------------------------------------------------------------------- span encoding
def built_spans(events) -> list:
    """The ReadableSpans the sink builds for ``events`` (taken before the batch processor)."""
    sink = OtlpSink(endpoint="http://127.0.0.1:9", metric_interval=3600, schedule_delay=3600, timeout=0.1,
                    close_timeout=0.1)
    spans = []
    sink._span_processor.on_end = spans.append
    try:
        for event in events:
            sink._on_exchange(event)
    finally:
        sink.close()
    return spans


def test_span_encoding_matches_the_sdk():
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import (
        SpanContext,
        SpanKind,
        StatusCode,
        TraceFlags,
        TraceState,
    )
    from opentelemetry.trace import Status as SdkStatus

    from deetune.sinks.otlp import encode_span_request

    events = [
        exchange(server_service="api"),  # traceparent: a remote parent
        exchange(role="client", status=503, error=True, client_service="web", server_service="api", pid=7, ts=T0 + 1),
        exchange(method="BREW", target="/é?q=ü", status=None, latency_ns=None, duration_ns=None, attributes={}, ts=T0 + 2),
        exchange(protocol="redis", method="GET", target="user:7", status="ERR", error=True,
                 error_message="WRONGTYPE Operation against a key", attributes={}, comm="redis-server", ts=T0 + 3),
        exchange(protocol="mysql", method="QUERY", target="SELECT 1", status="OK", attributes={"database": "shop"},
                 comm="mysqld", lport=3306, ts=T0 + 4),
        exchange(protocol="amqp", role="unknown", method="basic.publish", target="orders", status="ERR", error=True,
                 error_message="NOT_FOUND", attributes={}, ts=T0 + 5),
    ]
    spans = built_spans(events)
    scope = InstrumentationScope("other-scope", "1.2", "https://schema/1", {"scope.attr": "x"})
    resource = Resource({"service.name": "odd", "float": 0.25, "negative": -5, "big": 2**63 - 1, "flag": False,
                         "empty": ""}, schema_url="https://schema/resource")
    spans.append(ReadableSpan(
        "odd", context=SpanContext(2**128 - 1, 1, is_remote=False, trace_flags=TraceFlags(1),
                                   trace_state=TraceState([("vendor", "v1"), ("other", "x")])),
        parent=SpanContext(5, 6, is_remote=False), resource=resource, attributes={"f": 1.5, "b": True, "i": -1, "s": ""},
        kind=SpanKind.PRODUCER, status=SdkStatus(StatusCode.OK), start_time=1, end_time=2, instrumentation_scope=scope))
    spans.append(ReadableSpan("", context=SpanContext(3, 4, is_remote=False), resource=Resource({}),
                              kind=SpanKind.CONSUMER, start_time=0, end_time=0, instrumentation_scope=None))
    for batch in (spans, spans[:1], spans[::-1]):
        ours = ExportTraceServiceRequest.FromString(encode_span_request(batch))
        assert ours == encode_spans(batch)
    assert encode_span_request([]) == b""


def test_spans_go_through_the_sinks_encoder(receiver, make_sink, monkeypatch):
    from deetune.sinks import otlp

    encoded = []
    original = otlp.encode_span_request
    monkeypatch.setattr(otlp, "encode_span_request", lambda spans: encoded.append(len(spans)) or original(spans))
    sink = make_sink(receiver.url)
    if sink._span_exporter._send is None:
        pytest.skip("this opentelemetry-exporter-otlp-proto-http has no HTTP client of its own to send through")
    sink.handle(exchange())
    sink.handle(exchange(role="client", ts=T0 + 1))
    assert sink.flush(10)
    assert sum(encoded) == 2 and len(receiver.wait_spans(2)) == 2
    assert sink.stats.spans_exported == 2 and ("/v1/traces", "gzip", 200) in receiver.requests


def test_spans_the_encoder_cannot_write_go_through_the_sdk(receiver, make_sink):
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import SpanContext, TraceFlags

    from deetune.sinks.otlp import _Unencodable, encode_span_request

    sink = make_sink(receiver.url)
    resource = sink._resource("odd", 1)
    odd = [
        ReadableSpan("tuple", context=SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(1)), resource=resource,
                     attributes={"list": ("a", "b")}, start_time=T0, end_time=T0),
        ReadableSpan("event", context=SpanContext(2, 2, is_remote=False, trace_flags=TraceFlags(1)), resource=resource,
                     events=(Event("e", {"k": "v"}, timestamp=T0),), start_time=T0, end_time=T0),
    ]
    for span in odd:
        with pytest.raises(_Unencodable):
            encode_span_request([span])
        sink._span_processor.on_end(span)
    sink.handle(exchange())
    assert sink.flush(10)
    spans = {span.name: span for _, span in receiver.wait_spans(3)}
    assert attributes(spans["tuple"].attributes)["list"].values[1].string_value == "b"
    assert spans["event"].events[0].name == "e"
    assert spans["GET"].kind == Span.SPAN_KIND_SERVER
    assert sink.stats.spans_exported == 3 and sink.stats.spans_failed == 0


# ---------------------------------------------------------------------------------- metrics
def bucket_counts(bounds, values):
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(bounds) if v <= b), len(bounds))] += 1
    return counts


def test_duration_histograms(receiver, make_sink):
    sink = make_sink(receiver.url)
    durations_ms = [0.05, 0.3, 0.3, 2, 7, 40, 40, 900, 12_000]
    for i, ms in enumerate(durations_ms):
        sink.handle(exchange(ts=T0 + i, duration_ns=int(ms * 1_000_000), server_service="api"))
    sink.handle(exchange(status=503, error=True, duration_ns=5_000_000, server_service="api"))
    sink.handle(exchange(role="client", comm="curl", laddr="10.0.0.2", lport=51000, raddr="10.0.0.1", rport=8080,
                         duration_ns=3_000_000, attributes={}))
    sink.handle(exchange(duration_ns=None))  # no response end: a span, no sample
    for ms in (1, 3):
        sink.handle(exchange(protocol="redis", role="client", comm="worker", raddr="127.0.0.1", rport=6379,
                             method="GET", target="k", status="OK", duration_ns=int(ms * 1e6), attributes={}))
    assert sink.flush(10)

    resource, scope, metric = receiver.metric("http.server.request.duration")
    assert resource["service.name"] == "deetune" and resource["host.name"] == HOST
    assert resource["process.pid"] == os.getpid()
    assert scope.name == "deetune"
    assert metric.unit == "s"
    assert metric.histogram.aggregation_temporality == 2  # cumulative
    points = {tuple(sorted(attributes(p.attributes).items())): p for p in metric.histogram.data_points}
    base = {"http.request.method": "GET", "server.address": "api.example", "server.port": 8080,
            "deetune.client.service": "10.0.0.2:51000", "deetune.server.service": "api"}
    ok = points.pop(tuple(sorted({**base, "http.response.status_code": 200}.items())))
    assert list(ok.explicit_bounds) == list(DURATION_BUCKETS_S)
    seconds = [ms / 1000 for ms in durations_ms]
    assert ok.count == len(durations_ms)
    assert ok.sum == pytest.approx(sum(seconds))
    assert list(ok.bucket_counts) == bucket_counts(DURATION_BUCKETS_S, seconds)
    assert ok.min == pytest.approx(0.00005) and ok.max == pytest.approx(12.0)
    failed = points.pop(tuple(sorted({**base, "http.response.status_code": 503, "error.type": "503"}.items())))
    assert (failed.count, failed.sum) == (1, pytest.approx(0.005))
    assert points == {}  # the exchange without a response recorded nothing

    _, _, client = receiver.metric("http.client.request.duration")
    (point,) = client.histogram.data_points
    assert attributes(point.attributes) == {
        "http.request.method": "GET", "http.response.status_code": 200, "server.address": "10.0.0.1",
        "server.port": 8080, "deetune.client.service": "curl", "deetune.server.service": "10.0.0.1:8080"}
    assert (point.count, point.sum) == (1, pytest.approx(0.003))

    _, _, db = receiver.metric("db.client.operation.duration")
    (point,) = db.histogram.data_points
    assert attributes(point.attributes) == {
        "db.system": "redis", "db.system.name": "redis", "db.operation.name": "GET",
        "server.address": "127.0.0.1", "server.port": 6379,
        "deetune.client.service": "worker", "deetune.server.service": "127.0.0.1:6379"}
    assert (point.count, point.sum) == (2, pytest.approx(0.004))
    assert list(point.bucket_counts) == bucket_counts(DURATION_BUCKETS_S, [0.001, 0.003])


def test_connection_counters(receiver, make_sink):
    sink = make_sink(receiver.url)
    for _ in range(3):
        sink.handle(connection("open"))
    sink.handle(connection("open", role="server", comm="nginx", laddr="10.0.0.1", lport=8080, raddr="10.0.0.2",
                           rport=51000, server_service="web"))
    sink.handle(connection("failed", error="refused"))
    sink.handle(connection("failed", error="refused"))
    sink.handle(connection("failed", error="timeout"))
    sink.handle(connection("close", bytes_sent=1000, bytes_received=50_000, retransmits=2, duration_ns=10))
    sink.handle(connection("close", bytes_sent=24, bytes_received=0, retransmits=0, duration_ns=10))
    assert sink.flush(10)
    client = {"deetune.client.service": "curl", "deetune.server.service": "10.0.0.1:8080",
              "deetune.role": "client", "server.port": 8080}

    def points(name):
        _, _, metric = receiver.metric(name)
        assert metric.sum.is_monotonic and metric.sum.aggregation_temporality == 2
        return {tuple(sorted(attributes(p.attributes).items())): p.as_int for p in metric.sum.data_points}

    key = lambda d: tuple(sorted(d.items()))
    assert points("deetune.connections.opened") == {
        key(client): 3,
        key({"deetune.client.service": "10.0.0.2:51000", "deetune.server.service": "web",
             "deetune.role": "server", "server.port": 8080}): 1,
    }
    assert points("deetune.connections.failed") == {
        key({**client, "error.type": "refused"}): 2, key({**client, "error.type": "timeout"}): 1}
    assert points("deetune.tcp.retransmits") == {key(client): 2}
    assert points("deetune.bytes.sent") == {key(client): 1024}
    assert points("deetune.bytes.received") == {key(client): 50_000}
    assert receiver.metric("deetune.bytes.sent")[2].unit == "By"


def test_metrics_are_exported_periodically(receiver, make_sink):
    sink = make_sink(receiver.url, metric_interval=0.3)
    sink.handle(connection("open"))
    deadline = time.monotonic() + 10
    while not receiver.metrics:
        assert time.monotonic() < deadline, "no periodic metric export"
        time.sleep(0.05)
    assert receiver.metric("deetune.connections.opened")[2].sum.data_points[0].as_int == 1


# ---------------------------------------------------------------------------------- delivery
def test_retries_on_503_until_accepted():
    receiver = Receiver(fail={"/v1/traces": [503, 503]})
    sink = OtlpSink(endpoint=receiver.url, timeout=15, metric_interval=60, schedule_delay=0.2)
    try:
        sink.handle(exchange())
        began = time.monotonic()
        assert sink.flush(20)
        waited = time.monotonic() - began
        assert len(receiver.wait_spans(1)) == 1
        assert [r for r in receiver.requests if r[0] == "/v1/traces"] == [
            ("/v1/traces", "gzip", 503), ("/v1/traces", "gzip", 503), ("/v1/traces", "gzip", 200)]
        assert 1.6 <= waited < 6  # backoff 1 s then 2 s, ±20 % jitter
        assert (sink.stats.spans_exported, sink.stats.spans_failed, sink.dropped) == (1, 0, 0)
    finally:
        sink.close()
        receiver.close()


def test_non_retryable_status_drops_the_batch():
    receiver = Receiver(fail={"/v1/traces": [400]})
    sink = OtlpSink(endpoint=receiver.url, timeout=5, metric_interval=60, schedule_delay=0.2)
    try:
        sink.handle(exchange())
        sink.handle(exchange(ts=T0 + 1))
        assert sink.flush(10)
        assert [r[2] for r in receiver.requests if r[0] == "/v1/traces"] == [400]
        assert (sink.stats.spans, sink.stats.spans_failed, sink.dropped) == (2, 2, 2)
        sink.handle(exchange(ts=T0 + 2))  # the next batch goes through
        assert sink.flush(10)
        assert len(receiver.wait_spans(1)) == 1 and sink.stats.spans_exported == 1
    finally:
        sink.close()
        receiver.close()


def test_collector_down_counts_failures_and_close_is_bounded():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    sink = OtlpSink(endpoint=url, timeout=1, metric_interval=60, schedule_delay=0.1, close_timeout=3)
    for i in range(5):
        sink.handle(exchange(ts=T0 + i))
    began = time.monotonic()
    sink.close()
    assert time.monotonic() - began < 4
    stats = sink.stats
    assert stats.spans == 5 and stats.spans_exported == 0
    assert stats.dropped == 5 == stats.spans_failed + stats.abandoned
    assert stats.metric_exports == 0


def test_slow_collector_never_blocks_handle():
    receiver = Receiver(delay=5.0)
    sink = OtlpSink(endpoint=receiver.url, timeout=2, queue_size=1000, span_queue_size=500, batch_size=100,
                    schedule_delay=0.05, metric_interval=60, close_timeout=1)
    try:
        events = [exchange(ts=T0 + i, sock_id=i + 1) for i in range(10_000)]
        began = time.perf_counter()
        for event in events:
            sink.handle(event)
        elapsed = time.perf_counter() - began
        assert elapsed < 1.0, f"handle() of 10,000 events took {elapsed:.2f}s"
        stats = sink.stats
        assert stats.queue_dropped > 0
        assert stats.events + stats.queue_dropped == 10_000
        # The worker turns what it accepted into spans at once; the stalled exporter
        # holds one batch, the span queue 500: the rest is dropped there.
        deadline = time.monotonic() + 10
        while stats.spans < stats.events:
            assert time.monotonic() < deadline, "worker did not drain its queue"
            time.sleep(0.01)
        assert stats.span_queue_dropped >= stats.spans - 500 - 100 > 0
        assert sink.dropped >= stats.queue_dropped + stats.span_queue_dropped
        began = time.monotonic()
        sink.close()
        assert time.monotonic() - began < 2.5  # close timeout 1 s, plus thread joins
        assert stats.spans_exported == 0  # every request outlived the 2 s export timeout
        assert sink.dropped == 10_000  # each one accounted for
        assert stats.spans == stats.span_queue_dropped + stats.spans_failed + stats.abandoned
    finally:
        sink.close()
        receiver.close()


def test_events_after_close_are_dropped(receiver, make_sink):
    sink = make_sink(receiver.url)
    sink.close()
    sink.handle(exchange())
    sink.handle(exchange())
    assert sink.stats.queue_dropped == 2 and sink.dropped == 2
    sink.close()  # idempotent


# ---------------------------------------------------------------------------------- live
HTTP_SERVER = r"""
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = b"hello" if self.path.startswith("/hello") else b"missing"
        self.send_response(200 if self.path.startswith("/hello") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.mark.bpf
def test_live_http_spans_for_both_sides(receiver):
    from deetune.decoders.http import HttpDecoder
    from deetune.l7 import L7Handler
    from deetune.probes import ProbeOptions
    from deetune.probes.payload import PayloadProbe
    from deetune.probes.tcp import TcpProbe
    from tests.harness import running_pipeline

    server = subprocess.Popen([sys.executable, "-c", HTTP_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        server_comm = pathlib.Path(f"/proc/{server.pid}/comm").read_text().strip()
        my_comm = pathlib.Path("/proc/self/comm").read_text().strip()
        options = ProbeOptions(port=port)  # the sink's own exports to the receiver stay out
        sink = OtlpSink(endpoint=receiver.url, schedule_delay=0.1, metric_interval=60)
        probes = [TcpProbe(options), PayloadProbe(options, exclude_self=False)]
        with running_pipeline(probes, [L7Handler([HttpDecoder])], [sink]):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/hello?name=x", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
            assert conn.getresponse().read() == b"hello"
            conn.request("GET", "/nowhere")
            assert conn.getresponse().read() == b"missing"
            conn.close()
            spans = receiver.wait_spans(4)
        # The pipeline stopped, so the sink is closed: everything was exported.
        assert sink.stats.spans_exported == sink.stats.spans == 4 and sink.dropped == 0
    finally:
        server.kill()
        server.wait()

    seen = collections.Counter()
    for resource, span in spans:
        attrs = attributes(span.attributes)
        side = {Span.SPAN_KIND_CLIENT: "client", Span.SPAN_KIND_SERVER: "server"}[span.kind]
        seen[(side, attrs["url.path"], attrs["http.response.status_code"])] += 1
        assert span.name == "GET" and attrs["http.request.method"] == "GET"
        assert (attrs["server.address"], attrs["server.port"]) == ("127.0.0.1", port)
        assert attrs["network.protocol.version"] == "1.1"
        assert span.start_time_unix_nano < span.end_time_unix_nano
        assert abs(span.start_time_unix_nano - time.time_ns()) < 60e9
        if side == "client":
            assert (resource["process.pid"], resource["service.name"]) == (os.getpid(), my_comm)
            assert attrs["network.peer.port"] == port
        else:
            assert (resource["process.pid"], resource["service.name"]) == (server.pid, server_comm)
            assert attrs["client.port"] == attrs["network.peer.port"] != port
        if attrs["url.path"] == "/hello":
            assert attrs["url.query"] == "name=x"
            assert (span.trace_id.hex(), span.parent_span_id.hex()) == (TRACE_ID, PARENT_ID)
        else:
            assert span.parent_span_id == b""
            expected = Status.STATUS_CODE_ERROR if side == "client" else Status.STATUS_CODE_UNSET
            assert span.status.code == expected
    assert seen == {("client", "/hello", 200): 1, ("server", "/hello", 200): 1,
                    ("client", "/nowhere", 404): 1, ("server", "/nowhere", 404): 1}
