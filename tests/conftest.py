import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Third-party captures with expected results; tests skip when the folder is absent.
VECTORS = pathlib.Path(os.environ.get("DEETUNE_VECTORS", ROOT.parent / "shared" / "protocol-vectors"))


@pytest.fixture
def vectors() -> pathlib.Path:
    if not VECTORS.is_dir():
        pytest.skip(f"protocol vectors not found at {VECTORS}")
    return VECTORS
