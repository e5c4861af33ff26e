"""Where TLS plaintext can be taken: OpenSSL libraries and binaries, and Go programs.

The tls probe attaches uprobes to files (a uprobe is set on a file's inode: it
fires in every process that maps the file, now and later).  This module finds
the files and reads what the probe needs from their ELF: for OpenSSL, that the
functions are there (libbpf resolves their offsets); for Go, the toolchain
version (``.go.buildinfo``), the file offsets of ``crypto/tls.(*Conn).Read``,
``Write`` and ``handshakeContext``, and of every RET instruction in them (Go
moves goroutine stacks, so return probes are set at the RETs, never as
uretprobes).  x86 code is disassembled with capstone; arm64 instructions are
fixed-width and RET is one word.

A program that uses TLS but cannot be probed (a stripped Go binary, Go older
than its register ABI, an OpenSSL linked in without symbols) is a
:class:`Target` with a ``reason``: the probe counts and names it, and
``python -m deetune.agent doctor`` lists it.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
from typing import Iterator

import attrs
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

log = logging.getLogger("deetune.probes.tls")

#: OpenSSL functions whose calls carry plaintext (1.1.1 and 3; 1.1.0 lacks the _ex forms).
OPENSSL_DATA = ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex")
OPENSSL_HANDSHAKE = "SSL_do_handshake"
GO_READ = "crypto/tls.(*Conn).Read"
GO_WRITE = "crypto/tls.(*Conn).Write"
GO_HANDSHAKE = "crypto/tls.(*Conn).handshakeContext"
#: The first Go release whose register ABI (arguments in registers) the probe reads, per machine.
GO_REGISTER_ABI = {"EM_X86_64": (1, 17), "EM_AARCH64": (1, 18)}
_ARM64_RET = 0xD65F03C0
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_GO_VERSION = re.compile(r"go(\d+)\.(\d+)")
_LIBSSL = re.compile(r"/libssl\.so[.\d]*$")
_LIBRARY_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                 "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib",
                 "/usr/local/lib64")  # fmt: skip


@attrs.frozen
class GoFunction:
    name: str
    #: File offset of the function's first instruction.
    entry: int
    #: File offsets of its RET instructions.
    returns: tuple[int, ...]


@attrs.frozen
class ProbePoint:
    """Where an OpenSSL function's calls are taken: the function, or the internal function it
    wraps (``ssl_read_internal``, ``ssl_write_internal``), at the file offset of its entry."""

    #: ``SSL_read``, …, ``ssl_read_internal`` or ``ssl_write_internal``.
    name: str
    #: File offset of the probed instruction: the function's first, or the one after its
    #: ``endbr64``, where the return address is still on top of the stack (for the uretprobe).
    offset: int
    #: The kernel runs the probed instruction for the program (x86: a push, call, jump or nop)
    #: instead of single-stepping a copy of it, which costs a debug exception.
    emulated: bool


@attrs.frozen
class Target:
    """One file the probe attaches to, or names as unprobeable."""

    #: How the process reaches it (may be /proc/PID/root/… or /proc/PID/exe).
    path: str
    #: ``openssl`` (a libssl, or a binary with OpenSSL linked in) or ``go``.
    kind: str
    #: The OpenSSL functions present.
    functions: tuple[str, ...] = ()
    #: Where their calls are probed (see :func:`openssl_probe_points`).
    openssl: tuple[ProbePoint, ...] = ()
    #: Go: the functions, with their RETs.
    go: tuple[GoFunction, ...] = ()
    #: ``go1.19.8``, …; "" when not a Go binary or unknown.
    version: str = ""
    #: Why it cannot be probed; None when it can.
    reason: str | None = None

    @property
    def probeable(self) -> bool:
        return self.reason is None


def file_key(path: str) -> tuple[int, int] | None:
    """(device, inode): uprobes are set per file, whatever the path it was reached by."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- finding files ------------------------------------------------------------------------------


def libssl_in_maps(pid: int) -> list[str]:
    """The libssl files process ``pid`` maps, as paths this process can open."""
    paths = []
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith("/") and _LIBSSL.search(path) and path not in paths:
                    paths.append(path)
    except OSError:
        return []
    return [f"/proc/{pid}/root{path}" for path in paths]


