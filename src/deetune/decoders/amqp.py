"""AMQP 0-9-1 decoder (RabbitMQ's protocol).

A connection opens with the client's protocol header (``AMQP\\x00\\x00\\x09\\x01``);
then both sides send frames: type (1 method, 2 content header, 3 body, 8 heartbeat),
channel, payload size, payload and the frame-end octet 0xCE.  Capture gaps inside a
frame are stepped over.

Exchanges.  A synchronous method (``queue.declare``, ``basic.get``, ``channel.open``,
``connection.open`` …) is paired with the server's reply on the same channel, in
order; with its no-wait bit set it gets no reply.  ``basic.publish`` gets no reply
(``status`` None) unless the channel is in confirm mode, where the server's
``basic.ack``/``basic.nack`` for its delivery tag answers it.  ``basic.ack``,
``basic.reject`` and ``basic.nack`` from the client answer nothing (``status`` None).
``basic.deliver`` and ``basic.return`` from the server are reported on their own
(``push``: true).  A message's content (header and body frames) counts in its
exchange's bytes, and its size is ``body_size``.

``target``: the queue or exchange a method names; for a publish or a delivery the
exchange, or the routing key when the exchange is the default one ("").  ``attributes``:
``channel``, ``exchange``, ``routing_key``, ``delivery_tag``, ``body_size`` …

Errors: the server closes a channel (or the connection) when a method fails
(``channel.close`` 404 NOT_FOUND, 406 PRECONDITION_FAILED …): the method it answers
gets ``error``, ``reply_code`` and the reply text as ``error_message``; a close that
answers nothing pending is reported as an error push.  The login's credentials
(``connection.start-ok``'s response) are never kept, only the user name.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.framing import Framer

__all__ = ["AmqpDecoder"]

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_END = 0xCE
#: Requests awaiting a reply beyond which the reply direction is deemed lost.
MAX_PENDING = 1 << 16
METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8

_CLASSES = {10: "connection", 20: "channel", 40: "exchange", 50: "queue", 60: "basic", 85: "confirm", 90: "tx"}
_METHODS = {
    (10, 10): "start", (10, 11): "start-ok", (10, 20): "secure", (10, 21): "secure-ok", (10, 30): "tune",
    (10, 31): "tune-ok", (10, 40): "open", (10, 41): "open-ok", (10, 50): "close", (10, 51): "close-ok",
    (10, 60): "blocked", (10, 61): "unblocked",
    (20, 10): "open", (20, 11): "open-ok", (20, 20): "flow", (20, 21): "flow-ok", (20, 40): "close",
    (20, 41): "close-ok",
    (40, 10): "declare", (40, 11): "declare-ok", (40, 20): "delete", (40, 21): "delete-ok", (40, 30): "bind",
    (40, 31): "bind-ok", (40, 40): "unbind", (40, 51): "unbind-ok",
    (50, 10): "declare", (50, 11): "declare-ok", (50, 20): "bind", (50, 21): "bind-ok", (50, 30): "purge",
    (50, 31): "purge-ok", (50, 40): "delete", (50, 41): "delete-ok", (50, 50): "unbind", (50, 51): "unbind-ok",
    (60, 10): "qos", (60, 11): "qos-ok", (60, 20): "consume", (60, 21): "consume-ok", (60, 30): "cancel",
    (60, 31): "cancel-ok", (60, 40): "publish", (60, 50): "return", (60, 60): "deliver", (60, 70): "get",
    (60, 71): "get-ok", (60, 72): "get-empty", (60, 80): "ack", (60, 90): "reject", (60, 100): "recover-async",
    (60, 110): "recover", (60, 111): "recover-ok", (60, 120): "nack",
    (85, 10): "select", (85, 11): "select-ok",
    (90, 10): "select", (90, 11): "select-ok", (90, 20): "commit", (90, 21): "commit-ok", (90, 30): "rollback",
    (90, 31): "rollback-ok",
}
#: (class, method) → "class.method".
_NAMES = {key: f"{_CLASSES[key[0]]}.{name}" for key, name in _METHODS.items()}
# Client methods the server replies to (start-ok is answered by tune, or by a refusing close).
_SYNC = frozenset({
    (10, 11), (10, 21), (10, 40), (10, 50), (20, 10), (20, 20), (20, 40), (40, 10), (40, 20), (40, 30), (40, 40),
    (50, 10), (50, 20), (50, 30), (50, 40), (50, 50), (60, 10), (60, 20), (60, 30), (60, 70), (60, 110),
    (85, 10), (90, 10), (90, 20), (90, 30),
})
# Server methods that reply to a pending client method.
_REPLIES = frozenset({
    (10, 20), (10, 30), (10, 41), (10, 51), (20, 11), (20, 21), (20, 41), (40, 11), (40, 21), (40, 31), (40, 51),
    (50, 11), (50, 21), (50, 31), (50, 41), (50, 51), (60, 11), (60, 21), (60, 31), (60, 71), (60, 72),
    (60, 111), (85, 11), (90, 11), (90, 21), (90, 31),
})
# Where the no-wait bit is: (position of the bits octet, found by skipping these fields, bit).
# Fields: "s" short, "S" shortstr.
_NO_WAIT = {
    (40, 10): ("sSS", 4), (40, 20): ("sS", 1), (40, 30): ("sSSS", 0), (40, 40): ("sSSS", 0),
    (50, 10): ("sS", 4), (50, 20): ("sSSS", 0), (50, 30): ("sS", 0), (50, 40): ("sS", 2),
    (60, 20): ("sSS", 3), (60, 30): ("S", 0), (85, 10): ("", 0),
}
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_REQUEST = Direction.REQUEST


class _Frames(Framer):
    keep = 2048
    length_at = 3
    length_adds = 8  # type, channel, size; frame-end
    min_size = 8

    def __init__(self) -> None:
        super().__init__()
        self.special = True  # a protocol header may come first

    def header(self, buf: bytes, pos: int, end: int) -> int:
        self.special = False
        if end - pos < 8:
            self.special = True
            return 0
        if buf[pos:pos + 4] == b"AMQP":
            return 8
        return _U32_FRAME.unpack_from(buf, pos + 3)[0] + 8


_U32_FRAME = struct.Struct(">I")


def _shortstr(p: bytes, pos: int) -> tuple[str, int]:
    n = p[pos]
    return p[pos + 1:pos + 1 + n].decode("utf-8", "replace"), pos + 1 + n


def _skip(p: bytes, pos: int, fields: str) -> int:
    for field in fields:
        pos = pos + 2 if field == "s" else pos + 1 + p[pos]
    return pos


class _Pending:
    __slots__ = ("method", "target", "attrs", "start", "end", "nbytes", "resp_start", "resp_end", "resp_bytes",
                 "content", "truncated", "error", "message", "push")

    def __init__(self, method: str, target: str, attrs: dict[str, Any], start: int, end: int, nbytes: int) -> None:
        self.method = method
        self.target = target
        self.attrs = attrs
        self.start = start
        self.end = end
        self.nbytes = nbytes
        self.resp_start: int | None = None
        self.resp_end: int | None = None
        self.resp_bytes = 0
        self.content = False  # its content header and body are still coming
        self.truncated = False
        self.error = False
        self.message: str | None = None
        self.push = False


class _Content:
    """A message's content arriving on a channel after its method frame."""

    __slots__ = ("owner", "request", "left", "then")

    def __init__(self, owner: _Pending, request: bool, then) -> None:
        self.owner = owner
        self.request = request  # the bytes count as the owner's request (publish) or its response
        self.left = -1  # body bytes still to come; -1 until the header frame says
        self.then = then  # called when the content is complete


