"""Service identity (deetune.services): real processes started here, cgroup
layouts of every runtime, fake runtime state directories, the endpoint
mapping file, third-party resolvers, caching."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from deetune import procnet, services
from deetune.hookspecs import hookimpl
from deetune.plugins import Plugins
from deetune.services import (
    Container,
    ContainerRef,
    ContainerResolver,
    EndpointMapping,
    MappingError,
    ProcessGone,
    ProcessInfo,
    ServiceResolver,
    image_basename,
    parse_container,
    resolve_executable,
    systemd_unit,
)

ID = "3f4e" + "a1" * 30  # 64 hex digits
ID2 = "b7" * 32
HOSTNAME = socket.gethostname()

# ----------------------------------------------------------------------------- helpers

SERVER = textwrap.dedent(
    """
    import socket, sys
    # argv[1]: an address to listen on (port chosen by the kernel), or nothing.
    if len(sys.argv) > 1:
        family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
        server = socket.socket(family)
        server.bind((sys.argv[1], 0))
        server.listen()
        print(server.getsockname()[1], flush=True)
    else:
        print("ready", flush=True)
    sys.stdin.read()  # until the test closes stdin
    """
)


@pytest.fixture
def plugins() -> Plugins:
    return Plugins(load_entry_points=False)


@pytest.fixture
def resolver(plugins) -> ServiceResolver:
    return ServiceResolver(plugins)


@pytest.fixture
def spawn(tmp_path):
    """Start a process in tmp_path; returns (Popen, first line it printed).
    Processes are stopped by their own pid at teardown."""
    started: list[subprocess.Popen] = []
    base_env = {k: v for k, v in os.environ.items()
                if k not in services.ENV_KEYS and not k.startswith("OTEL_")}

    def start(args: list[str], *, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(args, cwd=tmp_path, env={**base_env, **(env or {})}, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(proc)
        line = proc.stdout.readline().strip()
        assert line, f"{args} printed nothing (exit {proc.poll()})"
        return proc, line

    yield start
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def app_script(tmp_path) -> pathlib.Path:
    path = tmp_path / "app.py"
    path.write_text(SERVER)
    return path


def info(cmdline: list[str], *, comm: str | None = None, exe: str | None = None, cgroup: str = "0::/\n",
         environ: dict[str, str] | None = None, pid: int = 4242) -> ProcessInfo:
    """A process as the resolvers would see it, for parsing tests."""
    if comm is None:
        comm = os.path.basename(cmdline[0])[:15] if cmdline else "kworker/0:1"
    return ProcessInfo(pid=pid, comm=comm, exe=exe, cmdline=cmdline, cgroup=cgroup,
                       environ=environ or {}, host="test-host")


def host_ipv4() -> str:
    addresses, _ = services.local_addresses()
    for addr in sorted(map(str, addresses)):
        if "." in addr and not addr.startswith("127."):
            return addr
    pytest.skip("this host has no non-loopback IPv4 address")


# ----------------------------------------------------------------------------- ProcessInfo


def test_process_info_reads_a_live_process(spawn, app_script):
    proc, _ = spawn([sys.executable, "app.py"], env={"DEETUNE_SERVICE": "billing", "SECRET_TOKEN": "hunter2"})
    process = ProcessInfo.read(proc.pid)
    assert process.pid == proc.pid
    assert process.comm  # "python…" (the kernel's name of the executable)
    assert process.cmdline == [sys.executable, "app.py"]
    assert os.path.realpath(process.exe) == os.path.realpath(sys.executable)
    assert process.cgroup == pathlib.Path(f"/proc/{proc.pid}/cgroup").read_text()
    # Only the variables service naming needs are kept.
    assert process.environ == {"DEETUNE_SERVICE": "billing"}
    assert process.host == HOSTNAME


def test_process_info_of_an_exited_process_raises_process_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessGone, match=f"process {proc.pid} is gone"):
        ProcessInfo.read(proc.pid)


# ----------------------------------------------------------------------------- real processes


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OTEL_SERVICE_NAME": "checkout"}, "checkout"),
        ({"DEETUNE_SERVICE": "billing"}, "billing"),
        ({"OTEL_SERVICE_NAME": "checkout", "DEETUNE_SERVICE": "billing"}, "checkout"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=cart%20v2"}, "cart v2"),
        ({"OTEL_SERVICE_NAME": "  "}, "app"),  # blank: ignored
    ],
)
def test_service_from_environment(spawn, app_script, resolver, env, expected):
    proc, _ = spawn([sys.executable, "app.py"], env=env)
    instance = resolver.instance(proc.pid)
    assert instance.service == expected
    assert (instance.host, instance.pid, instance.container_id) == (HOSTNAME, proc.pid, None)
    assert instance.id == f"{HOSTNAME}:{proc.pid}"


def test_python_script(spawn, app_script, resolver):
    proc, _ = spawn([sys.executable, "app.py"])
    assert resolver.instance(proc.pid).service == "app"
    proc2, _ = spawn([sys.executable, "-u", str(app_script)])
    assert resolver.instance(proc2.pid).service == "app"


def test_python_module(spawn, tmp_path, resolver):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(SERVER)
    proc, _ = spawn([sys.executable, "-m", "mypkg.server"], env={"PYTHONPATH": str(tmp_path)})
    assert resolver.instance(proc.pid).service == "mypkg.server"


def test_node_script(spawn, tmp_path, resolver):
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    (tmp_path / "server.js").write_text(
        "const net = require('net');\n"
        "const s = net.createServer();\n"
        "s.listen(0, '127.0.0.1', () => console.log(s.address().port));\n"
        "process.stdin.resume(); process.stdin.on('end', () => process.exit(0));\n"
    )
    proc, port = spawn([node, "server.js"])
    assert resolver.instance(proc.pid).service == "server"
    assert resolver.endpoint("127.0.0.1", int(port)) == "server"


def test_shell_script(spawn, tmp_path, resolver):
    (tmp_path / "run.sh").write_text("echo ready\nread line\n")
    proc, _ = spawn(["bash", "run.sh"])
    assert resolver.instance(proc.pid).service == "run"


def test_loopback_listener_names_the_endpoint(spawn, app_script, resolver):
    _, port = spawn([sys.executable, "app.py", "127.0.0.1"], env={"DEETUNE_SERVICE": "inventory"})
    port = int(port)
    assert resolver.endpoint("127.0.0.1", port) == "inventory"
    assert resolver.endpoint("::ffff:127.0.0.1", port) == "inventory"
    assert resolver.endpoint("0.0.0.0", port) == "inventory"  # connect(0.0.0.0) reaches 127.0.0.1
    assert resolver.is_local_listener("127.0.0.1", port)
    # Bound to 127.0.0.1 only: another loopback address does not reach it.
    assert not resolver.is_local_listener("127.0.0.2", port)
    assert resolver.endpoint("127.0.0.2", port) == f"127.0.0.2:{port}"


def test_wildcard_listener_on_another_host_address(spawn, app_script, resolver):
    address = host_ipv4()
    _, port = spawn([sys.executable, "app.py", "0.0.0.0"], env={"OTEL_SERVICE_NAME": "gateway"})
    port = int(port)
    assert resolver.endpoint(address, port) == "gateway"
    assert resolver.endpoint("127.0.0.1", port) == "gateway"
    assert resolver.is_local_listener(address, port)


def test_ipv6_dual_stack_listener(spawn, app_script, resolver):
    if not socket.has_ipv6 or not pathlib.Path("/proc/net/tcp6").exists():
        pytest.skip("no IPv6")
    _, port = spawn([sys.executable, "app.py", "::"], env={"DEETUNE_SERVICE": "search"})
    port = int(port)
    assert resolver.endpoint("::1", port) == "search"
    assert resolver.endpoint("[::1]", port) == "search"
    assert resolver.endpoint("127.0.0.1", port) == "search"  # "::" takes IPv4 too (no V6ONLY)


def test_exited_pid_is_named_from_comm(resolver):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    instance = resolver.instance(proc.pid, "worker")
    assert (instance.service, instance.pid, instance.comm, instance.host) == ("worker", proc.pid, "worker", HOSTNAME)
    resolver.forget(proc.pid)
    assert resolver.instance(proc.pid).service == f"pid-{proc.pid}"


def test_forget_after_exec_names_the_new_program(spawn, app_script, resolver):
    code = ("import os, sys; print('ready', flush=True); sys.stdin.readline(); "
            "os.execv(sys.executable, [sys.executable, 'app.py'])")
    proc, _ = spawn([sys.executable, "-c", code])
    python = os.path.basename(sys.executable)
    assert resolver.instance(proc.pid).service == python  # -c: no script, argv[0]'s name
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ready"  # printed by app.py
    assert resolver.instance(proc.pid).service == python  # cached until forgotten
    resolver.forget(proc.pid)
    assert resolver.instance(proc.pid).service == "app"


# ----------------------------------------------------------------------------- executables


@pytest.mark.parametrize(
    ("cmdline", "exe", "expected"),
    [
        (["python3", "app.py"], "/usr/bin/python3.11", "app"),
        (["/usr/bin/python3.11", "-u", "-W", "ignore", "-X", "dev", "/srv/shop/app.py", "--port", "80"], None, "app"),
        (["python3", "-uB", "app.py"], None, "app"),
        (["python", "-m", "mypkg.server", "--port", "8000"], None, "mypkg.server"),
        (["python3", "-mhttp.server"], None, "http.server"),
        (["python3", "-m", "mypkg.__main__"], None, "mypkg"),
        (["python3", "-OO", "-m", "uvicorn", "main:app"], None, "uvicorn"),
        (["python3", "/srv/mypkg/__main__.py"], None, "mypkg"),
        (["python3", "-c", "import app"], None, "python3"),
        (["python3"], None, "python3"),
        (["/usr/bin/python3", "/usr/local/bin/gunicorn", "app:app"], None, "gunicorn"),
        (["gunicorn: worker [app:app]"], "/usr/bin/python3.11", "gunicorn"),  # setproctitle
        (["pypy3", "bench.py"], None, "bench"),
        (["node", "server.js"], "/usr/bin/node", "server"),
        (["node", "--max-old-space-size=4096", "-r", "dotenv/config", "--inspect", "dist/server.mjs"], None, "server"),
        (["node", "-e", "require('./x')"], None, "node"),
        (["nodejs", "--require", "ts-node/register", "api.ts"], None, "api"),
        (["java", "-Xmx1g", "-Dspring.profiles.active=prod", "-jar", "/opt/foo.jar"], "/usr/lib/jvm/bin/java", "foo"),
        (["java", "-jar", "orders-service-1.4.2-SNAPSHOT.jar"], None, "orders-service"),
        (["java", "-cp", "/opt/tomcat/bin/bootstrap.jar", "org.apache.catalina.startup.Bootstrap", "start"], None,
         "Bootstrap"),
        (["java", "--add-opens", "java.base/java.lang=ALL-UNNAMED", "-m", "com.acme.app/com.acme.app.Main"], None,
         "Main"),
        (["ruby", "-Ilib", "-r", "bundler/setup", "app.rb"], None, "app"),
        (["ruby", "-e", "puts 1"], None, "ruby"),
        (["puma 6.4.0 (tcp://0.0.0.0:3000) [shop]"], "/usr/bin/ruby3.1", "puma"),
        (["perl", "-w", "-Mstrict", "-I", "lib", "worker.pl"], None, "worker"),
        (["perl", "-MO=Deparse", "tool.pl"], None, "tool"),
        (["perl", "-wle", "print 1"], None, "perl"),
        (["php", "-d", "memory_limit=1G", "artisan", "queue:work"], None, "artisan"),
        (["php", "-f", "/var/www/cron.php"], None, "cron"),
        (["php", "-S", "0.0.0.0:8000", "-t", "public"], None, "php"),
        (["/bin/bash", "/opt/backup.sh"], None, "backup"),
        (["bash", "-eo", "pipefail", "deploy.sh"], None, "deploy"),
        (["bash", "+o", "history", "deploy.sh"], None, "deploy"),
        (["python3", "", "+app.py"], None, "+app"),  # empty arguments skipped; "+" is no option here
        (["/bin/sh", "-c", "sleep 100"], None, "sh"),
        (["-bash"], "/usr/bin/bash", "bash"),  # a login shell
    ],
)
def test_executable_rules(cmdline, exe, expected):
    assert resolve_executable(info(cmdline, exe=exe)) == expected


@pytest.mark.parametrize(
    ("cmdline", "comm", "exe", "expected"),
    [
        (["/usr/sbin/nginx", "-g", "daemon off;"], "nginx", "/usr/sbin/nginx", "nginx"),
        (["nginx: worker process"], "nginx", "/usr/sbin/nginx", "nginx"),
        (["/usr/local/bin/order-processing-svc"], "order-processin", "/usr/local/bin/order-processing-svc",
         "order-processing-svc"),  # comm is truncated to 15 characters
        (["httpd", "-f"], "httpd", "/bin/busybox", "httpd"),  # a busybox applet
        (["/usr/bin/myapp"], "myapp-main", "/usr/bin/myapp", "myapp-main"),  # renamed through prctl
        (["/srv/app"], "app", "/srv/app (deleted)", "app"),
        ([], "kworker/0:1", None, "kworker/0:1"),  # kernel thread, or zombie
    ],
)
def test_other_programs_are_named_by_comm(cmdline, comm, exe, expected):
    assert resolve_executable(info(cmdline, comm=comm, exe=exe)) == expected


# ----------------------------------------------------------------------------- cgroup layouts

V1_DOCKER = "\n".join(
    f"{n}:{c}:/docker/{ID}"
    for n, c in [(12, "pids"), (11, "hugetlb"), (10, "net_cls,net_prio"), (9, "memory"), (8, "cpu,cpuacct"),
                 (7, "blkio"), (6, "freezer"), (5, "devices"), (4, "perf_event"), (3, "cpuset"), (2, "rdma"),
                 (1, "name=systemd")]
) + "\n0::/system.slice/containerd.service\n"


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        pytest.param(V1_DOCKER, ContainerRef(ID, "docker"), id="docker-v1-cgroupfs"),
        pytest.param(f"0::/docker/{ID}\n", ContainerRef(ID, "docker"), id="docker-v2-cgroupfs"),
        pytest.param(f"0::/system.slice/docker-{ID}.scope\n", ContainerRef(ID, "docker"), id="docker-v2-systemd"),
        pytest.param(f"12:pids:/system.slice/docker-{ID}.scope\n1:name=systemd:/system.slice/docker-{ID}.scope\n",
                     ContainerRef(ID, "docker"), id="docker-v1-systemd"),
        pytest.param(
            f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1c5d6a9e_3b2f_4c1d_9e8a_2f6b7c8d9e0f"
            f".slice/cri-containerd-{ID}.scope\n",
            ContainerRef(ID, "containerd"), id="k8s-containerd-v2-systemd"),
        pytest.param(
            f"11:memory:/kubepods/burstable/pod1c5d6a9e-3b2f-4c1d-9e8a-2f6b7c8d9e0f/{ID}\n"
            f"1:name=systemd:/kubepods/burstable/pod1c5d6a9e-3b2f-4c1d-9e8a-2f6b7c8d9e0f/{ID}\n",
            ContainerRef(ID, None), id="k8s-v1-cgroupfs"),
        pytest.param(f"0::/kubepods/besteffort/pod1c5d6a9e-3b2f-4c1d-9e8a-2f6b7c8d9e0f/{ID}\n",
                     ContainerRef(ID, None), id="k8s-v2-cgroupfs"),
        pytest.param(
            f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0"
            f".slice/crio-{ID}.scope\n",
            ContainerRef(ID, "cri-o"), id="k8s-crio-v2"),
        pytest.param(f"0::/kubepods.slice/kubepods-pod0f1e.slice/docker-{ID}.scope\n", ContainerRef(ID, "docker"),
                     id="k8s-dockershim-v2"),
        pytest.param(f"0::/machine.slice/libpod-{ID}.scope/container\n", ContainerRef(ID, "podman"),
                     id="podman-v2-rootful"),
        pytest.param(f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n",
                     ContainerRef(ID, "podman"), id="podman-v2-rootless"),
        pytest.param(f"4:memory:/libpod_parent/libpod-{ID}\n", ContainerRef(ID, "podman"), id="podman-v1-cgroupfs"),
        pytest.param(f"0::/system.slice/nerdctl-{ID}.scope\n", ContainerRef(ID, "containerd"), id="nerdctl"),
        pytest.param(f"0::/docker/{ID2}/kubepods/besteffort/pod1c5d/{ID}\n", ContainerRef(ID, None),
                     id="kind-nested"),
        pytest.param(f"0::/machine.slice/libpod-conmon-{ID}.scope\n", None, id="podman-conmon"),
        pytest.param(f"0::/system.slice/crio-conmon-{ID}.scope\n", None, id="crio-conmon"),
        pytest.param("0::/user.slice/user-1000.slice/session-3.scope\n", None, id="login-session"),
        pytest.param("9:name=systemd:/\n4:memory:/process_api/3071f1b14ed53b36a1a7497c897ebe9b\n0::/\n", None,
                     id="32-hex-is-no-container"),
        pytest.param("", None, id="empty"),
    ],
)
def test_parse_container(cgroup, expected):
    assert parse_container(cgroup) == expected


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        ("0::/system.slice/nginx.service\n", "nginx"),
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n", "foo"),
        ("0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty"),
        ("0::/system.slice/snap.lxd.daemon.service\n", "snap.lxd.daemon"),
        ("0::/system.slice/my\\x2dapp.service\n", "my-app"),
        ("12:pids:/system.slice/cron.service\n1:name=systemd:/system.slice/cron.service\n", "cron"),
        ("1:name=systemd:/system.slice/redis-server.service\n0::/\n", "redis-server"),  # hybrid
        ("0::/system.slice/k3s.service/kubepods/x\n", "k3s"),  # delegated subtree
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/user.slice/user-1000.slice/user@1000.service\n", None),
        ("0::/user.slice/user-1000.slice/user@1000.service/init.scope\n", None),
        (f"0::/system.slice/docker-{ID}.scope\n", None),
        ("0::/init.scope\n", None),
        ("0::/\n", None),
        ("4:memory:/process_api/3071f1b14ed53b36a1a7497c897ebe9b\n", None),  # no systemd hierarchy
    ],
)
def test_systemd_unit(cgroup, expected):
    assert systemd_unit(cgroup) == expected


# ----------------------------------------------------------------------------- container state


def write_json(path: pathlib.Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def state(tmp_path) -> dict[str, pathlib.Path]:
    roots = {name: tmp_path / name for name in ("docker", "containerd", "storage")}
    for root in roots.values():
        root.mkdir()
    return roots


@pytest.fixture
def containers(state) -> ContainerResolver:
    return ContainerResolver(docker_root=str(state["docker"]), containerd_root=str(state["containerd"]),
                             containers_storage_root=str(state["storage"]))


def docker_state(root: pathlib.Path, cid: str, *, name: str, image: str, labels: dict | None = None) -> pathlib.Path:
    path = root / "containers" / cid / "config.v2.json"
    write_json(path, {"ID": cid, "Name": f"/{name}", "Config": {"Image": image, "Labels": labels or {},
                                                                "Hostname": cid[:12]}})
    return path


def test_docker_container(containers, state):
    docker_state(state["docker"], ID, name="shop-web-1", image="registry.example:5000/shop/web:1.4",
                 labels={"com.docker.compose.service": "web", "com.docker.compose.project": "shop"})
    found = containers.lookup(info(["nginx"], cgroup=f"0::/system.slice/docker-{ID}.scope\n"))
    assert found == Container(ID, "docker", name="shop-web-1", image="registry.example:5000/shop/web:1.4",
                              app="web")
    assert found.service == "web"  # compose's service label


def test_docker_plain_container_is_named_by_its_name(containers, state):
    docker_state(state["docker"], ID, name="redis-cache", image="redis:7")
    assert containers.service(info(["redis-server"], cgroup=f"0::/docker/{ID}\n")) == "redis-cache"


def test_docker_kubernetes_labels(containers, state):
    docker_state(state["docker"], ID, name="k8s_api_api-7d9f_shop_0f1e_0", image="acme/api:2", labels={
        "io.kubernetes.pod.name": "api-7d9f", "io.kubernetes.pod.namespace": "shop",
        "io.kubernetes.container.name": "api", "io.kubernetes.docker.type": "container"})
    found = containers.lookup(info(["api"], cgroup=f"0::/kubepods.slice/kubepods-podx.slice/docker-{ID}.scope\n"))
    assert (found.service, found.pod, found.namespace, found.display_name) == ("api", "api-7d9f", "shop", "api")


def test_containerd_cri_annotations(containers, state):
    write_json(state["containerd"] / "k8s.io" / ID / "config.json", {"ociVersion": "1.1.0", "annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "payments",
        "io.kubernetes.cri.sandbox-name": "payments-6d4cf56db6-x7k2p",
        "io.kubernetes.cri.sandbox-namespace": "billing",
        "io.kubernetes.cri.image-name": "ghcr.io/acme/payments:2.0"}})
    (state["containerd"] / "moby").mkdir()  # other namespaces are looked through
    found = containers.lookup(info(["payments"], cgroup=f"0::/kubepods.slice/x.slice/cri-containerd-{ID}.scope\n"))
    assert found == Container(ID, "containerd", image="ghcr.io/acme/payments:2.0", pod="payments-6d4cf56db6-x7k2p",
                              namespace="billing", k8s_container="payments")
    assert found.service == "payments"


def test_containerd_app_label_wins(containers, state):
    write_json(state["containerd"] / "k8s.io" / ID / "config.json", {"annotations": {
        "io.kubernetes.cri.container-name": "main", "app.kubernetes.io/name": "checkout"}})
    assert containers.service(info(["x"], cgroup=f"0::/x/cri-containerd-{ID}.scope\n")) == "checkout"


def test_kubernetes_cgroupfs_layout_finds_any_runtime(containers, state):
    write_json(state["containerd"] / "k8s.io" / ID / "config.json", {"annotations": {
        "io.kubernetes.cri.container-name": "worker", "io.kubernetes.cri.sandbox-namespace": "jobs"}})
    found = containers.lookup(info(["worker"], cgroup=f"0::/kubepods/burstable/pod1c5d/{ID}\n"))
    assert (found.service, found.runtime, found.namespace) == ("worker", "containerd", "jobs")


def test_podman_containers_json(containers, state):
    storage = state["storage"] / "overlay-containers"
    write_json(storage / ID / "userdata" / "config.json", {"annotations": {"io.container.manager": "libpod"}})
    write_json(storage / "containers.json", [
        {"id": ID2, "names": ["other"], "metadata": "{}"},
        {"id": ID, "names": ["search-api"], "image": "9f8e", "layer": "77aa",
         "metadata": json.dumps({"image-name": "docker.io/acme/search:3", "image-id": "9f8e", "name": "search-api"})},
    ])
    found = containers.lookup(info(["search"], cgroup=f"0::/machine.slice/libpod-{ID}.scope/container\n"))
    assert found == Container(ID, "podman", name="search-api", image="docker.io/acme/search:3")
    assert found.service == "search-api"


def test_crio_annotations(containers, state):
    write_json(state["storage"] / "overlay-containers" / ID / "userdata" / "config.json", {"annotations": {
        "io.kubernetes.cri-o.ContainerType": "container", "io.kubernetes.container.name": "indexer",
        "io.kubernetes.pod.name": "indexer-0", "io.kubernetes.pod.namespace": "search",
        "io.kubernetes.cri-o.ImageName": "quay.io/acme/indexer:latest"}})
    found = containers.lookup(info(["indexer"], cgroup=f"0::/kubepods.slice/x.slice/crio-{ID}.scope\n"))
    assert (found.runtime, found.service, found.pod, found.image) == (
        "cri-o", "indexer", "indexer-0", "quay.io/acme/indexer:latest")


def test_image_name_when_nothing_else(containers, state):
    write_json(state["containerd"] / "default" / ID / "config.json",
               {"annotations": {"io.kubernetes.cri.image-name": "registry:5000/team/api:1.2@sha256:abcd"}})
    assert containers.service(info(["x"], cgroup=f"0::/default/{ID}\n")) == "api"


def test_container_without_state_is_left_to_the_next_resolvers(containers):
    process = info(["python3", "worker.py"], cgroup=f"0::/system.slice/docker-{ID}.scope\n")
    assert containers.lookup(process) == Container(ID, "docker")
    assert containers.service(process) is None
    assert services.BuiltinResolvers(containers).resolve(process) == "worker"


def test_container_metadata_is_cached_per_id(containers, state):
    path = docker_state(state["docker"], ID, name="web", image="nginx")
    process = info(["nginx"], cgroup=f"0::/docker/{ID}\n")
    assert containers.service(process) == "web"
    path.unlink()  # a second lookup must not read the state again
    assert containers.service(process) == "web"
    assert containers.service(info(["other"], pid=7, cgroup=f"0::/docker/{ID}\n")) == "web"


@pytest.mark.parametrize(
    ("image", "expected"),
    [("nginx", "nginx"), ("nginx:1.25", "nginx"), ("docker.io/library/nginx:1.25", "nginx"),
     ("registry:5000/team/api:1.2", "api"), ("ghcr.io/acme/api@sha256:0123", "api"), ("", None), (None, None)],
)
def test_image_basename(image, expected):
    assert image_basename(image) == expected


# ----------------------------------------------------------------------------- the built-in chain


def test_builtin_order(containers, state):
    docker_state(state["docker"], ID, name="web", image="nginx")
    chain = services.BuiltinResolvers(containers)
    in_container = f"0::/system.slice/docker-{ID}.scope\n"
    in_unit = "0::/system.slice/nginx.service\n"
    cmd = ["python3", "app.py"]
    assert chain.resolve(info(cmd, cgroup=in_container, environ={"DEETUNE_SERVICE": "env"})) == "env"
    assert chain.resolve(info(cmd, cgroup=in_container)) == "web"
    assert chain.resolve(info(cmd, cgroup=in_unit)) == "nginx"
    assert chain.resolve(info(cmd)) == "app"
    assert chain.resolve("not a process") is None


def test_plugins_resolve_service_uses_the_builtin_chain(plugins):
    assert plugins.resolve_service(info(["node", "server.js"])) == "server"
    assert plugins.resolve_service(info(["x"], environ={"OTEL_SERVICE_NAME": "otel"})) == "otel"
    assert plugins.resolve_service(os.getpid()) == ServiceResolver(plugins).instance(os.getpid()).service


def test_default_plugins_include_the_builtin_resolver():
    assert Plugins().resolve_service(info(["python3", "app.py"])) == "app"


# ----------------------------------------------------------------------------- third-party resolvers


class ShardResolver:
    """A third-party resolver: names processes that have --shard, nothing else."""

    @hookimpl
    def deetune_resolve_service(self, process):
        if "--shard" in process.cmdline:
            return "legacy-" + process.cmdline[process.cmdline.index("--shard") + 1]
        return None


class LateResolver:
    @hookimpl(trylast=True)
    def deetune_resolve_service(self, process):
        return "late" if process.comm == "late" else None


def test_third_party_resolver_overrides_the_builtins(spawn, app_script):
    plugins = Plugins(load_entry_points=False, extra=[ShardResolver()])
    env = {"OTEL_SERVICE_NAME": "from-env"}
    assert plugins.resolve_service(info(["app", "--shard", "eu"], environ=env)) == "legacy-eu"
    assert plugins.resolve_service(info(["app"], environ=env)) == "from-env"  # None: the built-ins answer
    # Through the resolver, with a real process whose environment names it otherwise.
    (pathlib.Path(app_script).parent / "legacy.py").write_text(
        "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n")
    proc, _ = spawn([sys.executable, "legacy.py", "--shard", "us"], env=env)
    assert ServiceResolver(plugins).instance(proc.pid).service == "legacy-us"


def test_third_party_trylast_resolver_still_comes_before_the_builtins():
    plugins = Plugins(load_entry_points=False, extra=[LateResolver()])
    assert plugins.resolve_service(info(["python3", "app.py"], comm="late")) == "late"


def test_a_third_party_wrapper_sees_the_builtin_answer():
    class Prefix:
        @hookimpl(wrapper=True)
        def deetune_resolve_service(self, process):
            return "eu-" + (yield)

    plugins = Plugins(load_entry_points=False, extra=[Prefix(), ShardResolver()])
    assert plugins.resolve_service(info(["python3", "app.py"])) == "eu-app"
    assert plugins.resolve_service(info(["app", "--shard", "x"])) == "eu-legacy-x"


def test_a_failing_resolver_plugin_falls_back_to_the_builtins(caplog):
    class Broken:
        @hookimpl
        def deetune_resolve_service(self, process):
            raise RuntimeError("boom")

    resolver = ServiceResolver(Plugins(load_entry_points=False, extra=[Broken()]))
    assert resolver.instance(os.getpid()).service == services.BUILTIN.resolve(ProcessInfo.read(os.getpid()))
    assert "resolver plugin failed" in caplog.text


# ----------------------------------------------------------------------------- instances from a fake /proc


def fake_proc(root: pathlib.Path, pid: int, *, comm: str, cmdline: list[str], cgroup: str, environ: dict) -> str:
    base = root / str(pid)
    base.mkdir(parents=True)
    (base / "comm").write_text(comm + "\n")
    (base / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
    (base / "cgroup").write_text(cgroup)
    (base / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in environ.items()))
    return str(root)


def test_instance_in_a_kubernetes_container(tmp_path, containers, state, plugins, monkeypatch):
    monkeypatch.setattr(services.BUILTIN, "containers", containers)
    write_json(state["containerd"] / "k8s.io" / ID / "config.json", {"annotations": {
        "io.kubernetes.cri.container-name": "payments", "io.kubernetes.cri.sandbox-name": "payments-6d4cf-x7k2p",
        "io.kubernetes.cri.sandbox-namespace": "billing"}})
    proc = fake_proc(tmp_path / "proc", 4242, comm="node", cmdline=["node", "index.js"], environ={"PATH": "/bin"},
                     cgroup=f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID}.scope\n")
    instance = ServiceResolver(plugins, host="node-1", proc=proc).instance(4242)
    assert instance.service == "payments"
    assert (instance.host, instance.pid, instance.comm) == ("node-1", 4242, "node")
    assert (instance.container_id, instance.container_name, instance.pod, instance.namespace) == (
        ID, "payments", "payments-6d4cf-x7k2p", "billing")
    assert instance.id == f"node-1:4242:{ID[:12]}"


def test_instance_in_a_container_named_by_environment(tmp_path, containers, state, plugins, monkeypatch):
    monkeypatch.setattr(services.BUILTIN, "containers", containers)
    docker_state(state["docker"], ID, name="web", image="nginx")
    proc = fake_proc(tmp_path / "proc", 77, comm="python3", cmdline=["python3", "app.py"],
                     environ={"OTEL_SERVICE_NAME": "storefront"}, cgroup=f"0::/docker/{ID}\n")
    instance = ServiceResolver(plugins, host="h", proc=proc).instance(77)
    # The service comes from the environment; the container still identifies the instance.
    assert (instance.service, instance.container_id, instance.container_name) == ("storefront", ID, "web")


# ----------------------------------------------------------------------------- caching


@pytest.fixture
def read_count(monkeypatch) -> list[int]:
    """pids read by ProcessInfo.read, in order."""
    calls: list[int] = []
    original = ProcessInfo.read.__func__

    def counting(cls, pid, proc="/proc", **kwargs):
        calls.append(pid)
        return original(cls, pid, proc, **kwargs)

    monkeypatch.setattr(ProcessInfo, "read", classmethod(counting))
    return calls


@pytest.fixture
def scans(monkeypatch) -> list[str]:
    """Reads of the listening sockets and of their owners (the /proc/*/fd scan)."""
    calls: list[str] = []
    for name in ("read_listening_sockets", "socket_inode_owners"):
        original = getattr(procnet, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(procnet, name, counting)
    return calls


def test_instances_are_cached_per_pid(resolver, read_count):
    pid = os.getpid()
    first = resolver.instance(pid)
    for _ in range(100):
        assert resolver.instance(pid) is first
    assert read_count == [pid]
    resolver.forget(pid)
    resolver.forget(pid)  # forgetting twice (exec then exit) is fine
    assert resolver.instance(pid) == first
    assert read_count == [pid, pid]


def test_listeners_are_rescanned_at_most_once_per_interval(spawn, app_script, resolver, scans, read_count):
    now = [1000.0]
    resolver.clock = lambda: now[0]
    proc, port = spawn([sys.executable, "app.py", "127.0.0.1"], env={"DEETUNE_SERVICE": "ledger"})
    port = int(port)
    for _ in range(50):
        assert resolver.endpoint("127.0.0.1", port) == "ledger"
    assert scans == ["read_listening_sockets", "socket_inode_owners"]
    assert read_count == [proc.pid]  # the owner's instance is cached too

    # Remote addresses never cause a scan.
    for _ in range(50):
        assert resolver.endpoint("203.0.113.9", 443) == "203.0.113.9:443"
    assert len(scans) == 2

    # A local miss rescans, but not again within the interval.
    now[0] += 5
    assert not resolver.is_local_listener("127.0.0.1", 1)  # nothing listens on port 1
    assert len(scans) == 4
    for _ in range(20):
        now[0] += 0.01
        assert resolver.endpoint("127.0.0.1", 1) == "127.0.0.1:1"
    assert len(scans) == 4
    # Port 0 (an address named alone) never rescans either.
    now[0] += 5
    assert resolver.endpoint("127.0.0.1", 0) == "127.0.0.1:0"
    assert len(scans) == 4


def test_a_new_listener_is_found_after_the_interval(spawn, app_script, resolver, scans):
    now = [1000.0]
    resolver.clock = lambda: now[0]
    assert resolver.endpoint("127.0.0.1", 1) == "127.0.0.1:1"  # first snapshot
    _, port = spawn([sys.executable, "app.py", "127.0.0.1"], env={"DEETUNE_SERVICE": "late-starter"})
    port = int(port)
    now[0] += 0.2
    assert resolver.endpoint("127.0.0.1", port) == f"127.0.0.1:{port}"  # within the interval: not rescanned
    now[0] += resolver.refresh_interval
    assert resolver.endpoint("127.0.0.1", port) == "late-starter"
    assert scans.count("read_listening_sockets") == 2


def test_forgetting_a_listener_owner_refreshes_the_snapshot(spawn, app_script, resolver, scans):
    now = [1000.0]
    resolver.clock = lambda: now[0]
    proc, port = spawn([sys.executable, "app.py", "127.0.0.1"], env={"DEETUNE_SERVICE": "short-lived"})
    port = int(port)
    assert resolver.endpoint("127.0.0.1", port) == "short-lived"
    proc.kill()
    proc.wait()
    resolver.forget(proc.pid)  # the exit event
    now[0] += resolver.refresh_interval
    assert resolver.endpoint("127.0.0.1", port) == f"127.0.0.1:{port}"
    assert scans.count("read_listening_sockets") == 2


# ----------------------------------------------------------------------------- endpoint mapping

MAPPING = """
[[endpoint]]
name = "db-primary"
address = "10.1.2.3"
port = 5432

[[endpoint]]
name = "db-host"
address = "10.1.2.3"

[[endpoint]]
name = "pg-subnet-16"
cidr = "10.1.0.0/16"
port = 5432

[[endpoint]]
name = "pg-subnet-24"
cidr = "10.1.2.0/24"
port = 5432

[[endpoint]]
name = "subnet-16"
cidr = "10.1.0.0/16"

[[endpoint]]
name = "subnet-24"
cidr = "10.1.2.0/24"

[[endpoint]]
name = "any-postgres"
port = 5432

[[endpoint]]
name = "v6-net"
cidr = "2001:db8::/32"

[[endpoint]]
name = "v6-host"
address = "2001:db8::7"
"""


@pytest.fixture
def mapping(tmp_path) -> EndpointMapping:
    path = tmp_path / "endpoints.toml"
    path.write_text(MAPPING)
    return EndpointMapping.load(path)


@pytest.mark.parametrize(
    ("addr", "port", "expected"),
    [
        ("10.1.2.3", 5432, "db-primary"),  # address+port
        ("10.1.2.3", 80, "db-host"),  # address
        ("10.1.2.9", 5432, "pg-subnet-24"),  # cidr+port, longest prefix
        ("10.1.9.9", 5432, "pg-subnet-16"),  # cidr+port
        ("10.1.2.9", 80, "subnet-24"),  # cidr, longest prefix
        ("10.1.9.9", 80, "subnet-16"),  # cidr
        ("192.168.1.1", 5432, "any-postgres"),  # port
        ("192.168.1.1", 80, None),
        ("::ffff:10.1.2.3", 5432, "db-primary"),  # IPv4-mapped
        ("2001:db8::7", 443, "v6-host"),
        ("2001:db8::5", 443, "v6-net"),
        ("2001:db9::5", 5432, "any-postgres"),
    ],
)
def test_mapping_precedence(mapping, addr, port, expected):
    assert mapping.lookup(addr, port) == expected


def test_endpoint_uses_the_mapping_then_ip_port(mapping, plugins):
    resolver = ServiceResolver(plugins, mapping=mapping)
    assert resolver.endpoint("10.1.2.3", 5432) == "db-primary"
    assert resolver.endpoint("2001:db8::5", 443) == "v6-net"
    assert resolver.endpoint("192.168.1.1", 80) == "192.168.1.1:80"
    assert resolver.endpoint("2001:db9::5", 80) == "[2001:db9::5]:80"
    assert resolver.endpoint("::ffff:192.168.1.1", 80) == "192.168.1.1:80"
    assert not resolver.is_local_listener("10.1.2.3", 5432)
    assert ServiceResolver(plugins).endpoint("10.1.2.3", 5432) == "10.1.2.3:5432"


def test_an_empty_mapping_file(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert len(EndpointMapping.load(path)) == 0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('[[endpoint]]\nname = \n', "Invalid value"),
        ('[[endpoint]]\nname = "x"\nadress = "10.0.0.1"\n',
         "endpoint 1 (x): unknown key 'adress' (known: address, cidr, name, port)"),
        ('[[endpoint]]\naddress = "10.0.0.1"\n', "endpoint 1: 'name' must be a non-empty string"),
        ('[[endpoint]]\nname = "ok"\nport = 1\n[[endpoint]]\nname = "x"\naddress = "10.0.0"\n',
         "endpoint 2 (x): 'address' '10.0.0' is not an IP address"),
        ('[[endpoint]]\nname = "x"\ncidr = "10.1.2.3/16"\n',
         "endpoint 1 (x): 'cidr' '10.1.2.3/16': 10.1.2.3/16 has host bits set"),
        ('[[endpoint]]\nname = "x"\nport = 70000\n', "endpoint 1 (x): 'port' 70000 is not a port number (1-65535)"),
        ('[[endpoint]]\nname = "x"\nport = "5432"\n', "endpoint 1 (x): 'port' '5432' is not a port number (1-65535)"),
        ('[[endpoint]]\nname = "x"\naddress = "10.0.0.1"\ncidr = "10.0.0.0/8"\n',
         "endpoint 1 (x): give 'address' or 'cidr', not both"),
        ('[[endpoint]]\nname = "x"\n', "endpoint 1 (x): needs 'address', 'cidr' or 'port'"),
        ('[[endpoint]]\nname = "a"\nport = 53\n[[endpoint]]\nname = "b"\nport = 53\n',
         "endpoints 'a' and 'b' match the same traffic"),
        ('[[endpoints]]\nname = "x"\n', "unknown table 'endpoints' (expected [[endpoint]])"),
        ('endpoint = "x"\n', "'endpoint' must be an array of tables ([[endpoint]])"),
    ],
)
def test_mapping_errors_are_one_line(tmp_path, text, reason):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MappingError) as caught:
        EndpointMapping.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert reason in message
    assert "\n" not in message


def test_missing_mapping_file(tmp_path):
    with pytest.raises(MappingError, match=r"missing\.toml: No such file or directory$"):
        EndpointMapping.load(tmp_path / "missing.toml")
