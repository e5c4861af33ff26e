"""Where the compiled BPF objects and the shared header live.

Installed: package data under ``deetune/_bpf/<arch>/``.  In a source checkout
before ``make bpf``, the header is read from ``bpf/`` so that the unit tests of
record layouts still run.
"""

from __future__ import annotations

import os
import pathlib
import platform

PACKAGE_BPF = pathlib.Path(__file__).resolve().parent / "_bpf"
SOURCE_BPF = pathlib.Path(__file__).resolve().parents[2] / "bpf"

#: uname machine → the name used in build directories and __TARGET_ARCH_*.
ARCHES = {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64", "arm64": "arm64"}


def machine_arch() -> str:
    machine = platform.machine().lower()
    try:
        return ARCHES[machine]
    except KeyError:
        raise RuntimeError(f"unsupported architecture {machine}: deetune builds BPF objects for x86_64 and arm64") from None


def bpf_dir() -> pathlib.Path:
    """Directory holding ``deetune.h``."""
    if (PACKAGE_BPF / "deetune.h").exists():
        return PACKAGE_BPF
    return SOURCE_BPF


def object_path(name: str, arch: str | None = None) -> pathlib.Path:
    """Path of ``<name>.bpf.o`` for ``arch`` (default: this machine's).

    ``DEETUNE_BPF_DIR`` overrides the directory (for objects built elsewhere).
    """
    override = os.environ.get("DEETUNE_BPF_DIR")
    base = pathlib.Path(override) if override else PACKAGE_BPF / (arch or machine_arch())
    return base / f"{name}.bpf.o"
