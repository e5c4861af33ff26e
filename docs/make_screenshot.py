"""Saves docs/ui.png: the web UI in headless Chromium.

    .venv/bin/python docs/make_screenshot.py [PATH]
    .venv/bin/python docs/make_screenshot.py --url http://127.0.0.1:9477 [--select NAME] [PATH]

Without ``--url`` it runs tests/test_api.py::test_ui_screenshot (the fake store and server of
the UI tests) with DEETUNE_UI_SCREENSHOT set.  With ``--url`` it photographs the UI of a running
agent (``python -m deetune.agent --api 127.0.0.1:9477``) as it is, with the service ``--select``
opened in the details panel; ``--token`` for an agent with an API token.  docs/ui.png is taken
this way from the application of tests/test_topology_e2e.py
(``DEETUNE_UI_SCREENSHOT=docs/ui.png pytest tests/test_topology_e2e.py``).
Needs `make ui` and chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent


def from_test_topology(out: pathlib.Path) -> int:
    env = {**os.environ, "DEETUNE_UI_SCREENSHOT": str(out)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "tests/test_api.py::test_ui_screenshot"]
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("make_screenshot: chromium not found (apt-get install chromium)")


def from_agent(out: pathlib.Path, url: str, select: str | None, token: str | None, window: str) -> int:
    base = url.rstrip("/")
    # The UI draws what /api/topology answers: say what that is, and fail early on a wrong URL.
    request = urllib.request.Request(f"{base}/api/topology?window={window}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            topology = json.load(response)
    except (OSError, urllib.error.URLError) as exc:
        print(f"make_screenshot: {base}: {exc}", file=sys.stderr)
        return 1
    print(f"{len(topology['nodes'])} services, {len(topology['edges'])} edges: "
          + ", ".join(n["name"] for n in topology["nodes"]))
    params = {"window": window}
    if select:
        params["select"] = select
    if token:
        params["token"] = token
    page = f"{base}/?{urllib.parse.urlencode(params)}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="deetune-chromium-") as profile:
        cmd = [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            "--hide-scrollbars", "--window-size=1280,800", f"--screenshot={out}", page,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 or not out.exists():
        print(f"make_screenshot: chromium failed ({result.returncode}): {result.stderr[-2000:]}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make_screenshot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", default=str(ROOT / "docs" / "ui.png"), help="PNG to write (docs/ui.png)")
    parser.add_argument("--url", help="a running agent's API and UI (http://HOST:PORT); default: the test topology")
    parser.add_argument("--select", metavar="NAME", help="with --url: the service to open in the details panel")
    parser.add_argument("--token", default=os.environ.get("DEETUNE_API_TOKEN"), help="with --url: the API token")
    parser.add_argument("--window", default="15m", choices=("5m", "15m", "1h", "6h", "24h"),
                        help="with --url: the UI's time window (default 15m)")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.path).resolve()
    if args.url is None:
        if args.select:
            parser.error("--select goes with --url")
        code = from_test_topology(out)
    else:
        code = from_agent(out, args.url, args.select, args.token, args.window)
    if code == 0:
        print(f"saved {out}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
