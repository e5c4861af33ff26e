"""MQTT decoder: versions 3.1, 3.1.1 and 5.0.

Every packet is a fixed header (type and flags in one byte, then the remaining length
as a variable-length integer) and a body, so capture gaps inside a packet are stepped
over.  The version comes from CONNECT (a connection joined later is read as 3.1.1).

Exchanges (the client's request and the server's acknowledgement):

* ``CONNECT`` → CONNACK: ``target`` the client id; ``attributes``: ``version``,
  ``clean_start``, ``keep_alive``, ``username`` (never the password), ``session_present``;
* ``PUBLISH`` from the client: QoS 0 gets no answer (``status`` None); QoS 1 → PUBACK,
  QoS 2 → PUBREC (then ``PUBREL`` → PUBCOMP, a second exchange), paired by packet id;
  ``target`` the topic, ``attributes``: ``qos``, ``retain``, ``dup``, ``payload_bytes``;
* ``SUBSCRIBE`` → SUBACK and ``UNSUBSCRIBE`` → UNSUBACK, by packet id: ``target`` the
  first topic filter, ``topics`` (count), ``granted`` (QoS or reason code per filter);
* ``PINGREQ`` → PINGRESP, in order.

A PUBLISH from the server (a message delivered to a subscriber) answers nothing: it
is reported on its own (``push``: true, like Redis pub/sub messages), and the
client's acknowledgements of deliveries are not exchanges.  ``error`` is set for a
refused CONNECT, a failed subscription (0x80), and MQTT 5 reason codes ≥ 0x80 (the
code is in ``reason_code``, its name in ``error_message``); a server's DISCONNECT
with such a code (MQTT 5) is reported as an error push.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.framing import Framer

__all__ = ["MqttDecoder"]

#: Packets awaiting an answer beyond which the answering direction is deemed lost.
MAX_PENDING = 1 << 16
#: Topic bytes kept.
MAX_TOPIC = 1024

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

_NAMES = {CONNECT: "CONNECT", PUBLISH: "PUBLISH", PUBREL: "PUBREL", SUBSCRIBE: "SUBSCRIBE",
          UNSUBSCRIBE: "UNSUBSCRIBE", PINGREQ: "PINGREQ", DISCONNECT: "DISCONNECT"}
# Request type → the type that answers it.
_ANSWERS = {CONNECT: CONNACK, PUBREL: PUBCOMP, SUBSCRIBE: SUBACK, UNSUBSCRIBE: UNSUBACK, PINGREQ: PINGRESP}
_CONNACK_3 = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
              4: "bad user name or password", 5: "not authorized"}
_REASONS_5 = {
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error", 0x83: "implementation specific error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned",
    0x8B: "server shutting down", 0x8C: "bad authentication method", 0x8D: "keep alive timeout",
    0x8E: "session taken over", 0x8F: "topic filter invalid", 0x90: "topic name invalid",
    0x91: "packet identifier in use", 0x92: "packet identifier not found", 0x93: "receive maximum exceeded",
    0x94: "topic alias invalid", 0x95: "packet too large", 0x96: "message rate too high", 0x97: "quota exceeded",
    0x98: "administrative action", 0x99: "payload format invalid", 0x9A: "retain not supported",
    0x9B: "QoS not supported", 0x9C: "use another server", 0x9D: "server moved",
    0x9E: "shared subscriptions not supported", 0x9F: "connection rate exceeded", 0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported", 0xA2: "wildcard subscriptions not supported",
}
_PROTOCOL_NAMES = {b"\x00\x04MQTT": (4, 5), b"\x00\x06MQIsdp": (3,)}
_TOPIC_BYTES = bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A variable-length integer at ``pos``: (value, position after it); (-1, pos) when cut."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            return -1, pos
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise Undecodable("mqtt: variable-length integer longer than 4 bytes")


def _string(buf: bytes, pos: int) -> tuple[bytes, int]:
    length = buf[pos] << 8 | buf[pos + 1]
    return buf[pos + 2:pos + 2 + length], pos + 2 + length


class _Packets(Framer):
    keep = 2048
    max_header = 5

    def header(self, buf: bytes, pos: int, end: int) -> int:
        kind = buf[pos] >> 4
        if kind == 0:
            raise Undecodable("mqtt: packet type 0 is reserved")
        length, body = _varint(buf, pos + 1, end)
        return -1 if length < 0 else body - pos + length


class _Pending:
    __slots__ = ("kind", "method", "target", "attrs", "start", "end", "nbytes", "truncated")

    def __init__(self, kind: int, target: str, attrs: dict[str, Any], start: int, end: int, nbytes: int,
                 truncated: bool) -> None:
        self.kind = kind
        self.method = _NAMES[kind]
        self.target = target
        self.attrs = attrs
        self.start = start
        self.end = end
        self.nbytes = nbytes
        self.truncated = truncated


class MqttDecoder(Decoder):
    """MQTT packets of one connection."""

    protocol = "mqtt"
    default_ports = (1883,)

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            if len(data) < 2:
                return False
            kind, flags = data[0] >> 4, data[0] & 0x0F
            length, pos = _varint(data, 1, min(len(data), 5))
            if length < 0 or (pos + length < len(data) and kind != PUBLISH):
                return False
            if direction is Direction.REQUEST:
                if kind == CONNECT:
                    versions = _PROTOCOL_NAMES.get(data[pos:pos + 6]) or _PROTOCOL_NAMES.get(data[pos:pos + 8])
                    if versions is None:
                        return False
                    level = data[pos + 6] if data[pos + 2:pos + 6] == b"MQTT" else data[pos + 8]
                    return flags == 0 and level in versions
                if kind == SUBSCRIBE:
                    return flags == 2 and length >= 5
                return kind == PUBLISH and _plausible_publish(data, pos, length, flags)
            if kind == CONNACK:
                return flags == 0 and length in (2,) or (flags == 0 and 3 <= length < 1024)
            if kind == SUBACK:
                return flags == 0 and length >= 3 and pos + length == len(data)
            return kind == PUBLISH and _plausible_publish(data, pos, length, flags)
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    def __init__(self) -> None:
        self._framers = {Direction.REQUEST: _Packets(), Direction.RESPONSE: _Packets()}
        self._version = 4
        self._by_id: dict[tuple[int, int], _Pending] = {}  # (answer type, packet id) → request
        self._in_order: deque[_Pending] = deque()  # CONNECT, PINGREQ: answered in order
        self._released: dict[int, str] = {}  # QoS 2 packet id → topic, from PUBREC to PUBREL
        self._out: list[Exchange] = []
        #: Acknowledgements that answered nothing seen (the capture started mid-stream).
        self.orphan_answers = 0

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        self._out = out = []
        try:
            direction = chunk.direction
            request = direction is Direction.REQUEST
            for head, size, ts0, ts1, truncated in self._framers[direction].feed(chunk.data, chunk.size,
                                                                                 chunk.ts_ns):
                if request:
                    self._on_request(head, size, ts0, ts1, truncated)
                else:
                    self._on_response(head, size, ts0, ts1, truncated)
            if len(self._by_id) + len(self._in_order) + len(self._released) > MAX_PENDING:
                raise Undecodable(f"mqtt: over {MAX_PENDING} packets without an answer")
        except Undecodable:
            raise
        except Exception as exc:  # a slip on malformed bytes: stop decoding, never crash the caller
            raise Undecodable(f"mqtt: malformed packet ({type(exc).__name__}: {exc})") from None
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        self._out = []
        waiting = sorted([*self._in_order, *self._by_id.values()], key=lambda p: p.start)
        for pending in waiting:
            self._emit(pending, None, None, None, 0, False, None)
        self._by_id.clear()
        self._in_order.clear()
        return self._out

    # ------------------------------------------------------------------ client → server

    def _on_request(self, p: bytes, size: int, ts0: int, ts1: int, truncated: bool) -> None:
        kind, flags = p[0] >> 4, p[0] & 0x0F
        _, pos = _varint(p, 1, 5)
        if kind == PUBLISH:
            topic, packet_id, attrs = self._publish(p, pos, size, flags)
            pending = _Pending(PUBLISH, topic, attrs, ts0, ts1, size, truncated)
            qos = attrs["qos"]
            if qos == 0:
                self._emit(pending, None, None, None, 0, False, None)
            else:
                self._by_id[(PUBACK if qos == 1 else PUBREC, packet_id)] = pending
        elif kind == SUBSCRIBE or kind == UNSUBSCRIBE:
            packet_id = p[pos] << 8 | p[pos + 1]
            pos += 2
            if self._version == 5:
                props, pos = _varint(p, pos, len(p))
                pos += props
            filters = []
            while pos + 2 <= len(p):
                topic, pos = _string(p, pos)
                filters.append(topic)
                if kind == SUBSCRIBE:
                    pos += 1  # options
            attrs = {"topics": len(filters)}
            target = filters[0][:MAX_TOPIC].decode("utf-8", "replace") if filters else ""
            self._by_id[(_ANSWERS[kind], packet_id)] = _Pending(kind, target, attrs, ts0, ts1, size, truncated)
        elif kind == PUBREL:
            packet_id = p[pos] << 8 | p[pos + 1]
            topic = self._released.pop(packet_id, "")
            self._by_id[(PUBCOMP, packet_id)] = _Pending(PUBREL, topic, {}, ts0, ts1, size, truncated)
        elif kind == PINGREQ:
            self._in_order.append(_Pending(PINGREQ, "", {}, ts0, ts1, size, truncated))
        elif kind == CONNECT:
            self._in_order.append(self._connect(p, pos, ts0, ts1, size, truncated))
        elif kind in (PUBACK, PUBREC, PUBCOMP, DISCONNECT, AUTH):
            return  # acknowledging a delivery, leaving, re-authenticating: no exchange
        else:
            raise Undecodable(f"mqtt: packet type {kind} from the client")

    def _connect(self, p: bytes, pos: int, ts0: int, ts1: int, size: int, truncated: bool) -> _Pending:
        name, pos = _string(p, pos)
        level = p[pos]
        flags = p[pos + 1]
        keep_alive = p[pos + 2] << 8 | p[pos + 3]
        pos += 4
        self._version = 5 if level == 5 else 4
        if level == 5:
            props, pos = _varint(p, pos, len(p))
            pos += props
        client_id, pos = _string(p, pos)
        if flags & 0x04:  # will: properties (5), topic, payload
            if level == 5:
                props, pos = _varint(p, pos, len(p))
                pos += props
            _, pos = _string(p, pos)
            _, pos = _string(p, pos)
        attrs: dict[str, Any] = {"version": {3: "3.1", 4: "3.1.1", 5: "5.0"}.get(level, str(level)),
                                 "clean_start": bool(flags & 0x02), "keep_alive": keep_alive}
        if flags & 0x80 and pos + 2 <= len(p):
            user, pos = _string(p, pos)
            attrs["username"] = user.decode("utf-8", "replace")
        return _Pending(CONNECT, client_id.decode("utf-8", "replace"), attrs, ts0, ts1, size, truncated)

    def _publish(self, p: bytes, pos: int, size: int, flags: int) -> tuple[str, int, dict[str, Any]]:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise Undecodable("mqtt: PUBLISH with QoS 3")
        topic, pos = _string(p, pos)
        packet_id = 0
        if qos:
            packet_id = p[pos] << 8 | p[pos + 1]
            pos += 2
        if self._version == 5 and pos < len(p):
            props, pos = _varint(p, pos, len(p))
            pos += props
        attrs: dict[str, Any] = {"qos": qos, "payload_bytes": max(size - pos, 0)}
        if flags & 1:
            attrs["retain"] = True
        if flags & 8:
            attrs["dup"] = True
        return topic[:MAX_TOPIC].decode("utf-8", "replace"), packet_id, attrs

    # ------------------------------------------------------------------ server → client

    def _on_response(self, p: bytes, size: int, ts0: int, ts1: int, truncated: bool) -> None:
        kind, flags = p[0] >> 4, p[0] & 0x0F
        _, pos = _varint(p, 1, 5)
        if kind == PUBLISH:  # a message delivered to this client
            topic, _, attrs = self._publish(p, pos, size, flags)
            attrs["push"] = True
            self._out.append(Exchange("mqtt", "PUBLISH", topic, "OK", False, ts0, ts0, ts0, ts1, 0, size, None,
                                      attrs))
            return
        if kind in (CONNACK, PINGRESP):
            if not self._in_order or self._in_order[0].kind != (CONNECT if kind == CONNACK else PINGREQ):
                self.orphan_answers += 1
                return
            pending = self._in_order.popleft()
            code = None
            if kind == CONNACK:
                pending.attrs["session_present"] = bool(p[pos] & 1) if pos < len(p) else False
                code = p[pos + 1] if pos + 1 < len(p) else 0
            self._emit(pending, code, ts0, ts1, size, truncated, CONNACK if kind == CONNACK else None)
            return
        if kind in (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK):
            packet_id = p[pos] << 8 | p[pos + 1]
            pending = self._by_id.pop((kind, packet_id), None)
            if pending is None:
                self.orphan_answers += 1
                return
            pos += 2
            code = None
            if kind == SUBACK or (kind == UNSUBACK and self._version == 5):
                if self._version == 5:
                    props, pos = _varint(p, pos, len(p))
                    pos += props
                granted = list(p[pos:pos + 64])
                pending.attrs["granted"] = granted
                failed = [g for g in granted if g >= 0x80]
                code = failed[0] if failed else 0
            elif self._version == 5 and pos < len(p):
                code = p[pos]
            if kind == PUBREC:
                self._released[packet_id] = pending.target
            self._emit(pending, code, ts0, ts1, size, truncated, kind)
            return
        if kind == DISCONNECT and self._version == 5 and pos < len(p) and p[pos] >= 0x80:
            code = p[pos]
            self._out.append(Exchange("mqtt", "DISCONNECT", "", "ERR", True, ts0, ts0, ts0, ts1, 0, size,
                                      _REASONS_5.get(code, f"reason code 0x{code:02x}"),
                                      {"push": True, "reason_code": code}))
            return
        if kind in (PUBREL, DISCONNECT, AUTH):
            return
        raise Undecodable(f"mqtt: packet type {kind} from the server")

    def _emit(self, pending: _Pending, code: int | None, ts0: int | None, ts1: int | None, size: int,
              truncated: bool, answer: int | None) -> None:
        attrs = pending.attrs
        status: str | None = None
        error = False
        message = None
        if ts0 is not None:
            status = "OK"
            if code is not None:
                if answer == CONNACK and self._version != 5:
                    error = code != 0
                    if error:
                        message = _CONNACK_3.get(code, f"return code {code}")
                else:
                    error = code >= 0x80
                    if error:
                        message = _REASONS_5.get(code, f"reason code 0x{code:02x}")
                        if answer == SUBACK and self._version != 5:
                            message = "subscription refused"
                if code:
                    attrs["reason_code"] = code
            if error:
                status = "ERR"
        if pending.truncated or truncated:
            attrs["truncated"] = True
        self._out.append(Exchange("mqtt", pending.method, pending.target, status, error, pending.start, pending.end,
                                  ts0, ts1, pending.nbytes, size, message, attrs))


def _plausible_publish(data: bytes, pos: int, length: int, flags: int) -> bool:
    """detect(): a PUBLISH whose topic is printable text."""
    if (flags >> 1) & 3 == 3 or length < 3 or pos + 2 > len(data):
        return False
    topic_length = data[pos] << 8 | data[pos + 1]
    if topic_length == 0 or topic_length + 2 > length:
        return False
    topic = data[pos + 2:pos + 2 + min(topic_length, 256)]
    return len(topic) > 0 and not topic.translate(None, _TOPIC_BYTES)
