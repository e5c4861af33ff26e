"""The detail's weights: decoded exchanges add up to the kernel's exact counts (deetune.detail)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deetune.agent import detail_summary
from deetune.detail import HOLD_TICKS, DetailWeigher
from deetune.events import ExchangeEvent, RequestCounts


def exchange(*, error: bool = False, protocol: str = "http", pid: int = 10, sampling: int = 1, ts: int = 1) -> ExchangeEvent:
    return ExchangeEvent(ts, ts_mono_ns=ts, protocol=protocol, pid=pid, comm="srv", role="server", laddr="127.0.0.1",
                         lport=8080, raddr="10.0.0.9", rport=40000, method="GET", target="/", status=500 if error else 200,
                         error=error, latency_ns=1, request_bytes=1, response_bytes=1, sampling=sampling)


def settle(weigher: DetailWeigher) -> list[ExchangeEvent]:
    """Reads with nothing new until the weigher lets go of what it holds (a sample waits up to
    HOLD_TICKS reads for a later batch)."""
    out: list[ExchangeEvent] = []
    for _ in range(HOLD_TICKS + 1):
        out += weigher.tick()
    return out


def counted(count: int, *, outcome: str = "ok", protocol: str = "http", pid: int = 10, read_ns: int = 0) -> RequestCounts:
    return RequestCounts(1, ts_mono_ns=read_ns, role="server", pid=pid, raddr="10.0.0.9", port=8080, protocol=protocol, method="GET",
                         status=500 if outcome == "error" else 200, outcome=outcome, count=count)


def test_decoded_exchanges_are_held_until_the_counts_and_share_them():
    weigher = DetailWeigher()
    held = [exchange(ts=i) for i in range(4)]
    assert all(list(weigher(e)) == [] for e in held)  # held until the next read of the counts
    error = exchange(error=True, ts=9)
    assert list(weigher(error)) == [error] and error.sampling == 1  # every error is decoded: itself
    assert list(weigher(c := counted(40))) == [c]
    assert list(weigher(c := counted(1, outcome="error"))) == [c]
    assert weigher.tick() == []  # a sample (40 counted, 4 decoded): the next reads may be its too
    released = settle(weigher)
    assert released == held[:4]  # oldest first; the error passed at once
    assert [e.sampling for e in released] == [10, 10, 10, 10]
    assert weigher.tick() == []


def test_a_whole_batch_goes_at_once():
    weigher = DetailWeigher()
    batch = [exchange(ts=i) for i in range(3)]
    for e in batch:
        weigher(e)
    weigher(counted(3))
    assert weigher.tick() == batch and [e.sampling for e in batch] == [1, 1, 1]
    # Two answered across the read (counted at their first response byte, decoded after): at once.
    batch = [exchange(ts=10 + i) for i in range(18)]
    for e in batch:
        weigher(e)
    weigher(counted(20))
    assert weigher.tick() == batch and all(e.sampling == 20 / 18 for e in batch)


def test_a_read_ends_where_the_kernels_counts_were_read():
    """Exchanges answered after the counts were read (decoded while the counts waited for the
    rings to be read) are the next read's: each read's exchanges stand for its own counts."""
    weigher = DetailWeigher()
    before, after = [exchange(ts=100 + i) for i in range(3)], [exchange(ts=200 + i) for i in range(2)]
    for e in before + after:
        weigher(e)
    weigher(counted(3, read_ns=150))
    assert weigher.tick() == before and [e.sampling for e in before] == [1, 1, 1]
    weigher(counted(2, read_ns=250))
    assert weigher.tick() == after and [e.sampling for e in after] == [1, 1]


def test_when_nothing_is_decoded_after_a_sample_its_counts_are_the_samples():
    """Deep overload sampling on a few busy connections may copy nothing for seconds, up to the
    traffic's end: the last sample stands for those reads (the counts add up all the same)."""
    weigher = DetailWeigher()
    first = [exchange(ts=i) for i in range(4)]
    for e in first:
        weigher(e)
    weigher(counted(4))
    assert weigher.tick() == first  # whole
    last = exchange(ts=10)
    weigher(last)
    weigher(counted(45_003))
    assert weigher.tick() == []
    weigher(counted(46_171))
    weigher.tick()
    weigher(counted(15_569))
    weigher.tick()
    assert settle(weigher) == [last] and last.sampling == 45_003 + 46_171 + 15_569


def test_a_weight_is_never_below_one_and_what_it_took_ahead_is_carried():
    weigher = DetailWeigher()
    first = exchange(ts=1)
    weigher(first)  # decoded before the kernel's count of it moved
    assert [e.sampling for e in weigher.tick()] == [1]
    weigher(counted(1))
    assert weigher.tick() == []
    later = [exchange(ts=i) for i in (2, 3, 4)]
    for e in later:
        weigher(e)
    weigher(counted(10))
    # 11 counted in all, 1 already stood for: 10 over 3.
    weights = [e.sampling for e in settle(weigher)]
    assert weights == [10 / 3] * 3 and 1 + sum(weights) == 11


def test_protocols_the_kernel_does_not_count_pass_at_once_with_their_own_weight():
    weigher = DetailWeigher()
    plugin = exchange(protocol="kafka", sampling=8)
    assert list(weigher(plugin)) == [plugin] and plugin.sampling == 8


def test_the_unanswered_and_the_unparsed_count_as_they_are():
    weigher = DetailWeigher()
    weigher(exchange())
    weigher(counted(3, outcome="no_response"))
    weigher(counted(5, outcome="unparsed"))  # chunks, not exchanges
    assert [e.sampling for e in settle(weigher)] == [3]


