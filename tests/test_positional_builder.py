"""events.positional_builder: the hot paths' constructor makes the very objects the class does."""

import attrs
import pytest

from deetune.decoders.base import Chunk, Direction, Exchange
from deetune.events import DataEvent, ExchangeEvent, exchange_event, positional_builder


def _values(cls):
    return [f"{f.name}-value" if f.default is attrs.NOTHING else f.default for f in attrs.fields(cls)]


@pytest.mark.parametrize("cls", [DataEvent, ExchangeEvent, Chunk, Exchange])
def test_builds_what_the_class_builds(cls):
    values = _values(cls)
    fields = attrs.fields(cls)
    by_class = cls(*[v for f, v in zip(fields, values) if not f.kw_only],
                   **{f.name: v for f, v in zip(fields, values) if f.kw_only})
    built = positional_builder(cls)(*values)
    assert type(built) is cls and built == by_class and repr(built) == repr(by_class)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        built.__setattr__(fields[0].name, 1)


def test_a_class_that_validates_is_called():
    @attrs.frozen
    class Checked:
        a: int = attrs.field(validator=attrs.validators.instance_of(int))

    assert positional_builder(Checked)(1) == Checked(1)
    with pytest.raises(TypeError):
        positional_builder(Checked)("x")


def test_exchange_event_is_from_exchange():
    x = Exchange("http", "GET", "/a?password=x", 500, True, 10, 20, 30, 45, 7, 9, None, {"host": "h"})
    args = dict(clock_offset=1000, pid=1, comm="c", role="client", laddr="1.2.3.4", lport=5, raddr="5.6.7.8",
                rport=80, sock_id=3, cgroup_id=4, conn_id=6, sampling=2, request_payload=b"q", response_payload=None)
    slow = ExchangeEvent(ts=1010, ts_mono_ns=10, protocol="http", pid=1, comm="c", role="client", laddr="1.2.3.4",
                         lport=5, raddr="5.6.7.8", rport=80, method="GET", target="/a?password=[REDACTED]", status=500,
                         error=True, latency_ns=10, duration_ns=35, request_bytes=7, response_bytes=9, sock_id=3,
                         cgroup_id=4, conn_id=6, sampling=2, attributes={"host": "h"}, request_payload=b"q")
    assert ExchangeEvent.from_exchange(x, **args) == slow
    assert exchange_event(x, *args.values()) == slow
    assert exchange_event(x, *args.values()).attributes is not x.attributes
