import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Third-party captures with expected results; tests skip when the folder is absent.
VECTORS = pathlib.Path(os.environ.get("DEETUNE_VECTORS", ROOT.parent / "shared" / "protocol-vectors"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture
def vectors() -> pathlib.Path:
    if not VECTORS.is_dir():
        pytest.skip(f"protocol vectors not found at {VECTORS}")
    return VECTORS


def bpf_unavailable_reason() -> str | None:
    """Why tests that load BPF cannot run here, or None."""
    from deetune import resources

    if os.geteuid() != 0:
        return "needs root"
    if not pathlib.Path("/sys/kernel/btf/vmlinux").exists():
        return "no kernel BTF at /sys/kernel/btf/vmlinux"
    missing = [n for n in ("process", "tcp") if not resources.object_path(n).exists()]
    if missing:
        return f"BPF objects not built ({', '.join(missing)}): run `make bpf`"
    return None


@pytest.fixture(autouse=True)
def _bpf_gate(request):
    """``@pytest.mark.bpf`` tests skip with the reason when BPF is unavailable,
    and fail instead under CI=true: CI must never pass by skipping them."""
    if request.node.get_closest_marker("bpf") is None:
        return
    reason = bpf_unavailable_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"BPF unavailable under CI=true: {reason}")
    pytest.skip(f"BPF unavailable: {reason}")
