"""OpenTelemetry sink: exchanges become spans; exchanges and connections feed metrics.

Exported over OTLP/HTTP (protobuf) to ``URL/v1/traces`` and ``URL/v1/metrics``
with the OpenTelemetry SDK's exporters (retries with backoff on 429/502/503/504
and connection errors, within ``timeout``).

Threads and queues, so that a slow or absent collector never slows the pipeline::

    handle()  ──►  our bounded queue  ──►  worker thread  ──►  BatchSpanProcessor queue  ──►  exporter thread
    (pipeline      (full: counted,         (builds spans,      (full: counted,               (HTTP, retries;
     thread)        dropped)                records metrics)    dropped)                      failure: counted)

Spans are built as :class:`~opentelemetry.sdk.trace.ReadableSpan` directly
rather than through one ``TracerProvider`` per service: the observed services
need different Resources, a provider's Resource is fixed, and every provider
registers process-wide ``atexit`` and ``at_fork`` hooks that cannot be
unregistered (a bounded LRU of providers would leak one hook per eviction).
All spans, whatever their Resource, go through one BatchSpanProcessor and
one exporter, whose encoder groups each batch by Resource: batching is kept
and there is one export pipeline, one thread, one connection.  See docs/otlp.md.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import attrs
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExportResult,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from deetune import __version__
from deetune.events import ConnectionEvent, Event, ExchangeEvent
from deetune.sinks.base import Sink, SinkError

log = logging.getLogger("deetune.sinks.otlp")

DEFAULT_ENDPOINT = "http://127.0.0.1:4318"

#: Histogram bucket bounds (seconds) of the duration metrics: the HTTP/DB semantic
#: conventions' advice (5 ms … 10 s) preceded by sub-millisecond bounds, since what
#: an eBPF agent sees is often loopback or same-zone traffic.
DURATION_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)

#: Methods the HTTP semantic conventions know; others become ``_OTHER``.
HTTP_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})

#: Protocols mapped to the database semantic conventions (``db.system``).
DB_SYSTEMS = {"redis": "redis", "mysql": "mysql"}

#: Connections whose current MySQL database is remembered (for ``db.namespace``).
MAX_TRACKED_CONNECTIONS = 65536

#: Seconds between two "dropped so far" warnings.
DROP_REPORT_INTERVAL = 10.0

_USE_STATEMENT = re.compile(r"\s*use\s+`?([^`;\s]+)`?\s*;?\s*$", re.IGNORECASE)
_PROPAGATOR = TraceContextTextMapPropagator()
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_COMPRESSIONS = {"gzip": Compression.Gzip, "deflate": Compression.Deflate, "none": Compression.NoCompression}


# ---------------------------------------------------------------------------------- configuration
def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.define
class OtlpConfig:
    """Settings of the OTLP sink (``otlp:URL,key=value,…`` on the command line)."""

    #: Base URL of the collector's OTLP/HTTP receiver; ``/v1/traces`` and ``/v1/metrics`` are appended.
    endpoint: str = DEFAULT_ENDPOINT
    #: Seconds between metric exports.
    metric_interval: float = attrs.field(default=10.0, validator=_positive)
    #: Seconds one export may take, retries and backoff included.
    timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Events waiting for the worker; beyond, events are dropped (counted).
    queue_size: int = attrs.field(default=16384, validator=_positive)
    #: Spans waiting for export in the SDK's BatchSpanProcessor; beyond, spans are dropped (counted).
    span_queue_size: int = attrs.field(default=8192, validator=_positive)
    #: Spans per export request.
    batch_size: int = attrs.field(default=512, validator=_positive)
    #: Seconds the batch processor waits to fill a batch.
    schedule_delay: float = attrs.field(default=1.0, validator=_positive)
    #: ``gzip``, ``deflate`` or ``none``.
    compression: str = attrs.field(default="gzip", validator=attrs.validators.in_(tuple(_COMPRESSIONS)))
    #: Seconds :meth:`OtlpSink.close` (and :meth:`OtlpSink.flush` by default) may take.
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    #: Resources (one per observed service and process) kept; the least recently used is evicted beyond.
    max_resources: int = attrs.field(default=256, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.batch_size > self.span_queue_size:
            raise ValueError(f"batch ({self.batch_size}) cannot exceed span_queue ({self.span_queue_size})")
        self.endpoint = _normalize_endpoint(self.endpoint)


#: Spec keys → (config field, type).
SPEC_KEYS: dict[str, tuple[str, type]] = {
    "interval": ("metric_interval", float),
    "timeout": ("timeout", float),
    "queue": ("queue_size", int),
    "span_queue": ("span_queue_size", int),
    "batch": ("batch_size", int),
    "delay": ("schedule_delay", float),
    "compression": ("compression", str),
    "close_timeout": ("close_timeout", float),
    "resources": ("max_resources", int),
}


def _normalize_endpoint(url: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must be an http:// or https:// URL with a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"bad port in endpoint {url!r}") from None
    base = url.strip().rstrip("/")
    for suffix in ("/v1/traces", "/v1/metrics"):  # a signal URL given as the base: use its base
        base = base.removesuffix(suffix)
    return base


def parse_spec(arg: str | None) -> OtlpConfig:
    """``"http://collector:4318,interval=15,compression=none"`` → config.

    The URL may be omitted (``"interval=5"`` or no argument): then
    ``$OTEL_EXPORTER_OTLP_ENDPOINT``, else :data:`DEFAULT_ENDPOINT`.
    """
    endpoint = None
    items: list[str] = []
    if arg:
        items = [item.strip() for item in arg.split(",")]
        if "://" in items[0] or "=" not in items[0]:
            endpoint = items.pop(0)
    kwargs: dict[str, Any] = {"endpoint": endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise SinkError(f"otlp sink: unknown option {item!r} (known: {', '.join(SPEC_KEYS)})")
        field, kind = SPEC_KEYS[key]
        try:
            kwargs[field] = kind(value)
        except ValueError:
            raise SinkError(f"otlp sink: {key} needs a {kind.__name__}, got {value!r}") from None
    try:
        return OtlpConfig(**kwargs)
    except ValueError as exc:
        raise SinkError(f"otlp sink: {exc}") from None


# ---------------------------------------------------------------------------------- counters
@attrs.define
class OtlpStats:
    """What the sink did with what it was given.  ``dropped`` is the total lost."""

    #: Exchange and connection events accepted into the queue.
    events: int = 0
    #: Events refused because the queue was full (or the sink closed).
    queue_dropped: int = 0
    #: Spans built and handed to the SDK's batch processor.
    spans: int = 0
    #: Spans the batch processor dropped because its queue was full.
    span_queue_dropped: int = 0
    #: Spans the collector accepted.
    spans_exported: int = 0
    #: Spans whose export failed for good (non-retryable status, retries or timeout exhausted).
    spans_failed: int = 0
    #: At close: events and spans still queued or in flight when the close timeout ran out.
    abandoned: int = 0
    #: Metric export requests that succeeded / failed (metrics are cumulative: a later success carries the totals).
    metric_exports: int = 0
    metric_exports_failed: int = 0
    #: Events the sink failed to convert (a bug; logged).
    errors: int = 0
    #: Resources evicted from the LRU (rebuilt when their service shows up again).
    resources_evicted: int = 0

    @property
    def dropped(self) -> int:
        return self.queue_dropped + self.span_queue_dropped + self.spans_failed + self.abandoned

    def summary(self) -> str:
        return (
            f"{self.spans_exported}/{self.spans} spans exported, {self.dropped} dropped "
            f"(queue full {self.queue_dropped}, span queue full {self.span_queue_dropped}, "
            f"export failed {self.spans_failed}, abandoned at close {self.abandoned}); "
            f"metric exports {self.metric_exports} ok, {self.metric_exports_failed} failed"
        )


# ---------------------------------------------------------------------------------- span encoding
# The SDK's encoder (``encode_spans``) builds a protobuf object per span, attribute and value: about
# 45 µs per span here, more than the rest of the agent spends on an exchange, and on the GIL the
# pipeline needs.  At 10,000 requests/s its export thread fell behind a fast collector and the span
# queue overflowed.  This writes the same ExportTraceServiceRequest in the protobuf wire format
# directly (about 12 µs per span), for the spans this sink builds; anything else is left to the SDK.


class _Unencodable(Exception):
    """A span this encoder does not write (events, links, dropped attributes, odd values): the SDK's encoder does."""