def system_libssl() -> list[str]:
    """The libssl files of this host's library directories (the dynamic loader's cache, and the
    usual directories): new processes map them, and a uprobe set now fires in them too."""
    found: list[str] = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            path = line.rpartition("=> ")[2].strip()
            if _LIBSSL.search(path):
                found.append(path)
    except (OSError, subprocess.SubprocessError):
        pass
    for directory in _LIBRARY_DIRS:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        found.extend(os.path.join(directory, n) for n in names if _LIBSSL.search("/" + n))
    return [p for p in dict.fromkeys(os.path.realpath(p) for p in found) if os.path.isfile(p)]


def process_ids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


# -- reading ELF files ------------------------------------------------------------------------------


def _symbols(elf: ELFFile, names: set[str]) -> dict[str, tuple[int, int]]:
    """name → (value, size) of the wanted FUNC symbols, from .symtab and .dynsym.  Read with
    struct rather than pyelftools' per-symbol objects: a Go binary has tens of thousands."""
    found: dict[str, tuple[int, int]] = {}
    is64 = elf.elfclass == 64
    little = elf.little_endian
    fmt = ("<" if little else ">") + ("IBBHQQ" if is64 else "IIIBBH")
    entry = struct.Struct(fmt)
    wanted = {n.encode() for n in names}
    for section_name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(section_name)
        if section is None or section["sh_entsize"] != entry.size:
            continue
        strtab = elf.get_section(section["sh_link"]).data()
        for fields in entry.iter_unpack(section.data()):
            if is64:
                name_off, info, _other, shndx, value, size = fields
            else:
                name_off, value, size, info, _other, shndx = fields
            if info & 0xF != 2 or shndx == 0:  # STT_FUNC, defined
                continue
            end = strtab.find(b"\0", name_off)
            name = strtab[name_off:end]
            if name in wanted and name.decode() not in found:
                found[name.decode()] = (value, size)
    return found


def _file_offset(elf: ELFFile, vaddr: int) -> int | None:
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD" and segment["p_vaddr"] <= vaddr < segment["p_vaddr"] + segment["p_filesz"]:
            return vaddr - segment["p_vaddr"] + segment["p_offset"]
    return None


def _read_at(elf: ELFFile, vaddr: int, size: int) -> bytes:
    offset = _file_offset(elf, vaddr)
    if offset is None:
        return b""
    elf.stream.seek(offset)
    return elf.stream.read(size)


