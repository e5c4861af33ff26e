"""``python -m deetune.server``: the fleet's API and UI on Prometheus; ``scrape-config``.

::

    python -m deetune.server --prometheus http://127.0.0.1:9090 --api 127.0.0.1:9478
    python -m deetune.server --agent 10.0.0.1:9464 --agent 10.0.0.2:9464 --run-prometheus /var/lib/deetune/prom
    python -m deetune.server scrape-config --agent 10.0.0.1:9464 [--file-sd PATH] [--rules PATH] > prometheus.yml

Exit codes: 0 done, 1 runtime failure, 2 bad usage; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Sequence

from deetune.server import DEFAULT_SERVER_HOST, DEFAULT_SERVER_PORT
from deetune.server.scrape import (ConfigError, check_duration, check_target, read_agents, scrape_config, write_file_sd,
                                   write_rules)

log = logging.getLogger("deetune.server")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _agents(args: argparse.Namespace) -> list[str]:
    targets = [check_target(t) for t in args.agent or ()]
    if args.agents:
        targets += read_agents(args.agents)
    return targets


def _add_agent_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agent", action="append", metavar="HOST:PORT",
                        help="an agent's Prometheus sink (its --sink prometheus:HOST:PORT); repeatable")
    parser.add_argument("--agents", metavar="FILE", help="a file of agents, one HOST:PORT per line")
    parser.add_argument("--file-sd", metavar="PATH",
                        help="write the agents to this file-based discovery file and point the config at it")
    parser.add_argument("--scrape-interval", default="15s", metavar="DURATION", help="default 15s")
    parser.add_argument("--job", default="deetune", help="the scrape job's name (default deetune)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m deetune.server",
                     description="The fleet's topology, API and web UI, from a Prometheus scraping every agent.",
                     epilog="Subcommand: 'scrape-config' (a prometheus.yml for a list of agents).")
    parser.add_argument("--prometheus", metavar="URL", help="the Prometheus to query (e.g. http://127.0.0.1:9090)")
    parser.add_argument("--run-prometheus", metavar="DIR",
                        help="start Prometheus here instead (config and data in DIR), scraping --agent/--agents")
    parser.add_argument("--prometheus-listen", type=_host_port, default=("127.0.0.1", 0), metavar="HOST:PORT",
                        help="where a --run-prometheus Prometheus listens (default: a free port of 127.0.0.1)")
    _add_agent_options(parser)
    parser.add_argument("--api", type=_host_port, default=(DEFAULT_SERVER_HOST, DEFAULT_SERVER_PORT),
                        metavar="HOST:PORT", help=f"serve the API and UI here (default {DEFAULT_SERVER_HOST}:{DEFAULT_SERVER_PORT})")
    parser.add_argument("--api-token", default=os.environ.get("DEETUNE_API_TOKEN"), metavar="TOKEN",
                        help="bearer token for this API (required off loopback; default $DEETUNE_API_TOKEN)")
    parser.add_argument("--agent-token", default=os.environ.get("DEETUNE_AGENT_TOKEN"), metavar="TOKEN",
                        help="bearer token of the agents' APIs, for per-request detail (default $DEETUNE_AGENT_TOKEN)")
    parser.add_argument("--idc-label", default="idc", metavar="NAME",
                        help="the agents' label that names their data centre (default idc)")
    parser.add_argument("--selector", default="", metavar="MATCHERS",
                        help="label matchers added to every query, e.g. 'job=\"deetune\"'")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def cmd_scrape_config(argv: Sequence[str]) -> int:
    parser = _Parser(prog="python -m deetune.server scrape-config",
                     description="Print a prometheus.yml scraping the agents (and write the --file-sd file).")
    _add_agent_options(parser)
    parser.add_argument("--rules", metavar="PATH",
                        help="write the server's recording rules to this file and load it from the config "
                             "(a whole fleet's topology reads them: much faster)")
    args = parser.parse_args(argv)
    targets = _agents(args)
    if not targets and not args.file_sd:
        raise UsageError("give the agents: --agent HOST:PORT (repeatable) or --agents FILE")
    check_duration(args.scrape_interval, "interval")
    if args.file_sd and targets:
        write_file_sd(args.file_sd, targets)
    rules = os.path.abspath(args.rules) if args.rules else None
    if rules:
        write_rules(rules, args.scrape_interval)
    sys.stdout.write(scrape_config(targets, job=args.job, interval=args.scrape_interval, file_sd=args.file_sd,
                                   rules=rules))
    return EXIT_OK


class PrometheusProcess:
    """Prometheus from its binary (Debian's ``prometheus``), with the generated config."""

    def __init__(self, directory: str, config: str, listen: tuple[str, int]) -> None:
        binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
        if binary is None:
            raise UsageError("--run-prometheus: no prometheus binary (apt-get install prometheus)")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "prometheus.yml")
        with open(path, "w") as f:
            f.write(config)
        host, port = listen
        if port == 0:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.url = f"http://{address}"
        self.log = open(os.path.join(directory, "prometheus.log"), "ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={os.path.join(directory, 'data')}",
             f"--web.listen-address={address}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode} (see {directory}/prometheus.log)")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not become ready within 60 s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def cmd_run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="deetune: %(levelname)s %(name)s: %(message)s")
    if bool(args.prometheus) == bool(args.run_prometheus):
        raise UsageError("give --prometheus URL (an existing Prometheus) or --run-prometheus DIR (start one)")
    check_duration(args.scrape_interval, "--scrape-interval")
    from deetune.api.server import ApiServer
    from deetune.server.agents import Agents, FleetRecordings
    from deetune.server.fleet import FleetQueries
    from deetune.server.prom import Prometheus

    prometheus_process = None
    if args.run_prometheus:
        targets = _agents(args)
        if not targets and not args.file_sd:
            raise UsageError("--run-prometheus needs the agents: --agent HOST:PORT or --agents FILE")
        if args.file_sd and targets:
            write_file_sd(args.file_sd, targets)
        os.makedirs(args.run_prometheus, exist_ok=True)
        rules = os.path.abspath(os.path.join(args.run_prometheus, "deetune-rules.yml"))
        write_rules(rules, args.scrape_interval)
        config = scrape_config(targets, job=args.job, interval=args.scrape_interval, file_sd=args.file_sd,
                               rules=rules)
        prometheus_process = PrometheusProcess(args.run_prometheus, config, args.prometheus_listen)
        url = prometheus_process.url
    else:
        url = args.prometheus
    try:
        try:
            prom = Prometheus(url)
        except ValueError as exc:
            raise UsageError(f"--prometheus: {exc}") from None
        agents = Agents(args.agent_token)
        queries = FleetQueries(prom, idc_label=args.idc_label, selector=args.selector, agents=agents)
        recordings = FleetRecordings(agents, queries.reporting_hosts)
        host, port = args.api
        try:
            api = ApiServer(queries, host, port, token=args.api_token, recordings=recordings)
            api.start()
        except (ValueError, OSError) as exc:
            raise UsageError(f"--api: {exc}") from None
        print(f"deetune server: {api.url} (Prometheus {url})", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait(args.duration)
        api.stop()
    finally:
        if prometheus_process is not None:
            prometheus_process.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "scrape-config":
            return cmd_scrape_config(argv[1:])
        return cmd_run(argv)
    except (UsageError, ConfigError) as exc:
        print(f"deetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, OSError) as exc:
        print(f"deetune: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