def test_edge_sides_are_apart():
    weigher = DetailWeigher()
    a, b = exchange(pid=1), exchange(pid=2)
    weigher(a), weigher(b)
    weigher(counted(6, pid=1)), weigher(counted(2, pid=2))
    weigher.flush()
    assert (a.sampling, b.sampling) == (6, 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_weights_add_up_to_the_counts(ticks):
    """Each weight is at least one; the weights add up to the kernel's count through the last read
    with decoded exchanges (and beyond it when that batch was a sample) whenever each read counted
    at least what was decoded since the last (the usual case), and otherwise exceed it by no more
    than the exchanges decoded ahead of their count."""
    weigher = DetailWeigher()
    weights: list[float] = []
    total_counted = total_decoded = counted_through_last_decoded = 0
    for counted_now, decoded_now in ticks:
        for i in range(decoded_now):
            weigher(exchange(ts=i))
        if counted_now:
            weigher(counted(counted_now))
        total_counted += counted_now
        total_decoded += decoded_now
        if decoded_now:
            counted_through_last_decoded = total_counted
        weights += [e.sampling for e in weigher.tick()]
    weights += [e.sampling for e in settle(weigher)]
    assert len(weights) == total_decoded
    assert all(w >= 1 for w in weights)
    if all(c >= d for c, d in ticks):
        assert counted_through_last_decoded - 1e-6 <= sum(weights) <= total_counted + 1e-6
    assert sum(weights) <= total_counted + total_decoded + 1e-6


def test_sampled_exchanges_wait_for_the_next_batch_and_stand_for_the_reads_between():
    """Overload sampling copies some connections: reads whose counts no decoded exchange stands
    for go to the batch before them (held until the next batch, or HOLD_TICKS reads)."""
    weigher = DetailWeigher()
    first = [exchange(ts=i, sampling=16) for i in range(2)]
    for e in first:
        weigher(e)
    weigher(counted(30))
    assert weigher.tick() == []  # held: the next reads may count exchanges the sampling left out
    weigher(counted(50))
    assert weigher.tick() == []
    second = [exchange(ts=10 + i, sampling=16) for i in range(4)]
    for e in second:
        weigher(e)
    weigher(counted(40))
    released = weigher.tick()
    assert released == first and [e.sampling for e in released] == [40, 40]  # 30 + 50 over 2
    for _ in range(HOLD_TICKS - 1):
        assert weigher.tick() == []
    weigher(counted(20))  # the traffic's end: no exchange decoded after the second batch
    released = weigher.tick()
    assert released == second and [e.sampling for e in released] == [15] * 4  # 40 + 20 over 4
    assert sum(e.sampling for e in first + second) == 140


def test_flush_shares_out_every_count_over_what_is_held():
    weigher = DetailWeigher()
    batch = [exchange(ts=i, sampling=4) for i in range(3)]
    for e in batch:
        weigher(e)
    weigher(counted(9))
    assert weigher.tick() == []
    weigher(counted(3))
    assert [e.sampling for e in weigher.flush()] == [4, 4, 4]


def test_far_behind_the_exchanges_go_early_with_the_probes_weight_and_the_rest_is_shared(monkeypatch):
    """Past MAX_HELD the waiting exchanges go at once (1 each when nothing was sampled), and the
    read they belonged to counts only what is left for those decoded after."""
    import deetune.detail as detail

    monkeypatch.setattr(detail, "MAX_HELD", 4)
    weigher = DetailWeigher()
    weigher.drained(0)  # the rings are behind: reads wait
    weigher(counted(10))
    assert weigher.tick() == []
    early = []
    for i in range(5):
        early += weigher(exchange(ts=-10**9 + i))  # answered before the read
    assert len(early) == 5 and [e.sampling for e in early] == [1] * 5
    late = [exchange(ts=-10**9 + 10 + i) for i in range(2)]
    for e in late:
        assert list(weigher(e)) == []
    weigher.drained(2**62)
    released = settle(weigher)
    assert released == late and [e.sampling for e in released] == [2.5, 2.5]  # 10 - 5 over 2
    # The agent's stop line says the bound cut in, and says nothing when it did not.
    assert weigher.stats.released_early == 5
    assert detail_summary([object(), weigher]) == \
        "detail: 5 exchanges weighed before their count was read (over 4 waiting)"
    assert detail_summary([DetailWeigher()]) is None


def test_far_behind_sampled_exchanges_go_early_with_their_share_of_the_counts(monkeypatch):
    """Sampled exchanges let go early stand for their read's count so far, or the side's last
    weight, never the probe's (1 connection in 1,024 stood for far more than was counted)."""
    import deetune.detail as detail

    monkeypatch.setattr(detail, "MAX_HELD", 4)
    weigher = DetailWeigher()
    for i in range(2):  # a first batch: the side's weight is 50
        weigher(exchange(ts=i, sampling=1024))
    weigher(counted(100))
    weigher.tick()
    assert [e.sampling for e in settle(weigher)] == [50, 50]
    weigher.drained(0)  # the rings fall behind: reads wait
    weigher(counted(300))
    assert weigher.tick() == []
    early = []
    for i in range(3):  # answered before that read
        early += weigher(exchange(ts=-10**9 + i, sampling=1024))
    assert early == []
    early += weigher(exchange(ts=2**60, sampling=1024))  # answered after it
    early += weigher(exchange(ts=2**60 + 1, sampling=1024))
    assert [e.sampling for e in early] == [100, 100, 100, 100, 100]  # 300 over 3; then the last weight
    weigher.drained(2**62)
    weigher(counted(400, read_ns=2**61 + 5))
    weigher(late := exchange(ts=2**61, sampling=1024))
    weigher.tick()
    assert settle(weigher) == [late] and late.sampling == 200  # 400 less the 200 let go before it
