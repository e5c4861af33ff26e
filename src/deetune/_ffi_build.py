"""Builds deetune's cffi declarations ahead of time (cffi's "out-of-line ABI mode").

Parsing C declarations at run time needs pycparser, whose parser tables cost every
agent about 5 MB of memory and a tenth of a second at start.  The declarations
are parsed once here instead, into two small generated modules that only need
``_cffi_backend``:

* ``deetune/_ffi_libbpf.py``: the part of libbpf's API that :mod:`deetune.libbpf` calls;
* ``deetune/_ffi_records.py``: the record layouts of ``bpf/deetune.h`` (:mod:`deetune.records`).

Both are checked in.  After changing ``LIBBPF_CDEF`` or ``bpf/deetune.h``, run
``make ffi`` (``python -m deetune._ffi_build``); tests/test_ffi_build.py fails
while a generated module is out of date.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent
SOURCE_HEADER = PACKAGE.parents[1] / "bpf" / "deetune.h"

LIBBPF_CDEF = """
    typedef unsigned char __u8;
    typedef unsigned int __u32;
    typedef int __s32;
    typedef unsigned long long __u64;

    struct bpf_object;
    struct bpf_program;
    struct bpf_map;
    struct bpf_link;
    struct btf;

    struct btf_type {
        __u32 name_off;
        __u32 info;
        __u32 size_or_type;
    };
    struct btf_var_secinfo {
        __u32 type;
        __u32 offset;
        __u32 size;
    };

    struct bpf_uprobe_opts {
        size_t sz;
        size_t ref_ctr_offset;
        __u64 bpf_cookie;
        _Bool retprobe;
        const char *func_name;
    };

    typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *ap);
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
    int vsnprintf(char *str, size_t size, const char *format, void *ap);

    struct bpf_object *bpf_object__open_file(const char *path, const void *opts);
    int bpf_object__load(struct bpf_object *obj);
    void bpf_object__close(struct bpf_object *obj);
    const char *bpf_object__name(const struct bpf_object *obj);
    struct btf *bpf_object__btf(const struct bpf_object *obj);
    struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
    struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);

    const char *bpf_program__name(const struct bpf_program *prog);
    const char *bpf_program__section_name(const struct bpf_program *prog);
    int bpf_program__set_autoload(struct bpf_program *prog, _Bool autoload);
    _Bool bpf_program__autoload(const struct bpf_program *prog);
    int bpf_program__fd(const struct bpf_program *prog);
    struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
    struct bpf_link *bpf_program__attach_tracepoint(const struct bpf_program *prog,
                                                    const char *tp_category, const char *tp_name);
    struct bpf_link *bpf_program__attach_raw_tracepoint(const struct bpf_program *prog,
                                                        const char *tp_name);
    struct bpf_link *bpf_program__attach_trace(const struct bpf_program *prog);
    struct bpf_link *bpf_program__attach_uprobe_opts(const struct bpf_program *prog, int pid,
                                                     const char *binary_path, size_t func_offset,
                                                     const struct bpf_uprobe_opts *opts);
    struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);
    int bpf_link__destroy(struct bpf_link *link);
    int bpf_link__fd(const struct bpf_link *link);

    const char *bpf_map__name(const struct bpf_map *map);
    int bpf_map__fd(const struct bpf_map *map);
    int bpf_map__type(const struct bpf_map *map);
    __u32 bpf_map__key_size(const struct bpf_map *map);
    __u32 bpf_map__value_size(const struct bpf_map *map);
    __u32 bpf_map__max_entries(const struct bpf_map *map);
    int bpf_map__set_max_entries(struct bpf_map *map, __u32 max_entries);
    const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);
    int bpf_map__set_initial_value(struct bpf_map *map, const void *data, size_t size);

    int bpf_map_lookup_elem(int fd, const void *key, void *value);
    int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
    int bpf_map_delete_elem(int fd, const void *key);
    int bpf_map_get_next_key(int fd, const void *key, void *next_key);
    struct bpf_map_batch_opts {
        size_t sz;
        __u64 elem_flags;
        __u64 flags;
    };
    int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values, __u32 *count,
                             const struct bpf_map_batch_opts *opts);
    int bpf_map__reuse_fd(struct bpf_map *map, int fd);

    int libbpf_num_possible_cpus(void);
    int libbpf_probe_bpf_prog_type(int prog_type, const void *opts);

    __s32 btf__find_by_name_kind(const struct btf *btf, const char *type_name, __u32 kind);
    const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
    const char *btf__name_by_offset(const struct btf *btf, __u32 offset);
"""

#: The kernel's fixed-width types, which deetune.h (a BPF header) takes from vmlinux.h.
HEADER_PREAMBLE = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;
typedef long long __s64;
"""


def header_cdef(text: str) -> str:
    """A BPF header as cffi declarations: its preprocessor lines dropped (include
    guards and #includes; the header keeps its constants in enums for this reason)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def headers_cdef(*texts: str) -> str:
    """BPF headers, in order, as one set of cffi declarations with the fixed-width types."""
    return HEADER_PREAMBLE + "\n".join(header_cdef(text) for text in texts)


def generate(module: str, cdef: str) -> str:
    """The source of an out-of-line module ``deetune.<module>`` declaring ``cdef``."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(cdef)
    builder.set_source(f"deetune.{module}", None)
    out = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):  # cffi prints "generating <file>"
        builder.emit_python_code(out)
    return f"# Generated by python -m deetune._ffi_build (make ffi) from {_ORIGINS[module]}: do not edit.\n" + out.getvalue()


_ORIGINS = {"_ffi_libbpf": "deetune/_ffi_build.py's LIBBPF_CDEF", "_ffi_records": "bpf/deetune.h"}


def sources(header: pathlib.Path = SOURCE_HEADER) -> dict[str, str]:
    """File name → generated source, for both modules."""
    return {
        "_ffi_libbpf.py": generate("_ffi_libbpf", LIBBPF_CDEF),
        "_ffi_records.py": generate("_ffi_records", headers_cdef(header.read_text())),
    }


def main() -> int:
    for name, text in sources().items():
        path = PACKAGE / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