_DOUBLE = struct.Struct("<d").pack
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_SPAN_KINDS = {SpanKind.INTERNAL: b"\x30\x01", SpanKind.SERVER: b"\x30\x02", SpanKind.CLIENT: b"\x30\x03",
               SpanKind.PRODUCER: b"\x30\x04", SpanKind.CONSUMER: b"\x30\x05"}
_FLAGS_LOCAL = b"\x85\x01" + _FIXED32(0x100)  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE_PARENT = b"\x85\x01" + _FIXED32(0x300)  # … | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
#: Encoded KeyValue messages by (key, type, value): most attribute values repeat from span to span.
_KEY_VALUES: dict[tuple[str, type, Any], bytes] = {}
_KEY_VALUES_MAX = 8192


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    """An AnyValue message (the oneof member is written even when it is the default, as the SDK does)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode("utf-8"))
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise _Unencodable(f"integer out of int64 range: {value}")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    raise _Unencodable(f"attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue message's bytes, without its tag and length."""
    if type(value) is float:  # not cached: -0.0 == 0.0, nan != nan
        return _field(b"\x0a", key.encode("utf-8")) + _field(b"\x12", _any_value(value))
    cache_key = (key, type(value), value)
    data = _KEY_VALUES.get(cache_key)
    if data is None:
        data = _field(b"\x0a", key.encode("utf-8")) + _field(b"\x12", _any_value(value))
        if len(_KEY_VALUES) >= _KEY_VALUES_MAX:
            _KEY_VALUES.clear()
        _KEY_VALUES[cache_key] = data
    return data


