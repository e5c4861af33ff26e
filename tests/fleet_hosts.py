"""A fleet of hosts on one kernel: network namespaces on a bridge the test makes, an agent per
namespace (``--netns``), real servers inside them.  Addresses come from a /24 of 10.0.0.0/8 that
no route of this machine uses; the bridge holds .254 of it (Prometheus and the fleet server run
in the test's own namespace and scrape through it).  Everything is removed at the end."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence

from tests.servers import stop_process, unavailable


def _free_subnet() -> ipaddress.IPv4Network:
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unicast") and len(line.split()) > 1:
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free /24 in 10.200.0.0-10.250.255.255")


class Fleet:
    """Namespaces on a bridge; :meth:`add_host` makes one, :meth:`spawn` runs a process in it."""

    def __init__(self) -> None:
        if shutil.which("ip") is None:
            unavailable("iproute2 (ip) not installed")
        self.tag = uuid.uuid4().hex[:6]
        self.net = _free_subnet()
        self.bridge = f"dtbr{self.tag}"
        self.hosts: dict[str, str] = {}  # name → address
        self.namespaces: dict[str, str] = {}  # name → netns name
        self.procs: list[subprocess.Popen] = []
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.net[254]}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")

    @staticmethod
    def _ip(*args: str, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    def add_host(self, name: str) -> str:
        """A namespace with one address on the bridge; returns the address."""
        index = len(self.hosts) + 1
        netns = f"dt-{self.tag}-{name}"
        veth, peer = f"dtv{self.tag}{index}", f"dtp{self.tag}{index}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        self.namespaces[name] = netns
        self._ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        self._ip("link", "set", peer, "netns", netns)
        self._ip("link", "set", veth, "master", self.bridge)
        self._ip("link", "set", veth, "up")
        address = str(self.net[index])
        self._ip("addr", "add", f"{address}/24", "dev", peer, netns=netns)
        self._ip("link", "set", peer, "up", netns=netns)
        self._ip("link", "set", "lo", "up", netns=netns)
        self.hosts[name] = address
        return address

    def spawn(self, host: str | None, args: Sequence[str], *, env: dict[str, str] | None = None,
              log: str | None = None, stdout: int | None = None) -> subprocess.Popen:
        """A process in ``host``'s namespace (or ours with None), stopped by :meth:`close`."""
        prefix = ["ip", "netns", "exec", self.namespaces[host]] if host else []
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen([*prefix, *args], stdout=stdout if stdout is not None else out,
                                stderr=subprocess.STDOUT if log else subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
        self.procs.append(proc)
        return proc

    def run(self, host: str, args: Sequence[str], *, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.namespaces[host], *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})

    def wait_listening(self, host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
        # From our namespace: call it before the host's agent starts, or this is traffic it reports.
        probe = f"import socket; socket.create_connection(({self.hosts[host]!r}, {port}), timeout=1).close()"
        deadline = time.monotonic() + timeout
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode} before listening on {port}")
            if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(0.2)

    def stop(self, proc: subprocess.Popen) -> None:
        stop_process(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                    proc.wait(20)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGKILL)
                        proc.wait(10)
        for netns in self.namespaces.values():
            subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], check=False, capture_output=True)


def http_json(url: str, token: str | None = None, timeout: float = 30) -> object:
    import json

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return json.load(response)