class AmqpDecoder(Decoder):
    """AMQP 0-9-1 frames of one connection."""

    protocol = "amqp"
    default_ports = (5672,)

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            if direction is Direction.REQUEST and data[:8] == PROTOCOL_HEADER:
                return True
            # A method frame (a connection joined later): type 1, its size, the frame end.
            if len(data) < 12 or data[0] != METHOD:
                return False
            size = _U32_FRAME.unpack_from(data, 3)[0]
            if size < 4 or (len(data) >= 8 + size and data[7 + size] != FRAME_END):
                return False
            return _U16.unpack_from(data, 7)[0] in _CLASSES and (
                (_U16.unpack_from(data, 7)[0], _U16.unpack_from(data, 9)[0]) in _METHODS)
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    def __init__(self) -> None:
        self._framers = {Direction.REQUEST: _Frames(), Direction.RESPONSE: _Frames()}
        self._request_framer = self._framers[Direction.REQUEST]
        self._response_framer = self._framers[Direction.RESPONSE]
        self._pending: dict[int, deque[_Pending]] = {}  # channel → sync methods awaiting a reply
        self._confirming: dict[int, int] = {}  # channel in confirm mode → publishes so far
        self._unconfirmed: dict[int, deque[tuple[int, _Pending]]] = {}  # channel → (delivery tag, publish)
        self._content: dict[tuple[bool, int], _Content] = {}  # (from the client, channel) → content
        self._count = 0
        self._out: list[Exchange] = []
        #: Replies that answered nothing seen (the capture started mid-stream).
        self.orphan_replies = 0

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        self._out = out = []
        try:
            client = chunk.direction is _REQUEST
            contents = self._content
            for f, size, ts0, ts1, truncated in (self._request_framer if client else self._response_framer).feed(
                    chunk.data, chunk.size, chunk.ts_ns):
                kind = f[0]
                if kind == 0x41 and f[:4] == b"AMQP":
                    if f != PROTOCOL_HEADER:
                        raise Undecodable(f"amqp: protocol header {f!r} is not AMQP 0-9-1")
                    continue  # the client's opening, or the server refusing another version
                channel = f[1] << 8 | f[2]
                if len(f) == size and f[-1] != FRAME_END:
                    raise Undecodable("amqp: frame without its frame-end octet")
                if kind == METHOD:
                    key = (f[7] << 8 | f[8], f[9] << 8 | f[10])
                    if key not in _METHODS:
                        raise Undecodable(f"amqp: unknown method {key[0]}.{key[1]}")
                    if client:
                        self._client_method(key, channel, f, size, ts0, ts1)
                    else:
                        self._server_method(key, channel, f, size, ts0, ts1)
                elif kind == HEADER or kind == BODY:
                    content = contents.get((client, channel))
                    if content is None:
                        continue  # content of a method seen before the capture started
                    owner = content.owner
                    if content.request:
                        owner.nbytes += size
                        owner.end = ts1
                    else:
                        owner.resp_bytes += size
                        owner.resp_end = ts1
                    if truncated:
                        owner.truncated = True
                    if kind == HEADER:
                        content.left = _U64.unpack_from(f, 11)[0]
                        owner.attrs["body_size"] = content.left
                    else:
                        content.left -= size - 8
                    if content.left <= 0:
                        del contents[(client, channel)]
                        if content.then is not None:
                            content.then(owner)
                elif kind != HEARTBEAT:
                    raise Undecodable(f"amqp: unknown frame type {kind}")
            if self._count > MAX_PENDING:
                raise Undecodable(f"amqp: over {MAX_PENDING} methods without a reply")
        except Undecodable:
            raise
        except Exception as exc:  # a slip on malformed bytes: stop decoding, never crash the caller
            raise Undecodable(f"amqp: malformed frame ({type(exc).__name__}: {exc})") from None
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        self._out = []
        waiting = [p for q in self._pending.values() for p in q]
        waiting += [p for q in self._unconfirmed.values() for _, p in q]
        for pending in sorted(waiting, key=lambda p: p.start):
            self._emit(pending)
        self._pending.clear()
        self._unconfirmed.clear()
        self._count = 0
        return self._out

    # ------------------------------------------------------------------ frames

    def _client_method(self, key: tuple[int, int], channel: int, f: bytes, size: int, ts0: int, ts1: int) -> None:
        method = _NAMES[key]
        attrs: dict[str, Any] = {"channel": channel}
        target = ""
        p = f[11:-1] if len(f) == size else f[11:]
        if key == (60, 40):  # basic.publish: reserved, exchange, routing key
            exchange, pos = _shortstr(p, 2)
            routing_key, _ = _shortstr(p, pos)
            attrs["exchange"], attrs["routing_key"] = exchange, routing_key
            publish = _Pending(method, exchange or routing_key, attrs, ts0, ts1, size)
            confirming = self._confirming
            confirmed = channel in confirming
            if confirmed:
                tag = confirming[channel] = confirming[channel] + 1
                attrs["delivery_tag"] = tag
                queue = self._unconfirmed.get(channel)
                if queue is None:
                    queue = self._unconfirmed[channel] = deque()
                queue.append((tag, publish))
                self._count += 1
            # Reported once its content is in; under confirms, once the broker confirms it.
            self._content[(True, channel)] = _Content(publish, True, None if confirmed else self._emit)
            return
        if key in ((60, 80), (60, 90), (60, 120)):  # basic.ack / reject / nack from the client
            attrs["delivery_tag"] = _U64.unpack_from(p, 0)[0]
            if len(p) > 8 and p[8] & 1 and key != (60, 90):
                attrs["multiple"] = True
            self._emit(_Pending(method, "", attrs, ts0, ts1, size))
            return
        if key == (20, 10):  # channel.open: a channel number may be reused, its old state is gone
            self._forget_channel(channel)
        if key not in _SYNC:
            return  # tune-ok, flow-ok, close-ok, recover-async …: nothing answers them
        if key[0] in (40, 50) or key == (60, 70) or key == (60, 20):  # names a queue or an exchange
            target, pos = _shortstr(p, 2)
            if key == (40, 10):
                attrs["type"], _ = _shortstr(p, pos)
            elif key in ((50, 20), (50, 50), (40, 30), (40, 40)):
                other, pos = _shortstr(p, pos)
                attrs["exchange" if key[0] == 50 else "source"] = other
                attrs["routing_key"], _ = _shortstr(p, pos)
        elif key == (10, 40):  # connection.open: the virtual host
            target, _ = _shortstr(p, 0)
        elif key == (10, 11):  # connection.start-ok: client properties, mechanism, response (credentials)
            table = struct.unpack_from(">I", p, 0)[0]
            mechanism, pos = _shortstr(p, 4 + table)
            attrs["mechanism"] = mechanism
            if mechanism == "PLAIN":
                length = struct.unpack_from(">I", p, pos)[0]
                response = p[pos + 4:pos + 4 + length].split(b"\x00")
                if len(response) == 3:
                    attrs["user"] = response[1].decode("utf-8", "replace")  # never the password
        elif key in ((10, 50), (20, 40)):
            attrs["reply_code"] = _U16.unpack_from(p, 0)[0]
        no_wait = _NO_WAIT.get(key)
        if no_wait is not None:
            bits = p[_skip(p, 0, no_wait[0])] if no_wait[0] else p[0]
            if bits >> no_wait[1] & 1:
                attrs["no_wait"] = True
                self._emit(_Pending(method, target, attrs, ts0, ts1, size))
                if key == (85, 10):
                    self._confirming.setdefault(channel, 0)
                return
        self._pending.setdefault(channel, deque()).append(_Pending(method, target, attrs, ts0, ts1, size))
        self._count += 1

    def _server_method(self, key: tuple[int, int], channel: int, f: bytes, size: int, ts0: int, ts1: int) -> None:
        p = f[11:-1] if len(f) == size else f[11:]
        if key == (60, 60) or key == (60, 50):  # basic.deliver / basic.return: pushed to the client
            attrs: dict[str, Any] = {"channel": channel}
            if key == (60, 60):
                attrs["consumer_tag"], pos = _shortstr(p, 0)
                attrs["delivery_tag"] = _U64.unpack_from(p, pos)[0]
                if p[pos + 8] & 1:
                    attrs["redelivered"] = True
                exchange, pos = _shortstr(p, pos + 9)
            else:
                attrs["reply_code"] = _U16.unpack_from(p, 0)[0]
                text, pos = _shortstr(p, 2)
                exchange, pos = _shortstr(p, pos)
            routing_key, _ = _shortstr(p, pos)
            attrs["exchange"], attrs["routing_key"] = exchange, routing_key
            push = _Pending(_NAMES[key], exchange or routing_key, attrs, ts0, ts0, 0)
            push.push = True
            push.resp_start, push.resp_end, push.resp_bytes = ts0, ts1, size
            if key == (60, 50):  # returned unroutable: the publish failed
                push.error, push.message = True, text
            self._content[(False, channel)] = _Content(push, False, self._emit)
            return
        if key in ((60, 80), (60, 120)) and channel in self._unconfirmed:  # publisher confirms
            tag = _U64.unpack_from(p, 0)[0]
            multiple = len(p) > 8 and p[8] & 1
            queue = self._unconfirmed[channel]
            while queue and (queue[0][0] == tag or (multiple and queue[0][0] <= tag)):
                confirmed, publish = queue.popleft()
                self._count -= 1
                self._answer(publish, ts0, ts1, size if confirmed == tag else 0)  # one ack's bytes, counted once
                if key == (60, 120):
                    publish.error, publish.message = True, "nacked by the broker"
                self._emit(publish)
            return
        if key in ((10, 50), (20, 40)):  # the server closes: an error when its code says so
            code = _U16.unpack_from(p, 0)[0]
            text, _ = _shortstr(p, 2)
            queue = self._pending.get(channel)
            failed = None
            if queue:
                failed = queue.popleft()
                self._count -= 1
            if failed is None:
                failed = _Pending(f"{_CLASSES[key[0]]}.close", "", {"channel": channel}, ts0, ts0, 0)
                failed.push = True
            failed.attrs["reply_code"] = code
            self._answer(failed, ts0, ts1, size)
            if code >= 300:
                failed.error, failed.message = True, text
            self._emit(failed)
            if queue:  # the channel is gone: nothing else on it gets a reply
                while queue:
                    self._count -= 1
                    self._emit(queue.popleft())
            if key == (10, 50):
                for other in list(self._pending.values()):
                    while other:
                        self._count -= 1
                        self._emit(other.popleft())
            return
        if key not in _REPLIES:
            return  # connection.start, tune-less extras, channel.flow, blocked …
        queue = self._pending.get(channel)
        if not queue:
            self.orphan_replies += 1
            return
        pending = queue.popleft()
        self._count -= 1
        self._answer(pending, ts0, ts1, size)
        if key == (60, 71):  # basic.get-ok: the message follows
            pending.attrs["delivery_tag"] = _U64.unpack_from(p, 0)[0]
            exchange, pos = _shortstr(p, 9)
            pending.attrs["exchange"] = exchange
            pending.attrs["routing_key"], pos = _shortstr(p, pos)
            pending.attrs["message_count"] = struct.unpack_from(">I", p, pos)[0]
            self._content[(False, channel)] = _Content(pending, False, self._emit)
            return
        if key == (60, 72):
            pending.attrs["empty"] = True
        elif key == (50, 11):  # queue.declare-ok: name (the server's when asked for ""), counts
            name, pos = _shortstr(p, 0)
            pending.target = pending.target or name
            pending.attrs["message_count"], pending.attrs["consumer_count"] = struct.unpack_from(">II", p, pos)
        elif key == (85, 11):
            self._confirming.setdefault(channel, 0)
        self._emit(pending)

    def _forget_channel(self, channel: int) -> None:
        self._confirming.pop(channel, None)
        for _, publish in self._unconfirmed.pop(channel, ()):
            self._count -= 1
            self._emit(publish)
        self._content.pop((True, channel), None)
        self._content.pop((False, channel), None)

    @staticmethod
    def _answer(pending: _Pending, ts0: int, ts1: int, size: int) -> None:
        if pending.resp_start is None:
            pending.resp_start = ts0
        pending.resp_end = ts1
        pending.resp_bytes += size

    def _emit(self, pending: _Pending) -> None:
        attrs = pending.attrs
        if pending.push:
            attrs["push"] = True
        if pending.truncated:
            attrs["truncated"] = True
        status = None if pending.resp_start is None else ("ERR" if pending.error else "OK")
        self._out.append(Exchange(
            "amqp", pending.method, pending.target, status, pending.error, pending.start, pending.end,
            pending.resp_start, pending.resp_end, pending.nbytes, pending.resp_bytes, pending.message, attrs,
        ))