def _attributes(tag: bytes, attributes: Any) -> bytes:
    """A repeated KeyValue field."""
    if not attributes:
        return b""
    return b"".join(_field(tag, _key_value(key, value)) for key, value in attributes.items())


def _encode_span(span: ReadableSpan) -> bytes:
    if span.events or span.links or span.dropped_attributes:
        raise _Unencodable("span with events, links or dropped attributes")
    context = span.context
    parent = span.parent
    parts = [b"\x0a\x10" + context.trace_id.to_bytes(16, "big"), b"\x12\x08" + context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode("utf-8")))
    if parent:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(_field(b"\x2a", span.name.encode("utf-8")))
    parts.append(_SPAN_KINDS[span.kind])
    parts.append(b"\x39" + _FIXED64(span.start_time))
    parts.append(b"\x41" + _FIXED64(span.end_time))
    parts.append(_attributes(b"\x4a", span.attributes))
    status = span.status
    description = status.description
    code = status.status_code.value
    parts.append(_field(b"\x7a", (_field(b"\x12", description.encode("utf-8")) if description else b"")
                        + (b"\x18" + _varint(code) if code else b"")))
    parts.append(_FLAGS_REMOTE_PARENT if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(parts)


def encode_span_request(spans: Any) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` of ``spans``: what the SDK's
    ``encode_spans(spans).SerializePartialToString()`` gives, parsed back to the same message, for
    the spans this sink builds (attributes of str, bool, int, float; no events or links).  Spans are
    grouped by Resource object and then by scope, in order of appearance.  Raises
    :class:`_Unencodable` for anything else."""
    groups: dict[int, tuple[Resource, dict[Any, list[bytes]]]] = {}
    try:
        for span in spans:
            resource = span.resource
            group = groups.get(id(resource))
            if group is None:
                group = groups[id(resource)] = (resource, {})
            group[1].setdefault(span.instrumentation_scope, []).append(_encode_span(span))
        out = []
        for resource, scopes in groups.values():
            body = [_field(b"\x0a", _attributes(b"\x0a", resource.attributes))]
            for scope, encoded in scopes.items():
                scope_spans = [b"\x0a\x00"]  # no scope: an empty one, as the SDK writes it
                if scope is not None:
                    scope_spans[0] = _field(b"\x0a", (_field(b"\x0a", scope.name.encode("utf-8")) if scope.name else b"")
                                            + (_field(b"\x12", scope.version.encode("utf-8")) if scope.version else b"")
                                            + _attributes(b"\x1a", scope.attributes))
                scope_spans.extend(_field(b"\x12", span) for span in encoded)
                if scope is not None and scope.schema_url:
                    scope_spans.append(_field(b"\x1a", scope.schema_url.encode("utf-8")))
                body.append(_field(b"\x12", b"".join(scope_spans)))
            if resource.schema_url:
                body.append(_field(b"\x1a", resource.schema_url.encode("utf-8")))
            out.append(_field(b"\x0a", b"".join(body)))
        return b"".join(out)
    except _Unencodable:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, OverflowError) as exc:  # e.g. lone surrogates in a str
        raise _Unencodable(str(exc)) from None


# ---------------------------------------------------------------------------------- SDK adapters
class _SpanExporter(OTLPSpanExporter):
    """The OTLP/HTTP span exporter, counting outcomes into the sink's stats.

    Batches are encoded by :func:`encode_span_request` and sent through the SDK's own HTTP client
    (compression, retries, backoff, timeout); with an SDK version that has no such client, or a
    batch that encoder does not write, the SDK's ``export`` does everything."""

    def __init__(self, stats: OtlpStats, **kwargs):
        super().__init__(**kwargs)
        self._stats = stats
        self.frozen = False  # after close: late outcomes no longer change the counters
        self._closed = False
        client = getattr(self, "_client", None)
        self._send = getattr(client, "export", None) if hasattr(self, "_max_request_size") else None

    def export(self, spans):
        if self._closed:
            result = SpanExportResult.FAILURE
        else:
            result = self._export_encoded(spans)
            if result is None:
                result = super().export(spans)
        if not self.frozen:
            if result is SpanExportResult.SUCCESS:
                self._stats.spans_exported += len(spans)
            else:
                self._stats.spans_failed += len(spans)
        return result

    def _export_encoded(self, spans) -> SpanExportResult | None:
        """Export with :func:`encode_span_request`; None when the SDK's ``export`` must do it."""
        if self._send is None or getattr(self, "_shutdown", False):
            return None
        try:
            data = encode_span_request(spans)
        except _Unencodable as exc:
            log.debug("otlp sink: batch left to the SDK's encoder: %s", exc)
            return None
        if 0 < self._max_request_size < len(data):
            log.warning("otlp sink: dropping a batch of %d spans: %d bytes exceed the request size limit (%d)",
                        len(spans), len(data), self._max_request_size)
            return SpanExportResult.FAILURE
        try:
            outcome = self._send(data)
        except Exception as exc:  # noqa: BLE001 - the SDK's client catches its own errors; anything else fails the export
            log.error("otlp sink: span export failed: %s", exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS if getattr(outcome, "success", False) else SpanExportResult.FAILURE

    def shutdown(self):
        if not self._closed:
            self._closed = True
            super().shutdown()  # also aborts a retry backoff in progress


class _MetricExporter(OTLPMetricExporter):
    def __init__(self, stats: OtlpStats, **kwargs):
        super().__init__(**kwargs)
        self._stats = stats
        self._closed = False

    def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
        if self._closed:
            result = MetricExportResult.FAILURE
        else:
            result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        if result is MetricExportResult.SUCCESS:
            self._stats.metric_exports += 1
        else:
            self._stats.metric_exports_failed += 1
        return result

    def shutdown(self, timeout_millis: float = 30_000, **kwargs):
        if not self._closed:
            self._closed = True
            super().shutdown(timeout_millis=timeout_millis, **kwargs)


class _SpanProcessor(BatchSpanProcessor):
    """BatchSpanProcessor counting the spans its full queue drops.

    The SDK drops silently (a deque with ``maxlen``) and logs; the queue is
    checked the way the SDK checks it, just before handing the span over.  Only
    the sink's worker thread calls :meth:`on_end`, so the check is exact but for
    an export popping a batch at that very moment (then a drop is over-counted).
    """

    def __init__(self, stats: OtlpStats, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats = stats
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        self._queue = queue if isinstance(queue, collections.deque) and queue.maxlen else None
        if self._queue is None:
            log.warning("this opentelemetry-sdk version hides its span queue: span queue drops show as 'abandoned'")

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= queue.maxlen:
            self._stats.span_queue_dropped += 1
        super().on_end(span)


def _bounded(calls: dict[str, Callable[[], Any]], deadline: float) -> bool:
    """Run the calls side by side in daemon threads until ``deadline`` (monotonic);
    True when all of them returned (not raised) in time.

    The SDK's ``force_flush``/``shutdown`` do not honour their timeouts while an
    export is blocked on the network (or retrying); this does: what outlives the
    deadline is left to finish, or not, in its daemon thread."""
    done: list[str] = []

    def run(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # e.g. MeterProvider.shutdown: "deadline already exceeded"
            log.debug("otlp sink: %s: %s", name, exc)
        else:
            done.append(name)

    threads = [threading.Thread(target=run, args=item, name=f"deetune-otlp-{item[0]}", daemon=True)
               for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    return len(done) == len(calls)


# ---------------------------------------------------------------------------------- mapping
def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def services(event: ExchangeEvent | ConnectionEvent) -> tuple[str, str]:
    """(client service, server service): the topology resolver's names, else the
    local process's ``comm`` and the remote ``addr:port``.  A connection of unknown
    role is named as if this side were the client."""
    local = event.comm or "unknown_service"
    remote = _endpoint(event.raddr, event.rport)
    if event.role == "server":
        return event.client_service or remote, event.server_service or local
    return event.client_service or local, event.server_service or remote


def _server_client_endpoints(event: ExchangeEvent | ConnectionEvent) -> tuple[tuple[str, int], tuple[str, int]]:
    local, remote = (event.laddr, event.lport), (event.raddr, event.rport)
    return (local, remote) if event.role == "server" else (remote, local)


def _split_host(host: str | None) -> tuple[str | None, int | None]:
    """``"example.com:8080"`` → (``"example.com"``, 8080); ``"[::1]"`` → (``"::1"``, None)."""
    if not host:
        return None, None
    host = host.strip()
    name, port = host, ""
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            name, port = host[1:end], host[end + 1 :].removeprefix(":")
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    return (name or None), (int(port) if port.isdigit() and 0 < int(port) < 65536 else None)


def _split_target(target: str) -> tuple[str, str]:
    """HTTP request target → (path, query); absolute-form targets are parsed as URLs."""
    if target.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(target)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    path, _, _ = path.partition("#")
    return path, query


def parent_context(traceparent: Any) -> SpanContext | None:
    """The remote span a W3C ``traceparent`` value names, or None when it is absent or invalid."""
    if not isinstance(traceparent, str) or not traceparent:
        return None
    context = get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
    return context if context.is_valid else None


@attrs.frozen
class SpanFields:
    """What an exchange maps to, before IDs and Resource."""

    name: str
    kind: SpanKind
    attributes: dict[str, Any]
    #: Span status: error or not, and the description (None when inferable from the attributes).
    error: bool
    description: str | None
    #: The duration histogram to record into, and its attributes (None: none).
    metric: str | None
    metric_attributes: dict[str, Any]


_KINDS = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT}


def map_exchange(event: ExchangeEvent, namespace: str | None = None) -> SpanFields:
    """Semantic-convention span name, kind, attributes and status of one exchange.

    ``namespace``: the connection's current database when known from earlier exchanges.
    """
    (server_addr, server_port), (client_addr, client_port) = _server_client_endpoints(event)
    role = event.role
    kind = _KINDS.get(role, SpanKind.INTERNAL)
    status = event.status
    attributes: dict[str, Any] = {}
    metric = None
    metric_attributes: dict[str, Any] = {}
    error_type: str | None = None
    description: str | None = None

    if event.protocol == "http":
        method = event.method
        path, query = _split_target(event.target)
        host, host_port = _split_host(event.attributes.get("host"))
        if method in HTTP_METHODS:
            name = method
            attributes["http.request.method"] = method
        else:
            name = "HTTP"
            attributes["http.request.method"] = "_OTHER"
            attributes["http.request.method_original"] = method
        attributes["url.scheme"] = "http"
        attributes["url.path"] = path
        if query:
            attributes["url.query"] = query
        address = host or server_addr
        port = host_port or server_port
        if role == "client":
            authority = event.attributes.get("host") or _endpoint(server_addr, server_port)
            attributes["url.full"] = (
                event.target if event.target.startswith(("http://", "https://"))
                else f"http://{authority}{event.target}"
            )
        if isinstance(status, int):
            attributes["http.response.status_code"] = status
            # Server spans: 5xx are errors; client spans: 4xx too (semantic conventions).
            if status >= 500 or (status >= 400 and role == "client"):
                error_type = str(status)
        elif event.error:
            error_type = "error"
        version = event.attributes.get("version")
        if version:
            attributes["network.protocol.version"] = str(version)
        if role in ("client", "server") and event.duration_ns is not None:
            metric = f"http.{role}.request.duration"
            metric_attributes = {"http.request.method": attributes["http.request.method"],
                                 "server.address": address, "server.port": port}
            if isinstance(status, int):
                metric_attributes["http.response.status_code"] = status
    elif event.protocol in DB_SYSTEMS:
        system = DB_SYSTEMS[event.protocol]
        name = event.method or event.protocol
        address, port = server_addr, server_port
        attributes["db.system"] = system
        attributes["db.system.name"] = system
        attributes["db.operation.name"] = event.method
        if system == "redis":
            text = f"{event.method} {event.target}" if event.target else event.method
        else:
            text = event.target
        if text:
            attributes["db.query.text"] = text
        database = event.attributes.get("database") or namespace
        if database:
            attributes["db.namespace"] = database
        if event.error:
            if system == "mysql" and event.attributes.get("error_code") is not None:
                error_type = str(event.attributes["error_code"])
            elif system == "redis" and event.error_message:
                error_type = event.error_message.split(None, 1)[0]
            else:
                error_type = str(status) if status is not None else "error"
            attributes["db.response.status_code"] = error_type
            description = event.error_message
        if role in ("client", "server") and event.duration_ns is not None:
            metric = "db.client.operation.duration" if role == "client" else "deetune.db.server.operation.duration"
            metric_attributes = {"db.system": system, "db.system.name": system,
                                 "db.operation.name": event.method,
                                 "server.address": address, "server.port": port}
            if database:
                metric_attributes["db.namespace"] = database
    else:  # a plugin's protocol: what is known, in deetune's namespace
        name = event.method or event.protocol
        address, port = server_addr, server_port
        attributes["network.protocol.name"] = event.protocol
        if event.method:
            attributes["deetune.operation"] = event.method
        if event.target:
            attributes["deetune.target"] = event.target
        if event.error:
            error_type = str(status) if status is not None else "error"
            description = event.error_message

    attributes["server.address"] = address
    attributes["server.port"] = port
    attributes["client.address"] = client_addr
    attributes["client.port"] = client_port
    attributes["network.peer.address"] = event.raddr
    attributes["network.peer.port"] = event.rport
    if role == "client" and event.server_service:
        attributes["peer.service"] = event.server_service
    if error_type is not None:
        attributes["error.type"] = error_type
        if metric is not None:
            metric_attributes["error.type"] = error_type
    if metric is not None:
        client_service, server_service = services(event)
        metric_attributes["deetune.client.service"] = client_service
        metric_attributes["deetune.server.service"] = server_service
    return SpanFields(name, kind, attributes, error_type is not None, description, metric, metric_attributes)


def span_times(event: ExchangeEvent) -> tuple[int, int]:
    """(start, end) in ns since the epoch: first request byte to last response byte;
    without a response, to the first response byte, else a zero-length span."""
    start = event.ts
    if event.duration_ns is not None:
        return start, start + event.duration_ns
    if event.latency_ns is not None:
        return start, start + event.latency_ns
    return start, start


# ---------------------------------------------------------------------------------- the sink
class OtlpSink(Sink):
    name = "otlp"
    description = (
        "OpenTelemetry over OTLP/HTTP: exchanges as spans, duration and connection metrics; "
        f"otlp[:URL][,key=value…] (default {DEFAULT_ENDPOINT})"
    )

    def __init__(self, config: OtlpConfig | None = None, **kwargs: Any):
        self.config = config or OtlpConfig(**kwargs)
        cfg = self.config
        self.stats = OtlpStats()
        compression = _COMPRESSIONS[cfg.compression]
        hostname = socket.gethostname()

        # Resources.  Resource.create adds telemetry.sdk.* and $OTEL_RESOURCE_ATTRIBUTES, and a
        # random service.instance.id identifying *this* process: right for the agent's own
        # metrics, wrong for the services it observes, so theirs leave it out.
        self._agent_resource = Resource.create({"service.name": "deetune", "host.name": hostname,
                                                "process.pid": os.getpid()})
        base = dict(Resource.create({"host.name": hostname}).attributes)
        for key in ("service.name", "service.instance.id", "process.pid"):
            base.pop(key, None)
        self._base_attributes = base
        self._resources: collections.OrderedDict[tuple[str, int], Resource] = collections.OrderedDict()
        self._scope = InstrumentationScope("deetune", __version__)
        self._random = random.Random()

        # Traces.
        self._span_exporter = _SpanExporter(
            self.stats, endpoint=f"{cfg.endpoint}/v1/traces", timeout=cfg.timeout, compression=compression
        )
        self._span_processor = _SpanProcessor(
            self.stats,
            self._span_exporter,
            max_queue_size=cfg.span_queue_size,
            schedule_delay_millis=cfg.schedule_delay * 1000,
            max_export_batch_size=cfg.batch_size,
            export_timeout_millis=cfg.timeout * 1000,
        )

        self._start_metrics()

        # MySQL database in use per connection, for db.namespace.
        self._databases: collections.OrderedDict[Any, str] = collections.OrderedDict()

        # The queue between handle() and the worker.
        self._queue: collections.deque[Event] = collections.deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._processed = 0
        self._closed = False
        self._stopping = False
        self._reported_drops = 0
        self._reported_at = time.monotonic()
        self._worker = threading.Thread(target=self._run, name="deetune-otlp", daemon=True)
        self._worker.start()

    def _start_metrics(self) -> None:
        """The metrics' exporter, reader, provider (with the agent's Resource) and instruments."""
        cfg = self.config
        compression = _COMPRESSIONS[cfg.compression]
        self._metric_exporter = _MetricExporter(
            self.stats, endpoint=f"{cfg.endpoint}/v1/metrics", timeout=cfg.timeout, compression=compression
        )
        self._reader = PeriodicExportingMetricReader(
            self._metric_exporter,
            export_interval_millis=cfg.metric_interval * 1000,
            export_timeout_millis=cfg.timeout * 1000,
        )
        self._meter_provider = MeterProvider(
            metric_readers=[self._reader], resource=self._agent_resource, shutdown_on_exit=False
        )
        meter = self._meter_provider.get_meter("deetune", __version__)
        histogram = meter.create_histogram
        self._durations = {
            "http.server.request.duration": histogram(
                "http.server.request.duration", unit="s", description="Duration of HTTP server requests.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S),
            "http.client.request.duration": histogram(
                "http.client.request.duration", unit="s", description="Duration of HTTP client requests.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S),
            "db.client.operation.duration": histogram(
                "db.client.operation.duration", unit="s", description="Duration of database client operations.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S),
            "deetune.db.server.operation.duration": histogram(
                "deetune.db.server.operation.duration", unit="s",
                description="Duration of database operations, seen by the database server.",
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S),
        }
        counter = meter.create_counter
        self._opened = counter("deetune.connections.opened", unit="{connection}",
                               description="TCP connections opened.")
        self._failed = counter("deetune.connections.failed", unit="{connection}",
                               description="TCP connection attempts that failed.")
        self._retransmits = counter("deetune.tcp.retransmits", unit="{segment}",
                                    description="TCP segments retransmitted, counted at connection close.")
        self._bytes_sent = counter("deetune.bytes.sent", unit="By",
                                   description="Bytes this side sent on TCP connections, counted at close.")
        self._bytes_received = counter("deetune.bytes.received", unit="By",
                                       description="Bytes this side received on TCP connections, counted at close.")

    def set_place(self, place: Any, api_port: int | None = None) -> None:
        """The agent's host name and labels (:class:`deetune.place.Place`) on every Resource it
        sends (``host.name`` and one attribute per label).  Called before the first event."""
        extra = {"host.name": place.host, **place.label_dict}
        self._base_attributes = {**self._base_attributes, **extra}
        self._resources.clear()
        self._agent_resource = self._agent_resource.merge(Resource(extra))
        self._meter_provider.shutdown(timeout_millis=1000)
        self._start_metrics()

    @classmethod
    def from_arg(cls, arg: str | None) -> OtlpSink:
        return cls(parse_spec(arg))

    @property
    def dropped(self) -> int:
        """Events and spans lost so far (queue full, export failed, abandoned at close)."""
        return self.stats.dropped

    # -- pipeline thread ------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Enqueue, never wait: a full queue drops the event (counted)."""
        if not isinstance(event, (ExchangeEvent, ConnectionEvent)):
            return
        if self._closed or len(self._queue) >= self.config.queue_size:
            self.stats.queue_dropped += 1
            return
        self._queue.append(event)
        self.stats.events += 1
        if not self._wake.is_set():
            self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything handled so far; True when done within ``timeout``
        (default: the close timeout)."""
        deadline = time.monotonic() + (self.config.close_timeout if timeout is None else timeout)
        return self._flush(deadline)

    def close(self) -> None:
        """Flush within the close timeout, then shut the exporters down.  What is still
        queued or in flight when the time is up is abandoned (counted)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.config.close_timeout
        flushed = self._flush(deadline)
        self._stopping = True
        self._wake.set()
        self._worker.join(max(deadline - time.monotonic(), 0.0))
        if not flushed:
            # The collector is slow or down: make retries stop and further exports fail at once.
            self._span_exporter.shutdown()
            self._metric_exporter.shutdown()
        remaining_ms = max(deadline - time.monotonic(), 0.0) * 1000
        _bounded({"span-shutdown": self._span_processor.shutdown,
                  "metric-shutdown": lambda: self._meter_provider.shutdown(timeout_millis=remaining_ms)}, deadline)
        # Whatever has not been accounted for now never will be.
        self._span_exporter.frozen = True
        stats = self.stats
        unsent = stats.spans - stats.spans_exported - stats.spans_failed - stats.span_queue_dropped
        stats.abandoned = len(self._queue) + max(unsent, 0)
        self._queue.clear()
        if stats.dropped or stats.metric_exports_failed or stats.errors:
            log.warning("otlp sink: %s", stats.summary())
        else:
            log.info("otlp sink: %s", stats.summary())

    # -- internals -------------------------------------------------------------------------
    def _flush(self, deadline: float) -> bool:
        target = self.stats.events
        self._wake.set()
        with self._idle:
            drained = self._idle.wait_for(
                lambda: self._processed >= target or not self._worker.is_alive(),
                max(deadline - time.monotonic(), 0.0),
            )
        if not drained:
            return False
        remaining_ms = max(deadline - time.monotonic(), 0.0) * 1000
        return _bounded({"flush-spans": self._span_processor.force_flush,
                         "flush-metrics": lambda: self._meter_provider.force_flush(remaining_ms)}, deadline)

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            while queue:
                event = queue.popleft()
                try:
                    if isinstance(event, ExchangeEvent):
                        self._on_exchange(event)
                    else:
                        self._on_connection(event)
                except Exception:
                    self.stats.errors += 1
                    log.exception("otlp sink: cannot convert a %s event", event.type)
                self._processed += 1
            with self._idle:
                self._idle.notify_all()
            self._report_drops()
            if self._stopping:
                return

    def _report_drops(self) -> None:
        dropped = self.stats.dropped
        now = time.monotonic()
        if dropped > self._reported_drops and now - self._reported_at >= DROP_REPORT_INTERVAL:
            log.warning("otlp sink: %d dropped so far: %s", dropped, self.stats.summary())
            self._reported_drops = dropped
            self._reported_at = now

    def _resource(self, service: str, pid: int) -> Resource:
        key = (service, pid)
        resource = self._resources.get(key)
        if resource is not None:
            self._resources.move_to_end(key)
            return resource
        attributes = dict(self._base_attributes)
        attributes["service.name"] = service
        attributes["process.pid"] = pid
        resource = self._resources[key] = Resource(attributes)
        if len(self._resources) > self.config.max_resources:
            self._resources.popitem(last=False)
            self.stats.resources_evicted += 1
        return resource

    def _on_exchange(self, event: ExchangeEvent) -> None:
        key = event.sock_id or (event.laddr, event.lport, event.raddr, event.rport)
        namespace = self._databases.get(key) if event.protocol == "mysql" else None
        fields = map_exchange(event, namespace)
        if event.protocol == "mysql":
            self._track_database(key, event)
        client_service, server_service = services(event)
        resource = self._resource(server_service if event.role == "server" else client_service, event.pid)
        parent = parent_context(event.attributes.get("traceparent")) if event.protocol == "http" else None
        rand = self._random.getrandbits
        trace_id = parent.trace_id if parent is not None else (rand(128) or 1)
        start, end = span_times(event)
        span = ReadableSpan(
            fields.name,
            context=SpanContext(trace_id, rand(64) or 1, is_remote=False, trace_flags=_SAMPLED),
            parent=parent,
            resource=resource,
            attributes=fields.attributes,
            kind=fields.kind,
            status=Status(StatusCode.ERROR, fields.description) if fields.error else Status(StatusCode.UNSET),
            start_time=start,
            end_time=end,
            instrumentation_scope=self._scope,
        )
        self.stats.spans += 1
        self._span_processor.on_end(span)
        if fields.metric is not None:
            self._durations[fields.metric].record(event.duration_ns / 1e9, fields.metric_attributes)

    def _track_database(self, key: Any, event: ExchangeEvent) -> None:
        if event.status != "OK":
            return
        database = None
        if event.method in ("LOGIN", "CHANGE_USER"):
            database = event.attributes.get("database")
        elif event.method == "INIT_DB":
            database = event.target or None
        elif event.method == "QUERY" and event.target[:4].lower() == "use ":
            match = _USE_STATEMENT.match(event.target)
            database = match.group(1) if match else None
        if database:
            self._databases[key] = database
            self._databases.move_to_end(key)
            if len(self._databases) > MAX_TRACKED_CONNECTIONS:
                self._databases.popitem(last=False)

    def _on_connection(self, event: ConnectionEvent) -> None:
        client_service, server_service = services(event)
        (_, server_port), _ = _server_client_endpoints(event)
        attributes = {
            "deetune.client.service": client_service,
            "deetune.server.service": server_service,
            "deetune.role": event.role,
            "server.port": server_port,
        }
        if event.phase == "open":
            self._opened.add(1, attributes)
        elif event.phase == "failed":
            self._failed.add(1, {**attributes, "error.type": event.error or "unknown"})
        elif event.phase == "close":
            self._databases.pop(event.sock_id or (event.laddr, event.lport, event.raddr, event.rport), None)
            if event.retransmits:
                self._retransmits.add(event.retransmits, attributes)
            if event.bytes_sent:
                self._bytes_sent.add(event.bytes_sent, attributes)
            if event.bytes_received:
                self._bytes_received.add(event.bytes_received, attributes)
