"""Saves docs/ui.png: the web UI over the test topology, in headless Chromium.

    .venv/bin/python docs/make_screenshot.py [PATH]

It runs tests/test_api.py::test_ui_screenshot (the same fake store and server as the UI
tests) with DEETUNE_UI_SCREENSHOT set.  Needs `make ui` and chromium.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[0]).resolve() if argv else ROOT / "docs" / "ui.png"
    env = {**os.environ, "DEETUNE_UI_SCREENSHOT": str(out)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_api.py::test_ui_screenshot"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    if result.returncode == 0:
        print(f"saved {out}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
