"""Bindings over the system libbpf (``libbpf.so.1``) through cffi's ABI mode.

ABI mode needs no compiler at install or run time: only the shared library.
The surface is small on purpose: open an object, set ``.rodata`` knobs and
program autoload flags, load, attach, use maps, close.  Ring buffers are read
by :mod:`deetune.ringbuf` directly from their mmap'ed pages.

Lifetimes: a :class:`BpfObject` owns its programs and maps; a :class:`Link`
owns one attachment.  Both are closed explicitly, by ``with``, or at
interpreter exit; after kill -9 the kernel drops them with the process's file
descriptors, since nothing is pinned.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import errno as errno_mod
import logging
import os
import struct
import threading
import weakref
from typing import Iterator

# The declarations of libbpf's API we call, parsed ahead of time (deetune._ffi_build).
from deetune._ffi_libbpf import ffi

log = logging.getLogger("deetune.libbpf")

BTF_KIND_DATASEC = 15

# Map types whose values are per CPU (one value per possible CPU, each padded to 8 bytes).
PERCPU_MAP_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
MAP_TYPE_RINGBUF = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class LibbpfError(Exception):
    """A libbpf call failed; ``errno`` and the call are in the message."""

    def __init__(self, message: str, errno: int = 0):
        self.errno = errno
        detail = f": {os.strerror(errno)} (errno {errno})" if errno else ""
        super().__init__(f"{message}{detail}")


class LibbpfUnavailable(LibbpfError):
    """``libbpf.so.1`` could not be loaded."""


class VerifierError(LibbpfError):
    """The kernel verifier rejected a program.

    ``log`` holds the whole verifier log; ``str()`` ends with its last lines,
    which is where the reason is.
    """

    TAIL_LINES = 12

    def __init__(self, obj_name: str, errno: int, verifier_log: str):
        self.log = verifier_log
        lines = [line for line in verifier_log.splitlines() if line.strip()]
        tail = "\n".join(lines[-self.TAIL_LINES :])
        super().__init__(f"verifier rejected a program of {obj_name}:\n{tail}\nload failed", errno)


_lib = None
_lib_lock = threading.Lock()


def lib():
    """The loaded libbpf, opened on first use."""
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                try:
                    loaded = ffi.dlopen("libbpf.so.1")
                except OSError as exc:
                    raise LibbpfUnavailable(
                        f"cannot load libbpf.so.1 ({exc}); install Debian's libbpf1 package"
                    ) from None
                _install_print(loaded)
                _lib = loaded
    return _lib


_libc = ffi.dlopen(None)
# libbpf logs through one global callback; a load collects what it printed so
# that a verifier rejection can carry the log.
_capture = threading.local()


# A verifier log arrives as one message and can be megabytes long; a va_list
# can be formatted only once, so the buffer must be big enough up front.
_PRINT_BUF_SIZE = 16 << 20
_print_buf = None


@ffi.callback("int(int, const char *, void *)")
def _print_callback(level, fmt, ap):
    global _print_buf
    if _print_buf is None:
        _print_buf = ffi.new("char[]", _PRINT_BUF_SIZE)
    n = _libc.vsnprintf(_print_buf, _PRINT_BUF_SIZE, fmt, ap)
    text = ffi.string(_print_buf, min(max(n, 0), _PRINT_BUF_SIZE - 1)).decode("utf-8", "replace").rstrip("\n")
    lines = getattr(_capture, "lines", None)
    if lines is not None:
        lines.append(text)
    # libbpf levels: 0 warn, 1 info, 2 debug.  During a load, warnings are
    # kept for the exception instead of being printed twice.
    if level == 0 and lines is None:
        log.warning("%s", text)
    elif level == 0:
        log.debug("%s", text)
    elif level == 1:
        log.info("%s", text)
    else:
        log.debug("%s", text)
    return n


@contextlib.contextmanager
def quiet() -> Iterator[list[str]]:
    """Collect libbpf's messages instead of logging its warnings (for probing
    features whose failure is an expected answer)."""
    previous = getattr(_capture, "lines", None)
    _capture.lines = collected = []
    try:
        yield collected
    finally:
        _capture.lines = previous


def _install_print(loaded) -> None:
    loaded.libbpf_set_print(_print_callback)


def _check_ptr(ptr, what: str):
    if ptr == ffi.NULL:
        raise LibbpfError(what, ffi.errno)
    return ptr


def _check_ret(ret: int, what: str) -> int:
    if ret < 0:
        raise LibbpfError(what, -ret if ret != -1 else ffi.errno)
    return ret


def num_possible_cpus() -> int:
    return _check_ret(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


# Everything still open at interpreter exit is closed, so no program or link
# outlives a normal exit even when the caller forgot to.
_open_resources: "weakref.WeakSet[BpfObject | Link]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for resource in list(_open_resources):
        try:
            resource.close()
        except Exception:  # pragma: no cover - best effort at exit
            pass


class Link:
    """One attachment of a program.  Close it to detach."""

    def __init__(self, ptr, description: str):
        self._ptr = ptr
        self.description = description
        _open_resources.add(self)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def fd(self) -> int:
        if self._ptr is None:
            raise LibbpfError(f"link {self.description} is closed")
        return lib().bpf_link__fd(self._ptr)

    def close(self) -> None:
        if self._ptr is not None:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None
            _open_resources.discard(self)

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached"
        return f"<Link {self.description} {state}>"


class Program:
    """A program of an opened object."""

    def __init__(self, obj: "BpfObject", ptr):
        self._obj = obj
        self._ptr = ptr
        self.name: str = ffi.string(lib().bpf_program__name(ptr)).decode()
        self.section: str = ffi.string(lib().bpf_program__section_name(ptr)).decode()

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        self._obj._require_state("open", "set autoload")
        _check_ret(lib().bpf_program__set_autoload(self._ptr, bool(value)), f"set autoload of {self.name}")

    @property
    def fd(self) -> int:
        return lib().bpf_program__fd(self._ptr)

    def _link(self, ptr, description: str) -> Link:
        _check_ptr(ptr, f"attach {self.name} ({description})")
        link = Link(ptr, f"{self.name}→{description}")
        self._obj._links.append(link)
        return link

    def attach(self) -> Link:
        """Attach where the section name says (``tracepoint/…``, ``tp_btf/…``, ``raw_tp/…``)."""
        self._obj._require_state("loaded", "attach")
        return self._link(lib().bpf_program__attach(self._ptr), self.section)

    def attach_tracepoint(self, category: str, name: str) -> Link:
        self._obj._require_state("loaded", "attach")
        ptr = lib().bpf_program__attach_tracepoint(self._ptr, category.encode(), name.encode())
        return self._link(ptr, f"tracepoint/{category}/{name}")

    def attach_raw_tracepoint(self, name: str) -> Link:
        self._obj._require_state("loaded", "attach")
        return self._link(lib().bpf_program__attach_raw_tracepoint(self._ptr, name.encode()), f"raw_tp/{name}")

    def attach_tp_btf(self) -> Link:
        """Attach a ``tp_btf/…`` (BTF-enabled tracepoint) program."""
        self._obj._require_state("loaded", "attach")
        return self._link(lib().bpf_program__attach_trace(self._ptr), self.section)

    def attach_uprobe(
        self, binary_path: str, function: str | None = None, offset: int = 0, *, pid: int = -1, retprobe: bool = False
    ) -> Link:
        """Attach a uprobe (or uretprobe) to ``function`` (or ``offset``) in ``binary_path``; pid -1: all."""
        self._obj._require_state("loaded", "attach")
        opts = ffi.new("struct bpf_uprobe_opts *")
        opts.sz = ffi.sizeof("struct bpf_uprobe_opts")
        opts.retprobe = retprobe
        name_buf = ffi.new("char[]", function.encode()) if function else ffi.NULL
        opts.func_name = name_buf
        ptr = lib().bpf_program__attach_uprobe_opts(self._ptr, pid, binary_path.encode(), offset, opts)
        kind = "uretprobe" if retprobe else "uprobe"
        return self._link(ptr, f"{kind}/{binary_path}:{function or hex(offset)}")

    def attach_cgroup(self, cgroup_path: str) -> Link:
        """Attach a cgroup program (cgroup_skb, sockops, …) to a cgroup v2 directory."""
        self._obj._require_state("loaded", "attach")
        fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ptr = lib().bpf_program__attach_cgroup(self._ptr, fd)
        finally:
            os.close(fd)  # the link holds its own reference to the cgroup
        return self._link(ptr, f"cgroup:{cgroup_path}")

    def run_stats(self) -> tuple[int, int]:
        """(run count, total run time in ns) while ``kernel.bpf_stats_enabled`` is 1."""
        return program_run_stats(self.fd)

    def __repr__(self) -> str:
        return f"<Program {self.name} {self.section}>"


def program_run_stats(prog_fd: int) -> tuple[int, int]:
    """Run count and run time of a loaded program, from its fdinfo."""
    count = time_ns = 0
    with open(f"/proc/self/fdinfo/{prog_fd}") as fdinfo:
        for line in fdinfo:
            key, _, value = line.partition(":")
            if key == "run_cnt":
                count = int(value)
            elif key == "run_time_ns":
                time_ns = int(value)
    return count, time_ns


class Map:
    """A map of an object.  Keys and values are ``bytes`` of the map's sizes."""

    def __init__(self, obj: "BpfObject", ptr):
        self._obj = obj
        self._ptr = ptr
        self.name: str = ffi.string(lib().bpf_map__name(ptr)).decode()
        self.type: int = lib().bpf_map__type(ptr)

    @property
    def key_size(self) -> int:
        return lib().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return lib().bpf_map__value_size(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, value: int) -> None:
        self._obj._require_state("open", "resize a map")
        _check_ret(lib().bpf_map__set_max_entries(self._ptr, value), f"set max_entries of {self.name}")

    @property
    def fd(self) -> int:
        self._obj._require_state("loaded", "use a map")
        return lib().bpf_map__fd(self._ptr)

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES

    def _value_buffer(self):
        if self.percpu:
            stride = (self.value_size + 7) // 8 * 8
            return ffi.new("char[]", stride * num_possible_cpus())
        return ffi.new("char[]", self.value_size)

    def _key(self, key: bytes):
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key is {len(key)} bytes, expected {self.key_size}")
        return ffi.from_buffer(key)

    def lookup(self, key: bytes) -> bytes | list[bytes] | None:
        """The value, or ``None`` when absent; a list of per-CPU values for per-CPU maps."""
        value = self._value_buffer()
        ret = lib().bpf_map_lookup_elem(self.fd, self._key(key), value)
        if ret < 0:
            if ffi.errno == errno_mod.ENOENT:
                return None
            raise LibbpfError(f"lookup in map {self.name}", ffi.errno)
        raw = ffi.buffer(value)[:]
        if not self.percpu:
            return raw
        stride = (self.value_size + 7) // 8 * 8
        return [raw[i : i + self.value_size] for i in range(0, len(raw), stride)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size and not self.percpu:
            raise ValueError(f"map {self.name}: value is {len(value)} bytes, expected {self.value_size}")
        ret = lib().bpf_map_update_elem(self.fd, self._key(key), ffi.from_buffer(value), flags)
        if ret < 0:
            raise LibbpfError(f"update of map {self.name}", ffi.errno)

    def push(self, value: bytes) -> None:
        """Add ``value`` to a queue or stack map."""
        ret = lib().bpf_map_update_elem(self.fd, ffi.NULL, ffi.from_buffer(value), BPF_ANY)
        if ret < 0:
            raise LibbpfError(f"push to map {self.name}", ffi.errno)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was absent."""
        ret = lib().bpf_map_delete_elem(self.fd, self._key(key))
        if ret < 0:
            if ffi.errno == errno_mod.ENOENT:
                return False
            raise LibbpfError(f"delete from map {self.name}", ffi.errno)
        return True

    def keys(self) -> Iterator[bytes]:
        current = ffi.NULL
        next_key = ffi.new("char[]", self.key_size)
        while lib().bpf_map_get_next_key(self.fd, current, next_key) == 0:
            key = ffi.buffer(next_key)[:]
            yield key
            current = ffi.from_buffer(key)

    def items(self) -> Iterator[tuple[bytes, bytes | list[bytes]]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted between get_next_key and lookup
                yield key, value

    def lookup_all(self, batch: int = 4096) -> tuple[bytes, bytes, int]:
        """Every key and value, read in batches (one system call per ``batch`` entries, not two per
        entry): ``(keys, values, n)``, the keys ``key_size`` bytes apart and the values, for per-CPU
        maps, each the CPUs' values (rounded up to 8 bytes) one after another.  A hash map changing
        while it is read may show an entry twice or not at all (the kernel's rule for batches)."""
        stride = (self.value_size + 7) // 8 * 8 * num_possible_cpus() if self.percpu else self.value_size
        keys_out: list[bytes] = []
        values_out: list[bytes] = []
        total = 0
        keys = ffi.new("char[]", self.key_size * batch)
        values = ffi.new("char[]", stride * batch)
        token_size = max(self.key_size, 8)
        tokens = [ffi.new("char[]", token_size), ffi.new("char[]", token_size)]
        count = ffi.new("__u32 *")
        opts = ffi.new("struct bpf_map_batch_opts *")
        opts.sz = ffi.sizeof("struct bpf_map_batch_opts")
        first = True
        while True:
            count[0] = batch
            ret = lib().bpf_map_lookup_batch(self.fd, ffi.NULL if first else tokens[0], tokens[1], keys, values,
                                             count, opts)
            err = ffi.errno if ret < 0 else 0
            if ret < 0 and err != errno_mod.ENOENT:
                raise LibbpfError(f"batch lookup in map {self.name}", err)
            n = count[0]
            if n:
                keys_out.append(ffi.buffer(keys, self.key_size * n)[:])
                values_out.append(ffi.buffer(values, stride * n)[:])
                total += n
            if ret < 0:  # ENOENT: no more entries
                break
            first = False
            tokens.reverse()
        return b"".join(keys_out), b"".join(values_out), total

    def reuse_fd(self, fd: int) -> None:
        """Before load: make this map the existing map ``fd`` (two objects share one map)."""
        self._obj._require_state("open", "share a map")
        _check_ret(lib().bpf_map__reuse_fd(self._ptr, fd), f"reuse a map for {self.name}")

    def sum_percpu_u64(self, key: bytes) -> int:
        """Sum of a per-CPU u64 value over all CPUs (counters)."""
        values = self.lookup(key) or []
        return sum(struct.unpack_from("<Q", v)[0] for v in values)

    def __repr__(self) -> str:
        return f"<Map {self.name} type={self.type}>"


class BpfObject:
    """A BPF object file: opened, configured, loaded, attached, closed.

    >>> obj = BpfObject.open("tcp.bpf.o")
    >>> obj.set_constant("targ_port", 8080)    # before load
    >>> obj.load()
    >>> obj.attach_all()
    >>> obj.close()
    """

    def __init__(self, ptr, path: str):
        self._ptr = ptr
        self.path = path
        self.name: str = ffi.string(lib().bpf_object__name(ptr)).decode()
        self.state = "open"
        self._links: list[Link] = []
        self.programs: dict[str, Program] = {}
        prog = lib().bpf_object__next_program(ptr, ffi.NULL)
        while prog != ffi.NULL:
            program = Program(self, prog)
            self.programs[program.name] = program
            prog = lib().bpf_object__next_program(ptr, prog)
        self.maps: dict[str, Map] = {}
        bpf_map = lib().bpf_object__next_map(ptr, ffi.NULL)
        while bpf_map != ffi.NULL:
            m = Map(self, bpf_map)
            self.maps[m.name] = m
            bpf_map = lib().bpf_object__next_map(ptr, bpf_map)
        _open_resources.add(self)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "BpfObject":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise LibbpfError(f"BPF object {path} not found", errno_mod.ENOENT)
        ptr = _check_ptr(lib().bpf_object__open_file(path.encode(), ffi.NULL), f"open {path}")
        return cls(ptr, path)

    def _require_state(self, state: str, action: str) -> None:
        if self.state != state:
            raise LibbpfError(f"cannot {action} of {self.name}: object is {self.state}, needs {state}")

    # -- knobs -------------------------------------------------------------
    def _rodata(self) -> Map:
        for m in self.maps.values():
            if m.name.endswith(".rodata"):
                return m
        raise LibbpfError(f"{self.name} has no .rodata section (no const volatile knobs)")

    def constants(self) -> dict[str, tuple[int, int]]:
        """Knob name → (offset, size) in ``.rodata``, from the object's BTF."""
        btf = lib().bpf_object__btf(self._ptr)
        if btf == ffi.NULL:
            raise LibbpfError(f"{self.name} has no BTF")
        sec_id = lib().btf__find_by_name_kind(btf, b".rodata", BTF_KIND_DATASEC)
        if sec_id < 0:
            return {}
        sec = lib().btf__type_by_id(btf, sec_id)
        vlen = sec.info & 0xFFFF
        secinfos = ffi.cast("struct btf_var_secinfo *", sec + 1)
        result = {}
        for i in range(vlen):
            info = secinfos[i]
            var = lib().btf__type_by_id(btf, info.type)
            name = ffi.string(lib().btf__name_by_offset(btf, var.name_off)).decode()
            result[name] = (info.offset, info.size)
        return result

    def set_constant(self, name: str, value: int | bytes) -> None:
        """Set a ``const volatile`` global before load (ints little-endian, or raw bytes)."""
        self._require_state("open", f"set constant {name}")
        layout = self.constants()
        if name not in layout:
            known = ", ".join(sorted(layout)) or "none"
            raise LibbpfError(f"{self.name} has no constant {name!r} (known: {known})")
        offset, size = layout[name]
        if isinstance(value, int):
            data = int(value).to_bytes(size, "little", signed=value < 0)
        else:
            data = bytes(value)
            if len(data) != size:
                raise ValueError(f"constant {name} is {size} bytes, got {len(data)}")
        rodata = self._rodata()
        psize = ffi.new("size_t *")
        current = lib().bpf_map__initial_value(rodata._ptr, psize)
        image = bytearray(ffi.buffer(current, psize[0]))
        image[offset : offset + size] = data
        _check_ret(
            lib().bpf_map__set_initial_value(rodata._ptr, ffi.from_buffer(bytes(image)), len(image)),
            f"set constant {name}",
        )

    def get_constant(self, name: str) -> bytes:
        offset, size = self.constants()[name]
        psize = ffi.new("size_t *")
        current = lib().bpf_map__initial_value(self._rodata()._ptr, psize)
        return bytes(ffi.buffer(current, psize[0])[offset : offset + size])

    # -- lifecycle ---------------------------------------------------------
    def load(self) -> None:
        """Load every program whose autoload is on; a verifier rejection raises :class:`VerifierError`."""
        self._require_state("open", "load")
        with quiet() as lines:
            ret = lib().bpf_object__load(self._ptr)
        if ret < 0:
            err = -ret
            text = "\n".join(lines)
            if "BEGIN PROG LOAD LOG" in text:
                verifier = text.split("BEGIN PROG LOAD LOG --", 1)[1].split("-- END PROG LOAD LOG", 1)[0]
                raise VerifierError(self.name, err, verifier.strip("\n"))
            reason = next((line for line in reversed(lines) if line.strip()), "")
            raise LibbpfError(f"load of {self.name} failed{': ' + reason if reason else ''}", err)
        for line in lines:
            log.debug("%s", line)
        self.state = "loaded"

    def attach_all(self) -> list[Link]:
        """Attach every loaded program by its section name."""
        return [p.attach() for p in self.programs.values() if p.autoload]

    @property
    def links(self) -> list[Link]:
        return [link for link in self._links if not link.closed]

    def detach_all(self) -> None:
        # Each tracepoint detach waits for an RCU grace period (~70 ms here);
        # detaching in parallel lets those waits overlap (cffi drops the GIL).
        links, self._links = self._links, []
        if len(links) > 2:
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(links))) as pool:
                list(pool.map(Link.close, links))
        for link in links:
            link.close()

    def close(self) -> None:
        """Detach everything and free the object (idempotent)."""
        if self._ptr is None:
            return
        self.detach_all()
        lib().bpf_object__close(self._ptr)
        self._ptr = None
        self.state = "closed"
        _open_resources.discard(self)

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BpfObject {self.name} {self.state}>"