def go_version(elf: ELFFile) -> str:
    """The Go toolchain that built the binary ("go1.19.8"), from ``.go.buildinfo``; "" if none."""
    section = elf.get_section_by_name(".go.buildinfo")
    if section is None:
        return ""
    data = section.data()
    if not data.startswith(_BUILDINFO_MAGIC) or len(data) < 32:
        return ""
    ptr_size, flags = data[14], data[15]
    if flags & 2:  # Go 1.18+: the version string inline, length-prefixed (uvarint)
        length, shift, pos = 0, 0, 32
        while pos < len(data):
            byte = data[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                break
            shift += 7
        return data[pos:pos + length].decode("utf-8", "replace")
    # Older: a pointer to a Go string header (pointer, length).
    order = "little" if flags & 1 == 0 else "big"
    pointer = int.from_bytes(data[16:16 + ptr_size], order)
    header = _read_at(elf, pointer, 2 * ptr_size)
    if len(header) < 2 * ptr_size:
        return ""
    text, length = int.from_bytes(header[:ptr_size], order), int.from_bytes(header[ptr_size:], order)
    return _read_at(elf, text, min(length, 64)).decode("utf-8", "replace")


def _returns(elf: ELFFile, machine: str, vaddr: int, size: int) -> tuple[int, ...]:
    code = _read_at(elf, vaddr, size)
    base = _file_offset(elf, vaddr)
    if not code or base is None:
        return ()
    if machine == "EM_AARCH64":
        return tuple(base + i for i in range(0, len(code) - 3, 4)
                     if int.from_bytes(code[i:i + 4], "little") == _ARM64_RET)
    import capstone

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    disassembler.skipdata = True
    return tuple(base + address for address, _size, mnemonic, _ops in disassembler.disasm_lite(code, 0)
                 if mnemonic == "ret")


# -- OpenSSL probe points ---------------------------------------------------------------------------
#
# A uprobe replaces the probed instruction with a breakpoint.  After the programs ran, the kernel
# either emulates the instruction (x86: push of a register, call, jmp, conditional jumps, nops) or
# runs a copy of it single-stepped, which takes a debug exception more; under KVM every debug
# exception exits to the hypervisor (it always intercepts #DB), which makes the single-stepped
# probe more than ten times as costly (docs/tls.md, Cost).  OpenSSL's SSL_read, SSL_read_ex,
# SSL_write and SSL_write_ex start by reserving their stack frame (``sub $N,%rsp``, single-stepped)
# and call ssl_read_internal or ssl_write_internal (s, buf, num, &processed), which start with a
# push: those are probed instead when both forms call the same function.

_ENDBR64 = b"\xf3\x0f\x1e\xfa"
#: (plain, _ex, the internal function both call, what it is reported as).
_OPENSSL_WRAPPERS = (("SSL_read", "SSL_read_ex", "ssl_read_internal"),
                     ("SSL_write", "SSL_write_ex", "ssl_write_internal"))


def _x86_emulated(code: bytes) -> bool:
    """Whether x86's uprobes emulate the instruction at the start of ``code`` (arch/x86/kernel/
    uprobes.c: push of a register, call rel32, jmp, jcc, nop)."""
    if len(code) < 2:
        return False
    op = code[1] if code[0] == 0x41 else code[0]  # REX.B: push %r8…%r15
    if 0x50 <= op <= 0x57:
        return True
    return (code[0] in (0x90, 0xE8, 0xE9, 0xEB) or 0x70 <= code[0] <= 0x7F
            or (code[0] == 0x0F and (0x80 <= code[1] <= 0x8F or code[1] == 0x1F)))


def _entry_point(elf: ELFFile, machine: str, vaddr: int) -> tuple[int, int, bool] | None:
    """(virtual address, file offset, emulated) of where a function's entry is probed: after an
    ``endbr64`` (not emulated) when the next instruction is, since the return address is still on
    top of the stack there."""
    code = _read_at(elf, vaddr, 16)
    offset = _file_offset(elf, vaddr)
    if offset is None or not code:
        return None
    if machine != "EM_X86_64":
        return vaddr, offset, False
    if code.startswith(_ENDBR64) and _x86_emulated(code[4:]):
        return vaddr + 4, offset + 4, True
    return vaddr, offset, _x86_emulated(code)


def _first_call(elf: ELFFile, vaddr: int, size: int) -> int | None:
    """The target of a function's first direct call, before any return or jump out."""
    import capstone

    code = _read_at(elf, vaddr, min(size, 256))
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for address, length, mnemonic, _ops in disassembler.disasm_lite(code, vaddr):
        first = code[address - vaddr]
        if mnemonic == "call":
            if first != 0xE8 or length != 5:
                return None  # indirect
            rel = int.from_bytes(code[address - vaddr + 1:address - vaddr + 5], "little", signed=True)
            return address + length + rel
        if mnemonic in ("ret", "jmp"):
            return None
    return None


def openssl_probe_points(elf: ELFFile, machine: str, found: dict[str, tuple[int, int]]) -> tuple[ProbePoint, ...]:
    """Where the probe takes each OpenSSL function's calls: its entry, unless that instruction is
    single-stepped and both forms (SSL_read and SSL_read_ex; SSL_write and SSL_write_ex) first call
    one internal function whose entry is emulated: then that function, once for both forms."""
    points: list[ProbePoint] = []
    entries = {name: _entry_point(elf, machine, found[name][0]) for name in (*OPENSSL_DATA, OPENSSL_HANDSHAKE)
               if name in found}
    done: set[str] = set()
    if machine == "EM_X86_64":
        for plain, ex, internal in _OPENSSL_WRAPPERS:
            if not (entries.get(plain) and entries.get(ex)) or (entries[plain][2] and entries[ex][2]):
                continue
            callee = _first_call(elf, *found[plain])
            if callee is None or callee != _first_call(elf, *found[ex]):
                continue
            entry = _entry_point(elf, machine, callee)
            if entry is not None and entry[2]:
                points.append(ProbePoint(internal, entry[1], True))
                done |= {plain, ex}
    for name, entry in entries.items():
        if name not in done and entry is not None:
            points.append(ProbePoint(name, entry[1], entry[2]))
    return tuple(points)


def _go_stack_check(code: bytes) -> int:
    """Where a Go function's entry is probed, from its first instruction: at the conditional jump
    of its stack check (``cmp 0x10(%r14),%rsp; jbe`` or ``lea -N(%rsp),%r12; cmp 0x10(%r14),%r12;
    jbe``), which the kernel emulates, when the instructions before it write no register the
    programs read (the arguments, R14); else 0, the entry.  When the stack grows, the function
    starts again and the probe fires twice for one call: go_enter in bpf/tls.bpf.c allows for it."""
    import capstone

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for address, length, mnemonic, ops in disassembler.disasm_lite(code, 0):
        if mnemonic == "cmp" or (mnemonic == "lea" and ops.startswith(("r12,", "r13,"))):
            continue
        if mnemonic.startswith("j") and mnemonic != "jmp" and _x86_emulated(code[address:address + length]):
            return address
        return 0
    return 0


def inspect(path: str) -> Target | None:
    """What ``path`` offers the probe: None when it uses no TLS we know."""
    try:
        with open(path, "rb") as stream:
            if stream.read(4) != b"\x7fELF":
                return None
            stream.seek(0)
            elf = ELFFile(stream)
            machine = elf["e_machine"]
            if machine not in GO_REGISTER_ABI:
                return None
            version = go_version(elf)
            if version:
                return _inspect_go(path, elf, machine, version)
            found = _symbols(elf, set(OPENSSL_DATA) | {OPENSSL_HANDSHAKE})
            if "SSL_read" in found and "SSL_write" in found:
                return Target(path, "openssl", tuple(n for n in (*OPENSSL_DATA, OPENSSL_HANDSHAKE) if n in found),
                              openssl=openssl_probe_points(elf, machine, found))
            if _LIBSSL.search(path):
                return Target(path, "openssl", reason="no SSL_read/SSL_write symbols")
            if elf.get_section_by_name(".symtab") is None and _mentions_openssl(elf):
                return Target(path, "openssl", reason="OpenSSL (or a fork) linked in without symbols (stripped)")
            return None
    except (OSError, ELFError, ValueError, struct.error) as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


_LINKED_IN = re.compile(rb"OpenSSL \d+\.\d+\.\d+[a-z]* +\d+ [A-Z][a-z]{2} \d{4}|BoringSSL")


def _needs_libssl(elf: ELFFile) -> bool:
    dynamic = elf.get_section_by_name(".dynamic")
    if dynamic is None:
        return False
    return any(tag.entry.d_tag == "DT_NEEDED" and _LIBSSL.search("/" + tag.needed) for tag in dynamic.iter_tags())


def _mentions_openssl(elf: ELFFile) -> bool:
    """OpenSSL's (or BoringSSL's) version text in a binary that does not load libssl: the
    library is linked in."""
    section = elf.get_section_by_name(".rodata")
    if section is None or section["sh_size"] > 256 << 20 or _needs_libssl(elf):
        return False
    return _LINKED_IN.search(section.data()) is not None


def _inspect_go(path: str, elf: ELFFile, machine: str, version: str) -> Target | None:
    pclntab = elf.get_section_by_name(".gopclntab")
    uses_tls = pclntab is not None and GO_WRITE.encode() in pclntab.data()
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        if not uses_tls:
            return None
        return Target(path, "go", version=version, reason="stripped Go binary (no symbol table)")
    found = _symbols(elf, {GO_READ, GO_WRITE, GO_HANDSHAKE})
    if GO_READ not in found or GO_WRITE not in found:
        return None  # no crypto/tls in it
    match = _GO_VERSION.match(version)
    if match is None:
        return Target(path, "go", version=version, reason=f"unknown Go version {version!r}")
    if (int(match.group(1)), int(match.group(2))) < GO_REGISTER_ABI[machine]:
        need = ".".join(map(str, GO_REGISTER_ABI[machine]))
        return Target(path, "go", version=version, reason=f"{version}: arguments on the stack (Go {need}+ probed)")
    functions = []
    for name in (GO_READ, GO_WRITE, GO_HANDSHAKE):
        if name not in found:
            continue
        value, size = found[name]
        entry = _file_offset(elf, value)
        if entry is not None and machine == "EM_X86_64":
            entry += _go_stack_check(_read_at(elf, value, 32))
        returns = _returns(elf, machine, value, size)
        if entry is None or not returns:
            return Target(path, "go", version=version, reason=f"cannot find the returns of {name}")
        functions.append(GoFunction(name, entry, returns))
    return Target(path, "go", version=version, go=tuple(functions))


__all__ = ["GoFunction", "ProbePoint", "Target", "openssl_probe_points", "file_key", "go_version", "inspect", "libssl_in_maps", "process_ids",
           "system_libssl"]
