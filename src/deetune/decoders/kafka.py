"""Kafka decoder: the broker protocol's request and response headers, Produce and Fetch.

Every message is a 4-byte big-endian size and a body.  A request's header carries the
API key and version, a correlation id and the client id; the response echoes the
correlation id, which pairs them (in any order).  A Produce request with ``acks=0``
gets no response: it is reported at once (``status`` None).

``method``: the API name (``Produce``, ``Fetch``, ``Metadata`` …); ``target``: the first
topic of a Produce or Fetch request (Fetch from version 13 names topics by id: the id
then, as hex); ``attributes``: ``api_version``, ``correlation_id``, ``client_id``,
``topics`` (every topic named, up to 16), ``acks``, ``error_code`` and ``error`` name
(the first non-zero error code of the response: top-level, or of a topic's partition).
``error`` is set when the response carries an error code.  Flexible versions (compact
strings and arrays, tagged fields) are read; bodies this decoder does not know are
only counted, and a body it cannot read leaves the exchange without those details
(the framing does not depend on them).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.framing import Framer

__all__ = ["KafkaDecoder"]

#: Requests awaiting a response beyond which the response direction is deemed lost.
MAX_PENDING = 1 << 16
#: Largest message believed (brokers refuse requests over socket.request.max.bytes, 100 MiB by default).
MAX_SIZE = 1 << 30
MAX_TOPICS = 16

#: API key → (name, first flexible version, highest version known).
_APIS: dict[int, tuple[str, int, int]] = {
    0: ("Produce", 9, 12), 1: ("Fetch", 12, 17), 2: ("ListOffsets", 6, 10), 3: ("Metadata", 9, 13),
    4: ("LeaderAndIsr", 4, 7), 5: ("StopReplica", 2, 4), 6: ("UpdateMetadata", 6, 8),
    7: ("ControlledShutdown", 3, 3), 8: ("OffsetCommit", 8, 9), 9: ("OffsetFetch", 6, 9),
    10: ("FindCoordinator", 3, 6), 11: ("JoinGroup", 6, 9), 12: ("Heartbeat", 4, 4), 13: ("LeaveGroup", 4, 5),
    14: ("SyncGroup", 4, 5), 15: ("DescribeGroups", 5, 6), 16: ("ListGroups", 3, 5),
    17: ("SaslHandshake", 99, 1), 18: ("ApiVersions", 3, 4), 19: ("CreateTopics", 5, 7),
    20: ("DeleteTopics", 4, 6), 21: ("DeleteRecords", 2, 2), 22: ("InitProducerId", 2, 5),
    23: ("OffsetForLeaderEpoch", 4, 4), 24: ("AddPartitionsToTxn", 3, 5), 25: ("AddOffsetsToTxn", 3, 4),
    26: ("EndTxn", 3, 5), 27: ("WriteTxnMarkers", 1, 1), 28: ("TxnOffsetCommit", 3, 5),
    29: ("DescribeAcls", 2, 3), 30: ("CreateAcls", 2, 3), 31: ("DeleteAcls", 2, 3), 32: ("DescribeConfigs", 4, 4),
    33: ("AlterConfigs", 2, 2), 34: ("AlterReplicaLogDirs", 2, 2), 35: ("DescribeLogDirs", 2, 4),
    36: ("SaslAuthenticate", 2, 2), 37: ("CreatePartitions", 2, 3), 38: ("CreateDelegationToken", 2, 3),
    39: ("RenewDelegationToken", 2, 2), 40: ("ExpireDelegationToken", 2, 2),
    41: ("DescribeDelegationToken", 2, 3), 42: ("DeleteGroups", 2, 2), 43: ("ElectLeaders", 2, 2),
    44: ("IncrementalAlterConfigs", 1, 1), 45: ("AlterPartitionReassignments", 0, 0),
    46: ("ListPartitionReassignments", 0, 0), 47: ("OffsetDelete", 99, 0), 48: ("DescribeClientQuotas", 1, 1),
    49: ("AlterClientQuotas", 1, 1), 50: ("DescribeUserScramCredentials", 0, 0),
    51: ("AlterUserScramCredentials", 0, 0), 55: ("DescribeQuorum", 0, 2), 57: ("UpdateFeatures", 0, 1),
    60: ("DescribeCluster", 0, 1), 61: ("DescribeProducers", 0, 0), 64: ("UnregisterBroker", 0, 0),
    65: ("DescribeTransactions", 0, 0), 66: ("ListTransactions", 0, 1), 67: ("AllocateProducerIds", 0, 0),
    68: ("ConsumerGroupHeartbeat", 0, 0), 69: ("ConsumerGroupDescribe", 0, 0), 71: ("GetTelemetrySubscriptions", 0, 0),
    72: ("PushTelemetry", 0, 0), 74: ("ListClientMetricsResources", 0, 0), 75: ("DescribeTopicPartitions", 0, 0),
}
_ERRORS = {
    -1: "UNKNOWN_SERVER_ERROR", 1: "OFFSET_OUT_OF_RANGE", 2: "CORRUPT_MESSAGE", 3: "UNKNOWN_TOPIC_OR_PARTITION",
    4: "INVALID_FETCH_SIZE", 5: "LEADER_NOT_AVAILABLE", 6: "NOT_LEADER_OR_FOLLOWER", 7: "REQUEST_TIMED_OUT",
    8: "BROKER_NOT_AVAILABLE", 9: "REPLICA_NOT_AVAILABLE", 10: "MESSAGE_TOO_LARGE", 13: "NETWORK_EXCEPTION",
    14: "COORDINATOR_LOAD_IN_PROGRESS", 15: "COORDINATOR_NOT_AVAILABLE", 16: "NOT_COORDINATOR",
    17: "INVALID_TOPIC_EXCEPTION", 18: "RECORD_LIST_TOO_LARGE", 19: "NOT_ENOUGH_REPLICAS",
    20: "NOT_ENOUGH_REPLICAS_AFTER_APPEND", 21: "INVALID_REQUIRED_ACKS", 22: "ILLEGAL_GENERATION",
    25: "UNKNOWN_MEMBER_ID", 27: "REBALANCE_IN_PROGRESS", 29: "TOPIC_AUTHORIZATION_FAILED",
    30: "GROUP_AUTHORIZATION_FAILED", 31: "CLUSTER_AUTHORIZATION_FAILED", 35: "UNSUPPORTED_VERSION",
    36: "TOPIC_ALREADY_EXISTS", 37: "INVALID_PARTITIONS", 41: "NOT_CONTROLLER", 42: "INVALID_REQUEST",
    47: "INVALID_PRODUCER_EPOCH", 58: "SASL_AUTHENTICATION_FAILED", 74: "FENCED_LEADER_EPOCH",
    75: "UNKNOWN_LEADER_EPOCH", 87: "RECORD_VALIDATION_FAILED", 100: "UNKNOWN_TOPIC_ID",
}
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_HEADER = struct.Struct(">hhi")
_REQUEST = Direction.REQUEST


class _Short(Exception):
    """The kept bytes end before the field."""


class _Reader:
    """A cursor over a message body; compact (flexible) or classic encodings."""

    __slots__ = ("b", "pos", "compact", "names")

    def __init__(self, b: bytes, pos: int, compact: bool, names: dict[bytes, str]) -> None:
        self.b = b
        self.pos = pos
        self.compact = compact
        self.names = names  # decoded strings by their bytes: client ids and topics repeat

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > len(self.b):
            raise _Short

    def i16(self) -> int:
        value = _I16.unpack_from(self.b, self.pos)[0]
        self.pos += 2
        return value

    def i32(self) -> int:
        value = _I32.unpack_from(self.b, self.pos)[0]
        self.pos += 4
        return value

    def uvarint(self) -> int:
        value = shift = 0
        while True:
            byte = self.b[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 28:
                raise ValueError("varint too long")

    def length(self) -> int:
        """A string/bytes/array length: -1 for null."""
        if self.compact:
            byte = self.b[self.pos]
            if byte < 0x80:  # a one-byte varint: the usual case
                self.pos += 1
                return byte - 1
            return self.uvarint() - 1
        return self.i32()

    def string(self) -> str | None:
        if self.compact:
            n = self.b[self.pos]
            if n < 0x80:
                self.pos += 1
                n -= 1
            else:
                n = self.uvarint() - 1
        else:
            n = self.i16()
        if n < 0:
            return None
        start = self.pos
        self.skip(n)
        raw = self.b[start:self.pos]
        text = self.names.get(raw)
        if text is None:
            text = raw.decode("utf-8", "replace")
            if len(self.names) < 1024:
                self.names[raw] = text
        return text

    def bytes_(self) -> None:
        n = self.length()
        if n > 0:
            self.skip(n)

    def tags(self) -> None:
        if self.compact:
            if self.b[self.pos] == 0:  # no tagged fields: the usual case
                self.pos += 1
                return
            for _ in range(self.uvarint()):
                self.uvarint()
                self.skip(self.uvarint())


def _uvarint(b: bytes, pos: int) -> tuple[int, int]:
    """An unsigned varint at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        byte = b[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise ValueError("varint too long")


def _length(b: bytes, pos: int, compact: bool) -> tuple[int, int]:
    """A string/bytes/array length (-1 for null) at ``pos``: (length, position after it)."""
    if compact:
        n = b[pos]
        if n < 0x80:  # a one-byte varint: the usual case
            return n - 1, pos + 1
        n, pos = _uvarint(b, pos)
        return n - 1, pos
    return _I32.unpack_from(b, pos)[0], pos + 4


def _skip_string(b: bytes, pos: int, compact: bool) -> int:
    """The position after a (nullable) string."""
    if compact:
        n = b[pos]
        if n < 0x80:
            pos += 1
            n -= 1
        else:
            n, pos = _uvarint(b, pos)
            n -= 1
    else:
        n = _I16.unpack_from(b, pos)[0]
        pos += 2
    if n > 0:
        pos += n
        if pos > len(b):
            raise _Short
    return pos


def _string(b: bytes, pos: int, compact: bool, names: dict[bytes, str]) -> tuple[str | None, int]:
    """A (nullable) string, decoded once per connection: (text, position after it)."""
    if compact:
        n = b[pos]
        if n < 0x80:
            pos += 1
            n -= 1
        else:
            n, pos = _uvarint(b, pos)
            n -= 1
    else:
        n = _I16.unpack_from(b, pos)[0]
        pos += 2
    if n < 0:
        return None, pos
    start = pos
    pos += n
    if pos > len(b):
        raise _Short
    raw = b[start:pos]
    text = names.get(raw)
    if text is None:
        text = raw.decode("utf-8", "replace")
        if len(names) < 1024:
            names[raw] = text
    return text, pos


def _skip_tags(b: bytes, pos: int) -> int:
    """The position after a (compact encoding's) tagged fields."""
    if b[pos] == 0:  # no tagged fields: the usual case
        return pos + 1
    count, pos = _uvarint(b, pos)
    for _ in range(count):
        _, pos = _uvarint(b, pos)
        n, pos = _uvarint(b, pos)
        pos += n
        if pos > len(b):
            raise _Short
    return pos


class _Messages(Framer):
    keep = 4096
    length_at = 0
    length_format = ">i"
    length_adds = 4
    min_size = 4 + 4
    max_size = MAX_SIZE


class _Request:
    __slots__ = ("api", "version", "correlation", "method", "target", "attrs", "start", "end", "nbytes",
                 "truncated")


class KafkaDecoder(Decoder):
    """Kafka requests and responses of one broker connection."""

    protocol = "kafka"
    default_ports = (9092,)

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        """Requests only (a response's header is a correlation id, nothing to recognise):
        a size that covers the chunk, a known API key and version, a printable client id."""
        try:
            if direction is not Direction.REQUEST or len(data) < 14:
                return False
            size = _I32.unpack_from(data)[0]
            api, version, correlation = _HEADER.unpack_from(data, 4)
            known = _APIS.get(api)
            if known is None or not 0 <= version <= known[2] or correlation < 0 or not 10 <= size < MAX_SIZE:
                return False
            if size + 4 < len(data):
                return False
            client = _I16.unpack_from(data, 12)[0]
            if client < -1 or 14 + max(client, 0) > size + 4:
                return False
            name = data[14:14 + max(client, 0)]
            return not name.translate(None, bytes(range(0x20, 0x7F)))
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    def __init__(self) -> None:
        self._framers = {Direction.REQUEST: _Messages(), Direction.RESPONSE: _Messages()}
        self._request_framer = self._framers[Direction.REQUEST]
        self._response_framer = self._framers[Direction.RESPONSE]
        self._pending: dict[int, _Request] = {}
        self._names: dict[bytes, str] = {}
        self._out: list[Exchange] = []
        #: Responses whose correlation id matched no request seen.
        self.orphan_responses = 0

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        self._out = out = []
        try:
            request = chunk.direction is _REQUEST
            on_message = self._on_request if request else self._on_response
            for head, size, ts0, ts1, truncated in (self._request_framer if request else self._response_framer).feed(
                    chunk.data, chunk.size, chunk.ts_ns):
                on_message(head, size, ts0, ts1, truncated)
            if len(self._pending) > MAX_PENDING:
                raise Undecodable(f"kafka: over {MAX_PENDING} requests without a response")
        except Undecodable:
            raise
        except Exception as exc:  # a slip on malformed bytes: stop decoding, never crash the caller
            raise Undecodable(f"kafka: malformed message ({type(exc).__name__}: {exc})") from None
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        self._out = []
        for request in sorted(self._pending.values(), key=lambda r: r.start):
            self._emit(request, None, None, None, 0, False)
        self._pending.clear()
        return self._out

    def _on_request(self, m: bytes, size: int, ts0: int, ts1: int, truncated: bool) -> None:
        if len(m) < 14:
            raise Undecodable("kafka: request shorter than its header")
        api, version, correlation = _HEADER.unpack_from(m, 4)
        known = _APIS.get(api)
        if known is None:
            raise Undecodable(f"kafka: unknown API key {api}")
        request = _Request()
        request.api, request.version, request.correlation = api, version, correlation
        request.method = known[0]
        request.target = ""
        request.start, request.end, request.nbytes, request.truncated = ts0, ts1, size, truncated
        attrs: dict[str, Any] = {"api_version": version, "correlation_id": correlation}
        request.attrs = attrs
        flexible = version >= known[1]
        names = self._names
        acks = None
        try:
            client, pos = _string(m, 12, False, names)
            if client is not None:
                attrs["client_id"] = client
            if flexible:
                pos = _skip_tags(m, pos)
            if api == 0:
                acks = _produce_request(m, pos, flexible, version, attrs, names)
            elif api == 1:
                self._fetch_request(_Reader(m, pos, flexible, names), version, attrs)
            elif api == 3 and version >= 1:
                self._metadata_request(_Reader(m, pos, flexible, names), version, attrs)
        except (_Short, IndexError, struct.error, ValueError):
            pass  # the kept prefix ends early, or a body this decoder misreads: details only
        topics = attrs.get("topics")
        if topics:
            request.target = topics[0]
        if api == 0 and acks == 0:
            self._emit(request, None, None, None, 0, False)
            return
        if correlation in self._pending:  # a client reusing an id: the earlier request went unanswered
            self._emit(self._pending.pop(correlation), None, None, None, 0, False)
        self._pending[correlation] = request

    @staticmethod
    def _fetch_request(r: _Reader, version: int, attrs: dict[str, Any]) -> None:
        r.skip(4 * 3 if version < 15 else 4 * 2)  # replica id (up to 14), max wait, min bytes
        if version >= 3:
            r.skip(4)  # max bytes
        if version >= 4:
            r.skip(1)  # isolation level
        if version >= 7:
            r.skip(8)  # session id, epoch
        topics = []
        for _ in range(min(r.length(), 4096)):
            if version >= 13:
                start = r.pos
                r.skip(16)
                topics.append(r.b[start:r.pos].hex())
            else:
                topics.append(r.string() or "")
            if len(topics) >= MAX_TOPICS:
                break
            per_partition = 4 + 8 + 4 + (4 if version >= 9 else 0) + (4 if version >= 12 else 0) + (8 if version >= 5 else 0)
            for _ in range(r.length()):
                r.skip(per_partition)
                r.tags()
            r.tags()
        attrs["topics"] = topics

    @staticmethod
    def _metadata_request(r: _Reader, version: int, attrs: dict[str, Any]) -> None:
        count = r.length()
        topics = []
        for _ in range(min(max(count, 0), MAX_TOPICS)):
            if version >= 10:
                r.skip(16)  # topic id
            topics.append(r.string() or "")
            r.tags()
        if topics:
            attrs["topics"] = topics

    def _on_response(self, m: bytes, size: int, ts0: int, ts1: int, truncated: bool) -> None:
        correlation = _I32.unpack_from(m, 4)[0]
        request = self._pending.pop(correlation, None)
        if request is None:
            self.orphan_responses += 1
            return
        known = _APIS[request.api]
        # ApiVersions answers with the classic header whatever the version (clients must read it).
        flexible = request.version >= known[1]
        error = 0
        try:
            pos = 8
            if flexible and request.api != 18:
                pos = _skip_tags(m, pos)
            if request.api == 0:
                error = _produce_response(m, pos, flexible, request.version)
            elif request.api == 1:
                error = self._fetch_response(_Reader(m, pos, flexible, self._names), request.version)
            elif request.api in _TOP_LEVEL_ERROR:
                reader = _Reader(m, pos, flexible, self._names)
                if _TOP_LEVEL_ERROR[request.api] <= request.version:
                    reader.skip(4)  # throttle time
                error = reader.i16()
        except (_Short, IndexError, struct.error, ValueError):
            pass
        if error:
            request.attrs["error_code"] = error
        self._emit(request, error, ts0, ts1, size, truncated)

    @staticmethod
    def _fetch_response(r: _Reader, version: int) -> int:
        if version >= 1:
            r.skip(4)  # throttle time
        if version >= 7:
            top = r.i16()
            r.skip(4)  # session id
            if top:
                return top
        first = 0
        for _ in range(min(r.length(), 4096)):
            if version >= 13:
                r.skip(16)
            else:
                r.string()
            for _ in range(min(r.length(), 65536)):
                r.skip(4)
                code = r.i16()
                first = first or code
                r.skip(8 + (8 if version >= 4 else 0) + (8 if version >= 5 else 0))
                if version >= 4:
                    for _ in range(max(r.length(), 0)):
                        r.skip(16)
                        r.tags()
                if version >= 11:
                    r.skip(4)  # preferred read replica
                r.bytes_()  # records
                r.tags()
            r.tags()
        return first

    def _emit(self, request: _Request, error: int | None, ts0: int | None, ts1: int | None, size: int,
              truncated: bool) -> None:
        attrs = request.attrs
        if request.truncated or truncated:
            attrs["truncated"] = True
        message = None
        status = None
        if ts0 is not None:
            status = "ERR" if error else "OK"
        if error:
            message = attrs["error"] = _ERRORS.get(error, f"error code {error}")
        self._out.append(Exchange(
            "kafka", request.method, request.target, status, bool(error), request.start, request.end, ts0, ts1,
            request.nbytes, size, message, attrs,
        ))


# APIs whose response starts with (throttle time from this version, then) an error code.
_TOP_LEVEL_ERROR = {10: 1, 11: 2, 12: 1, 13: 1, 14: 1, 17: 99, 18: 99, 22: 0, 25: 0, 26: 0, 36: 99, 60: 0}


def _produce_request(b: bytes, pos: int, compact: bool, version: int, attrs: dict[str, Any],
                     names: dict[bytes, str]) -> int:
    """A Produce request's body from ``pos``: ``acks`` and ``topics`` into ``attrs``; returns acks."""
    end = len(b)
    if version >= 3:
        pos = _skip_string(b, pos, compact)  # transactional id
    acks = _I16.unpack_from(b, pos)[0]
    attrs["acks"] = acks
    pos += 2 + 4  # timeout
    if pos > end:
        raise _Short
    topics: list[str] = []
    if compact and b[pos] < 0x80:  # a one-byte length: the usual case
        count = b[pos] - 1
        pos += 1
    else:
        count, pos = _length(b, pos, compact)
    for _ in range(min(count, 4096)):
        name, pos = _string(b, pos, compact, names)
        topics.append(name or "")
        if len(topics) >= MAX_TOPICS:
            break
        if compact and b[pos] < 0x80:  # a one-byte length: the usual case
            partitions = b[pos] - 1
            pos += 1
        else:
            partitions, pos = _length(b, pos, compact)
        for _ in range(partitions):  # index, records
            pos += 4
            if pos > end:
                raise _Short
            if compact and b[pos] < 0x80:  # a one-byte length: the usual case
                n = b[pos] - 1
                pos += 1
            else:
                n, pos = _length(b, pos, compact)
            if n > 0:
                pos += n
                if pos > end:
                    raise _Short
            if compact:
                pos = pos + 1 if b[pos] == 0 else _skip_tags(b, pos)
        if compact:
            pos = pos + 1 if b[pos] == 0 else _skip_tags(b, pos)
    attrs["topics"] = topics
    return acks


def _produce_response(b: bytes, pos: int, compact: bool, version: int) -> int:
    """A Produce response's body from ``pos``: the first non-zero error code of a partition."""
    end = len(b)
    first = 0
    after_code = 8 + (8 if version >= 2 else 0) + (8 if version >= 5 else 0)
    if compact and b[pos] < 0x80:  # a one-byte length: the usual case
        count = b[pos] - 1
        pos += 1
    else:
        count, pos = _length(b, pos, compact)
    for _ in range(min(count, 4096)):
        pos = _skip_string(b, pos, compact)
        if compact and b[pos] < 0x80:  # a one-byte length: the usual case
            partitions = b[pos] - 1
            pos += 1
        else:
            partitions, pos = _length(b, pos, compact)
        for _ in range(min(partitions, 65536)):
            code = _I16.unpack_from(b, pos + 4)[0]  # after the partition index
            first = first or code
            pos += 6 + after_code
            if pos > end:
                raise _Short
            if version >= 8:
                if compact and b[pos] < 0x80:  # a one-byte length: the usual case
                    errors = b[pos] - 1
                    pos += 1
                else:
                    errors, pos = _length(b, pos, compact)
                for _ in range(max(errors, 0)):
                    pos += 4
                    if pos > end:
                        raise _Short
                    pos = _skip_string(b, pos, compact)
                    if compact:
                        pos = _skip_tags(b, pos)
                pos = _skip_string(b, pos, compact)
            if compact:
                pos = pos + 1 if b[pos] == 0 else _skip_tags(b, pos)
        if compact:
            pos = pos + 1 if b[pos] == 0 else _skip_tags(b, pos)
    return first
