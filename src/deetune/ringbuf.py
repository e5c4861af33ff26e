"""Reading BPF ring buffers straight from their mmap'ed pages.

libbpf's ``ring_buffer__poll`` calls back into Python once per record; this
reader instead takes every record that is ready in one call and returns them
as a list, so the per-record cost is a slice and a copy.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write
it); page 1 holds the producer position; the data area follows.  The kernel
offers the data area twice in a row so that a record wrapping around the end
reads as one piece; we map it once (every mapped page counts in the agent's
RSS: 4 MiB more for the TCP ring) and join the rare wrapped record from its
two parts.  Each record
starts with an 8-byte header: ``u32 len`` (bit 31: still being written,
bit 30: discarded) and ``u32 page offset``; records are 8-byte aligned.

The positions are read and written as whole 8-byte words through memoryviews
cast to ``Q``: ``struct.pack_into`` zeroes its target before packing, and a
kernel producer that read the consumer position in between saw a ring that
looked full and dropped its record.
"""

from __future__ import annotations

import mmap
import select
import struct

from deetune import records as _records
from deetune.libbpf import MAP_TYPE_RINGBUF, LibbpfError, Map

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HEADER = 8
_U32 = struct.Struct("<I")

#: At most this many records, or about this many bytes, per consume() call.  Each
#: batch becomes Python objects that live until the batch has been handled; 4,096
#: records a batch left the agent's memory 2-8 MB higher at full connection churn
#: (after the batch, the memory stays with Python's allocator, fragmented by the
#: longer-lived objects created in between) than 1,024 (docs/performance.md).
BATCH_RECORDS = 1024
BATCH_BYTES = 1 << 20


class RingBuffer:
    """Consumer of one ``BPF_MAP_TYPE_RINGBUF`` map of a loaded object."""

    def __init__(self, bpf_map: Map):
        if bpf_map.type != MAP_TYPE_RINGBUF:
            raise LibbpfError(f"map {bpf_map.name} is not a ring buffer")
        self.name = bpf_map.name
        self.fd = bpf_map.fd
        self.size = bpf_map.max_entries
        self._mask = self.size - 1
        page = mmap.PAGESIZE
        self._consumer = mmap.mmap(self.fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(self.fd, page + self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._data = memoryview(self._producer)[page:]
        #: The data area as u32 words: a record's length is one index (no unpack, no tuple).
        self._words = self._data.cast("I")
        self._page = page
        # One aligned 8-byte load or store each (see the module docstring).
        self._consumer_pos = memoryview(self._consumer)[:8].cast("Q")
        self._producer_pos = memoryview(self._producer)[:8].cast("Q")
        self._epoll = select.epoll()
        self._epoll.register(self.fd, select.EPOLLIN)
        self.caught_up = False

    def consume(self, limit: int = BATCH_RECORDS, max_bytes: int = BATCH_BYTES) -> list[bytes]:
        """Every record ready now, without waiting: at most ``limit`` records, and no more
        once ``max_bytes`` are taken (a bounded batch keeps the reader's memory flat when
        it falls behind; what is left is taken by the next call)."""
        records: list[bytes] = []
        append = records.append
        consumer = self._consumer_pos[0]
        producer = self._producer_pos[0]
        data = self._data
        words = self._words
        mapped = self._producer  # the data area starts a page into it: slicing the mmap gives bytes at once
        page = self._page
        mask = self._mask
        size = self.size
        start = consumer
        stop_at = consumer + max_bytes
        taken = 0
        while consumer < producer and taken < limit and consumer < stop_at:
            offset = consumer & mask
            length = words[offset >> 2]  # the header's u32 len (offset: 8-byte aligned)
            if length & _BUSY:
                break  # the producer is still writing this one
            consumer += (length & ~_DISCARD) + _HEADER + 7 & ~7
            if not length & _DISCARD:
                begin = offset + _HEADER
                end = begin + length
                if end <= size:
                    append(mapped[page + begin : page + end])
                else:  # wraps around the end of the ring (headers never do: 8-byte aligned)
                    append(bytes(data[begin:size]) + bytes(data[: end - size]))
                taken += 1
        if consumer != start:
            self._consumer_pos[0] = consumer
        #: Every record written before this call began was taken.
        self.caught_up = consumer >= producer
        return records

    def poll(self, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` seconds for records, then take what is ready."""
        records = self.consume()
        if records:
            return records
        self._epoll.poll(timeout)
        return self.consume()

    def pending_bytes(self) -> int:
        return self._producer_pos[0] - self._consumer_pos[0]

    def behind(self) -> bool:
        """More is waiting than the mark at which the kernel side wakes the reader
        (1/DT_RING_WAKE_FRACTION of the ring, see dt_output in bpf/common.bpf.h): the
        reader is not keeping up, and no wake-up will come for it."""
        return self.pending_bytes() > self.size // _records.lib.DT_RING_WAKE_FRACTION

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._epoll.close()
        self._words.release()
        self._data.release()
        self._consumer_pos.release()
        self._producer_pos.release()
        self._producer.close()
        self._consumer.close()
