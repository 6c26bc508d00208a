"""Scale-out on separate hosts: studies/s with 1, 2, 4 worker hosts sharing one PostgreSQL and one Redis.

Run as root (network namespaces, cgroup v1 cpu controller); results in bench/README.md:

    .venv/bin/python bench/scaleout.py --studies 600 --workers 1,2,4 --quota 0.4

Everything below is made by this script on this machine and removed at the end, also on an error or Ctrl-C:
  - network: a "switch" namespace with a bridge; every host is a namespace joined to it by a veth pair on a
    private /24 (10.x.y.0/24, checked unused); this process (the client that uploads and watches the clock)
    joins by one more veth from its own namespace. Nothing listens outside that subnet.
  - hosts, one namespace each: PostgreSQL (a throwaway cluster: initdb in a temp folder, pg_ctl as the
    postgres user, listening on its veth address), Redis (`redis-server --save '' --appendonly no`), the web
    (waitress), and one per worker (`celery -A worker.main worker -Q inference --concurrency 1`).
  - files: every host has its own folder, which it sees at one path (`<base>/host`) in its own mount
    namespace, the other hosts' folders hidden under an empty tmpfs. Each worker has its own CXR_DATA_DIR and
    its own copy of the model at the path every host uses (the path the registry records). Images reach the
    workers only through PostgreSQL (studies' bytes are in SQL); the code, the venv and /tmp stay shared,
    as an installed image would be.
  - CPU: every host is a cgroup (v1 cpu + cpuacct, entered by a tiny shell wrapper before it execs the
    service, so a Celery parent's pool children are inside too); each worker gets the same CFS quota
    (--quota CPUs) and one inference thread; the services get --service-quota if given (default: none).
    A quota is a ceiling, not a promise: on a shared machine other jobs can take a host's slice, so every
    host's cgroup also weighs --shares (default 4096, four nice-0 processes) in the kernel's fair share.

For each worker count (workers are added, never restarted; each new one first screens an untimed warm-up
chunk): N studies are uploaded through the web's JSON API (groups of --upload-group, not started), then one
API call starts the batch (the web enqueues every chunk); studies/s is timed from that call to the last
study's `finished_at`. Chunks are small (--chunk-size 16) so that the last round leaves few workers idle.
Then: ratio to the 1-worker
figure, per-worker efficiency ((rate_n / rate_1) / n, goal >= 0.85), and the CPU each host used
(cpuacct.usage): the workers against their quota, PostgreSQL, Redis and the web against what each can use
(its quota, else one core for Redis and the web, every core for PostgreSQL), so the output says which one
saturates first, with uploads counted in the per-study CPU of the web and PostgreSQL.
Options: --studies, --workers 1,2,4, --quota, --service-quota, --shares, --chunk-size, --upload-group,
--model-dir, --keep (leave the hosts' folders and logs), --json FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import requests  # noqa: E402
from sqlalchemy import create_engine, func, select, text  # noqa: E402

from bench.throughput import load_images  # noqa: E402
from store import migrate  # noqa: E402
from store.db import dispose_all, session_scope  # noqa: E402
from store.studies import batch_progress  # noqa: E402
from store.tables import Prediction, Role, Study  # noqa: E402
from store.users import create_user, issue_api_token  # noqa: E402
from tests.procs import (  # noqa: E402
    FIXTURE_SOURCES,
    _spawn,
    port_open,
    service_env,
    start_web,
    start_worker,
    stop_all,
    wait_for,
    wait_workers_ready,
)

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
ACCT_ROOT = Path("/sys/fs/cgroup/cpuacct")
CFS_PERIOD_US = 100_000
# Names of everything this script makes (namespaces, cgroups, the root veth, temp folders): cxs<pid>-<host>.
NAME_PREFIX = "cxs"
STALE_NAME = re.compile(rf"^{NAME_PREFIX}(\d+)(-|$)")
PG_PORT, REDIS_PORT, WEB_PORT = 5432, 6379, 8000
TASK_DONE_MARK = "] succeeded in "  # Celery's log line when a task (here: a chunk) succeeded
# The two wrappers every host's first process runs: join the host's cgroups (from outside: `ip netns exec`
# mounts a fresh /sys without the cgroup hierarchies), then, inside the namespace, see only its own folder.
# Each execs the next, so the service keeps the process id and starts (and forks) inside its cgroups.
JOIN_CGROUPS = r"""set -e
echo $$ > "$1/cgroup.procs"
echo $$ > "$2/cgroup.procs"
shift 2
exec "$@"
"""
OWN_FILES_ONLY = r"""set -e
mount --bind "$1" "$2"
mount -t tmpfs -o size=64k,mode=0755 cxs-other-hosts "$3"
shift 3
exec "$@"
"""


def sh(*args: str, check: bool = True) -> str:
    """Run a command (no shell); its stdout."""
    done = subprocess.run(args, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists."""
    return Path(f"/proc/{pid}").exists()


def cgroup_pids(path: Path) -> list[int]:
    """Process ids in a cgroup (v1 cgroup.procs); empty when it is gone."""
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_pids(pids: Sequence[int]) -> None:
    """SIGKILL these processes (each by its id)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def netns_pids(ns: str) -> list[int]:
    """Processes in a named network namespace."""
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]


def remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    """Kill what is left in a cgroup and remove it."""
    deadline = time.monotonic() + timeout
    while path.exists():
        kill_pids(cgroup_pids(path))
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def remove_netns(ns: str) -> None:
    """Kill what runs in a network namespace and delete it (its veth ends go with it)."""
    for _ in range(50):
        pids = netns_pids(ns)
        if not pids:
            break
        kill_pids(pids)
        time.sleep(0.1)
    sh("ip", "netns", "del", ns, check=False)


def remove_stale() -> list[str]:
    """Remove what a SIGKILLed run of this script left (namespaces, cgroups, temp folders of a gone owner)."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).splitlines():
        ns = line.split()[0] if line.strip() else ""
        m = STALE_NAME.match(ns)
        if m and not pid_alive(int(m.group(1))):
            remove_netns(ns)
            removed.append(ns)
    for root in dict.fromkeys((CPU_ROOT, ACCT_ROOT)):
        for path in root.glob(f"{NAME_PREFIX}*"):
            m = STALE_NAME.match(path.name)
            if m and path.is_dir() and not pid_alive(int(m.group(1))):
                remove_cgroup(path)
                removed.append(str(path))
    for path in Path(tempfile.gettempdir()).glob(f"{NAME_PREFIX}*-*"):
        m = STALE_NAME.match(path.name)
        if m and path.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def pick_subnet() -> str:
    """A private 10.x.y (/24) that no address or route of this machine's namespace uses."""
    used = sh("ip", "-4", "route", "show", "table", "all") + sh("ip", "-4", "-o", "addr")
    for _ in range(200):
        prefix = f"10.{random.randint(64, 254)}.{random.randint(0, 255)}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 found")


@dataclass
class Host:
    """One simulated machine: a network namespace, an address, a cgroup and a folder of its own."""

    name: str
    ns: str
    ip: str
    real_dir: Path  # its folder, as this process sees it
    mount_dir: Path  # where the host sees its own folder (the same path on every host)
    hidden: Path  # the folder of all hosts' folders, hidden inside each host
    cpu_cgroup: Path
    acct_cgroup: Path
    quota: float | None

    def command(self, args: Sequence[str]) -> list[str]:
        """args run as this host's first process: in its namespace, cgroups and private view of the files."""
        return [
            "sh", "-c", JOIN_CGROUPS, "cxs-cgroups", str(self.cpu_cgroup), str(self.acct_cgroup),
            "ip", "netns", "exec", self.ns,
            "sh", "-c", OWN_FILES_ONLY, "cxs-files", str(self.real_dir), str(self.mount_dir),
            str(self.hidden), *args,
        ]  # fmt: skip

    def cpu_s(self) -> float:
        """CPU seconds used by every process this host ever ran (cpuacct.usage)."""
        return int((self.acct_cgroup / "cpuacct.usage").read_text()) / 1e9

    def throttled(self) -> tuple[int, int]:
        """(CFS periods, periods in which the quota ran out) so far."""
        stat = dict(line.split() for line in (self.cpu_cgroup / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0))

    def pids(self) -> list[int]:
        """Processes in this host's cgroup now."""
        return cgroup_pids(self.cpu_cgroup)


class Lab:
    """The namespaces, bridge, cgroups and folders of one run; close() removes all of it."""

    def __init__(self, base_parent: Path | None = None) -> None:
        if os.geteuid() != 0:
            raise PermissionError("bench/scaleout.py must run as root (ip netns, cgroups)")
        if not (CPU_ROOT / "cpu.cfs_quota_us").exists() or not (ACCT_ROOT / "cpuacct.usage").exists():
            raise RuntimeError(f"needs the cgroup v1 cpu and cpuacct controllers at {CPU_ROOT}, {ACCT_ROOT}")
        self.tag = f"{NAME_PREFIX}{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self.cgroups: list[Path] = []
        self.stop_hooks: list[Callable[[], None]] = []
        self.keep = False
        self.base = Path(tempfile.mkdtemp(prefix=self.tag + "-", dir=base_parent))
        self.switch = f"{self.tag}-sw"
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self.base.chmod(0o755)  # the postgres user walks through it
        (self.base / "hosts").mkdir()
        (self.base / "host").mkdir()
        self.subnet = pick_subnet()
        self._add_netns(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        # This process's own port on the switch: the client side (uploads, the SQL it reads to time runs).
        sh("ip", "link", "add", self.tag, "type", "veth", "peer", "name", "v-client", "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", "v-client", "master", "br0", "up")
        sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.tag)
        sh("ip", "link", "set", self.tag, "up")

    def _add_netns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, *, quota: float | None = None, shares: int = 1024) -> Host:
        """A new host: namespace + veth into the switch + address, cgroups (CFS quota, weight), folder."""
        ns = f"{self.tag}-{name}"
        ip = f"{self.subnet}.{len(self.hosts) + 2}"
        self._add_netns(ns)
        sh("ip", "-n", self.switch, "link", "add", f"v-{name}", "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        sh("ip", "-n", self.switch, "link", "set", f"v-{name}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        cgroups = []
        for root in (CPU_ROOT, ACCT_ROOT):
            path = root / ns
            if path not in self.cgroups:  # cpu and cpuacct may be one hierarchy
                path.mkdir()
                self.cgroups.append(path)
            cgroups.append(path)
        (cgroups[0] / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cgroups[0] / "cpu.cfs_quota_us").write_text(str(round(quota * CFS_PERIOD_US)) if quota else "-1")
        (cgroups[0] / "cpu.shares").write_text(str(shares))
        real = self.base / "hosts" / name
        real.mkdir()
        host = Host(
            name, ns, ip, real, self.base / "host", self.base / "hosts", cgroups[0], cgroups[1], quota
        )
        self.hosts[name] = host
        return host

    def close(self) -> list[str]:
        """Stop every process, delete namespaces and cgroups, remove the folders; returns what failed."""
        errors: list[str] = []
        with signals_held():
            for hook in reversed(self.stop_hooks):
                try:
                    hook()
                except Exception as exc:  # noqa: BLE001 - the rest must still be removed
                    errors.append(f"stop hook: {exc}")
            stop_all(self.procs, timeout=10)
            for host in self.hosts.values():
                kill_pids(host.pids())
            for ns in reversed(self.namespaces):
                remove_netns(ns)
            for path in self.cgroups:
                try:
                    remove_cgroup(path)
                except OSError as exc:
                    errors.append(f"cgroup {path}: {exc}")
            left = [ns for ns in self.namespaces if ns in sh("ip", "netns", "list", check=False).split()]
            errors += [f"namespace {ns} still there" for ns in left]
            if not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)
        return errors


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up (main thread only), so clean-up is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def machine_busy_s() -> tuple[float, float]:
    """(CPU seconds busy, seconds elapsed) summed over every CPU, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz


@dataclass
class Options:
    """What to measure."""

    studies: int = 600
    workers: tuple[int, ...] = (1, 2, 4)
    quota: float = 0.4
    service_quota: float | None = None
    shares: int = 4096
    chunk_size: int = 16
    upload_group: int = 50
    model_dir: Path | None = None
    keep: bool = False
    base_parent: Path | None = None  # where the temp folder goes; the postgres user must traverse it


@dataclass
class Cluster:
    """The running service: its hosts, database URL, worker processes (what a test inspects)."""

    lab: Lab
    database_url: str
    base_url: str
    token: str
    workers: list[tuple[Host, subprocess.Popen]] = field(default_factory=list)


def start_postgres(lab: Lab, host: Host) -> str:
    """A throwaway cluster: initdb as postgres, pg_ctl start in the host; returns the URL of database cxr."""
    shutil.chown(host.real_dir, "postgres", "postgres")
    data = host.real_dir / "pgdata"
    sh("runuser", "-u", "postgres", "--", "initdb", "-D", str(data), "-U", "postgres", "--auth=trust",
       "--no-sync", "-E", "UTF8", "--locale=C")  # fmt: skip
    with open(data / "postgresql.conf", "a") as fh:
        fh.write(f"listen_addresses = '{host.ip}'\nport = {PG_PORT}\nunix_socket_directories = ''\n")
    with open(data / "pg_hba.conf", "a") as fh:
        fh.write(f"host all all {lab.subnet}.0/24 trust\n")
    inside = host.mount_dir / "pgdata"

    def stop() -> None:
        sh(
            "runuser",
            "-u",
            "postgres",
            "--",
            "pg_ctl",
            "-D",
            str(data),
            "-m",
            "fast",
            "-w",
            "stop",
            check=False,
        )

    lab.stop_hooks.append(stop)
    sh(*host.command(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(inside), "-l",
                      str(host.mount_dir / "postgres.log"), "-w", "-t", "120", "start"]))  # fmt: skip
    admin = create_engine(
        f"postgresql+psycopg://postgres@{host.ip}:{PG_PORT}/postgres", isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text('CREATE DATABASE "cxr"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@{host.ip}:{PG_PORT}/cxr"


def start_redis(lab: Lab, host: Host) -> str:
    """redis-server with no persistence on the host's address; its broker URL."""
    args = ["redis-server", "--bind", host.ip, "--port", str(REDIS_PORT), "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--dir", str(host.mount_dir)]  # fmt: skip
    lab.procs.append(_spawn(host.command(args), dict(os.environ), host.real_dir / "redis.log"))
    wait_for(lambda: port_open(REDIS_PORT, host.ip), 30, message="redis-server")
    return f"redis://{host.ip}:{REDIS_PORT}/0"


def host_env(host: Host, cluster_env: dict[str, Any]) -> dict[str, str]:
    """A service process's environment on this host: its own data folder, the shared settings."""
    (host.real_dir / "data").mkdir(exist_ok=True)
    return service_env(host.mount_dir / "data", **cluster_env)


def add_workers(cluster: Cluster, upto: int, opts: Options, cluster_env: dict[str, Any]) -> None:
    """Start worker hosts until there are `upto`, each with its own model copy; wait until all are ready."""
    new = []
    model_src = opts.model_dir or REPO / "model" / "artifacts" / "default"
    for i in range(len(cluster.workers) + 1, upto + 1):
        host = cluster.lab.add_host(f"w{i}", quota=opts.quota, shares=opts.shares)
        shutil.copytree(model_src, host.real_dir / "model")
        env = host_env(host, cluster_env | {"model_dir": host.mount_dir / "model", "serve_threads": 1})
        proc = start_worker(
            env,
            log_path=host.real_dir / "worker.log",
            queues="inference",
            concurrency=1,
            wait_ready=False,
            prefix=host.command([]),
        )
        cluster.lab.procs.append(proc)
        cluster.workers.append((host, proc))
        new.append(proc)
    wait_workers_ready(new, timeout=300)


def warm_up(cluster: Cluster, images: Sequence[tuple[str, bytes]], opts: Options) -> None:
    """Run small batches until every worker has screened a chunk (its first costs seconds more), untimed."""
    for _ in range(5):
        cold = [h for h, p in cluster.workers if TASK_DONE_MARK not in p.log_path.read_text(errors="replace")]
        if not cold:
            return
        batch = list(images[: 2 * opts.chunk_size * len(cluster.workers)])
        batch_id = upload(cluster, batch, opts.upload_group)
        start_batch(cluster, batch_id)
        wait_for(lambda: finished(cluster, batch_id, len(batch)), 600, interval=0.25, message="warm-up")  # noqa: B023
    raise RuntimeError(f"workers {', '.join(h.name for h in cold)} got no chunk in 5 warm-up batches")


def start_batch(cluster: Cluster, batch_id: int) -> None:
    """Start an uploaded batch through the API (the web enqueues its chunks)."""
    requests.post(
        f"{cluster.base_url}/api/v1/batches/{batch_id}/start",
        headers={"Authorization": f"Bearer {cluster.token}"},
        timeout=60,
    ).raise_for_status()


def finished(cluster: Cluster, batch_id: int, total: int) -> bool:
    """True when `total` studies of the batch are DONE or FAILED."""
    with session_scope(cluster.database_url) as s:
        p = batch_progress(s, batch_ids=[batch_id])[batch_id]
    return p.done + p.failed >= total


def upload(cluster: Cluster, images: Sequence[tuple[str, bytes]], group: int) -> int:
    """A new batch with these files, uploaded through the JSON API in parallel groups, not started; its id."""
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {cluster.token}"
    r = api.post(f"{cluster.base_url}/api/v1/batches", json={"name": f"scale-out {len(images)}"}, timeout=60)
    r.raise_for_status()
    batch_id = int(r.json()["id"])

    def one(i: int) -> None:
        client = requests.Session()
        client.headers["Authorization"] = f"Bearer {cluster.token}"
        files = [("files", f) for f in images[i : i + group]]
        client.post(
            f"{cluster.base_url}/api/v1/batches/{batch_id}/files", files=files, timeout=600
        ).raise_for_status()

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(0, len(images), group)))
    return batch_id


def cpu_of(hosts: Sequence[Host]) -> dict[str, float]:
    """CPU seconds so far of each host, by name."""
    return {h.name: h.cpu_s() for h in hosts}


def measure(cluster: Cluster, images: Sequence[tuple[str, bytes]], opts: Options) -> dict[str, Any]:
    """Upload N studies, start them, time first enqueue -> last finished_at; CPU of every host meanwhile."""
    hosts = list(cluster.lab.hosts.values())
    workers = [h for h, _ in cluster.workers]
    n = len(workers)
    up0, up_cpu0 = time.monotonic(), cpu_of(hosts)
    batch_id = upload(cluster, images, opts.upload_group)
    upload_s, up_cpu1 = time.monotonic() - up0, cpu_of(hosts)
    throttle0 = {h.name: h.throttled() for h in workers}
    busy0, cpu0, client0 = machine_busy_s(), cpu_of(hosts), time.process_time()
    t0 = time.time()
    start_batch(cluster, batch_id)
    wait_for(
        lambda: finished(cluster, batch_id, len(images)),
        3600,
        interval=0.25,
        message=f"{len(images)} studies to finish",
    )
    t_seen = time.time()
    busy1, cpu1, client1 = machine_busy_s(), cpu_of(hosts), time.process_time()
    throttle1 = {h.name: h.throttled() for h in workers}
    with session_scope(cluster.database_url) as s:
        last = s.scalar(select(func.max(Study.finished_at)).where(Study.batch_id == batch_id))
        p = batch_progress(s, batch_ids=[batch_id])[batch_id]
        per_study = s.execute(
            select(func.count(Prediction.id))
            .select_from(Study)
            .outerjoin(Prediction, Prediction.study_id == Study.id)
            .where(Study.batch_id == batch_id)
            .group_by(Study.id)
        ).scalars()
        multi = sum(1 for c in per_study if c > 1)
    elapsed = last.timestamp() - t0
    window = t_seen - t0  # the CPU window: to when the end was seen (<= 0.25 s of idle more)
    used = {k: cpu1[k] - cpu0[k] for k in cpu1}
    run: dict[str, Any] = {
        "workers": n,
        "studies": len(images),
        "done": p.done,
        "failed": p.failed,
        "studies_with_several_predictions": multi,
        "seconds": round(elapsed, 3),
        "studies_per_s": round(len(images) / elapsed, 2),
        "upload_files_per_s": round(len(images) / upload_s, 1),
        "upload_cpu_s": {k: round(up_cpu1[k] - up_cpu0[k], 3) for k in up_cpu1},
        "window_s": round(window, 3),
        "cpu_s": {k: round(v, 3) for k, v in used.items()},
        "client_cpu_s": round(client1 - client0, 3),
        "machine_busy_cores": round((busy1[0] - busy0[0]) / window, 2),
        "throttled_share": {
            h: round((throttle1[h][1] - throttle0[h][1]) / max(1, throttle1[h][0] - throttle0[h][0]), 2)
            for h in throttle1
        },
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    return run


def ceilings(lab: Lab, ncpu: int) -> dict[str, float]:
    """CPUs each service can use at most: its quota, else 1 for Redis and the web, all for PostgreSQL.

    Redis runs commands on one thread; the web is one waitress process whose Python holds one core at most.
    """
    out = {}
    for name, natural in (("pg", float(ncpu)), ("redis", 1.0), ("web", 1.0)):
        quota = lab.hosts[name].quota
        out[name] = min(natural, quota) if quota else natural
    return out


def is_worker(host_name: str) -> bool:
    """Worker hosts are w1, w2, ... (the others: pg, redis, web)."""
    return re.fullmatch(r"w\d+", host_name) is not None


def summarise(runs: list[dict[str, Any]], caps: dict[str, float], opts: Options, ncpu: int) -> dict[str, Any]:
    """Ratios, efficiency, each host's share of what it can use, and which service saturates first."""
    base = runs[0]["studies_per_s"] / runs[0]["workers"]  # per worker, from the smallest count measured
    for run in runs:
        n, w = run["workers"], run["window_s"]
        run["ratio_to_1"] = round(run["studies_per_s"] / base, 2)
        run["efficiency"] = round(run["studies_per_s"] / base / n, 2)
        worker_cpu = sum(v for k, v in run["cpu_s"].items() if is_worker(k))
        run["workers_share_of_quota"] = round(worker_cpu / w / (opts.quota * n), 2)
        run["worker_cpu_ms_per_study"] = round(worker_cpu * 1000 / run["studies"], 2)
        run["share_of_ceiling"] = {k: round(run["cpu_s"][k] / w / caps[k], 3) for k in caps}
        run["cores"] = {k: round(v / w, 3) for k, v in run["cpu_s"].items()}
        ours = sum(run["cpu_s"].values()) / w + run["client_cpu_s"] / w
        run["other_cores"] = round(max(0.0, run["machine_busy_cores"] - ours), 2)
    last = runs[-1]
    # CPU per study of each service in the largest run, uploads included (in production they arrive as fast
    # as studies are screened) -> the rate at which it would use all the CPU it can.
    per_study = {
        k: (last["upload_cpu_s"].get(k, 0.0) + v) / last["studies"] for k, v in last["cpu_s"].items()
    }
    services = {k: per_study[k] for k in caps}
    saturates_at = {k: (caps[k] / v if v > 0 else float("inf")) for k, v in services.items()}
    order = sorted(saturates_at, key=saturates_at.get)
    return {
        "per_study_cpu_ms": {k: round(v * 1000, 3) for k, v in services.items()}
        | {"workers": round(sum(v for k, v in per_study.items() if is_worker(k)) * 1000, 3)},
        "ceilings_cpus": caps,
        "saturates_at_studies_per_s": {k: round(v, 1) for k, v in saturates_at.items()},
        "saturates_at_workers": {k: round(v / base, 1) for k, v in saturates_at.items()},
        "first_to_saturate": order[0],
        "first_shared_to_saturate": next(k for k in order if k != "web"),
        "whole_service_cpu_ms_per_study": round(sum(per_study.values()) * 1000, 2),
        "machine_runs_out_at_studies_per_s": round(ncpu / sum(per_study.values()), 1),
    }


def run(
    opts: Options,
    images: Sequence[tuple[str, bytes]],
    *,
    on_running: Callable[[Cluster, dict[str, Any]], None] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the hosts, measure every worker count, remove everything; the report.

    on_running(cluster, run) is called after each measurement while every host still runs (tests look inside).
    """
    removed = remove_stale()
    if removed:
        say(f"removed leftovers of an earlier run: {', '.join(removed)}")
    ncpu = os.cpu_count() or 1
    report: dict[str, Any] = {
        "studies": len(images),
        "quota": opts.quota,
        "service_quota": opts.service_quota,
        "shares": opts.shares,
        "chunk_size": opts.chunk_size,
        "cpus": ncpu,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
    }
    lab = Lab(opts.base_parent)
    lab.keep = opts.keep
    errors: list[str] = []
    try:
        pg = lab.add_host("pg", quota=opts.service_quota, shares=opts.shares)
        redis_host = lab.add_host("redis", quota=opts.service_quota, shares=opts.shares)
        web = lab.add_host("web", quota=opts.service_quota, shares=opts.shares)
        url = start_postgres(lab, pg)
        broker = start_redis(lab, redis_host)
        report["subnet"] = f"{lab.subnet}.0/24"
        say(f"hosts on {lab.subnet}.0/24: postgres {pg.ip}, redis {redis_host.ip}, web {web.ip}")
        migrate.upgrade(url)
        with session_scope(url) as s:
            user = create_user(s, username="bench", password="bench password 123", role=Role.ADMIN)
            token = issue_api_token(s, user=user)
        cluster_env: dict[str, Any] = {
            "database_url": url,
            "broker_url": broker,
            "chunk_size": opts.chunk_size,
            "secret_key": secrets.token_hex(16),
            "deid_key": secrets.token_hex(16),
        }
        web_proc, base_url = start_web(
            host_env(web, cluster_env),
            port=WEB_PORT,
            host=web.ip,
            prefix=web.command([]),
            log_path=web.real_dir / "web.log",
        )
        lab.procs.append(web_proc)
        cluster = Cluster(lab, url, base_url, token)
        runs = []
        for n in opts.workers:
            add_workers(cluster, n, opts, cluster_env)
            warm_up(cluster, images, opts)
            one = measure(cluster, images, opts)
            runs.append(one)
            say(
                f"{n} worker(s): {one['studies_per_s']:.1f} studies/s ({one['done']} done, "
                f"{one['failed']} failed, {one['studies_with_several_predictions']} predicted twice; "
                f"load {' '.join(one['loadavg'])})"
            )
            if on_running is not None:
                on_running(cluster, one)
        report["runs"] = runs
        report["summary"] = summarise(runs, ceilings(lab, ncpu), opts, ncpu)
    finally:
        dispose_all()
        errors = lab.close()
        report["cleanup_errors"] = errors
        if opts.keep:
            say(f"logs kept in {lab.base}")
    report["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    return report


def table(report: dict[str, Any]) -> str:
    """The report as a Markdown table and a few sentences."""
    names = {"web": "web", "pg": "PostgreSQL", "redis": "Redis"}
    lines = [
        f"| workers ({report['quota']} CPU each) | studies/s | x 1 worker | per-worker efficiency "
        "| workers' CPU / quota | worker ms/study | PostgreSQL CPU | Redis CPU | web CPU "
        "| machine busy (other jobs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        c = r["cores"]
        lines.append(
            f"| {r['workers']} | {r['studies_per_s']:.1f} | {r['ratio_to_1']:.2f} | {r['efficiency']:.2f} "
            f"| {r['workers_share_of_quota']:.2f} | {r['worker_cpu_ms_per_study']:.1f} "
            f"| {c['pg']:.3f} | {c['redis']:.3f} | {c['web']:.3f} "
            f"| {r['machine_busy_cores']:.2f} of {report['cpus']} ({r['other_cores']:.2f}) |"
        )
    s, last = report["summary"], report["runs"][-1]
    sat, at_workers, caps, ms = (
        s["saturates_at_studies_per_s"],
        s["saturates_at_workers"],
        s["ceilings_cpus"],
        s["per_study_cpu_ms"],
    )
    lines += [
        "",
        "CPU columns: cores used from the start call to the last result (cpuacct); 'other': busy cores that "
        "are not this benchmark's (other jobs on the machine).",
        f"Uploads (untimed, before each start): {last['upload_files_per_s']:.0f} files/s in the last run.",
        f"CPU per study, upload + screening ({last['workers']}-worker run): workers {ms['workers']:.2f} ms, "
        + ", ".join(f"{names[k]} {ms[k]:.2f} ms" for k in caps)
        + ". Each service would use all the CPU it can ("
        + ", ".join(f"{names[k]} {caps[k]:g}" for k in caps)
        + ") at: "
        + ", ".join(f"{names[k]} ~{sat[k]:.0f} studies/s (~{at_workers[k]:.0f} workers)" for k in caps)
        + ".",
        f"First to saturate: {names[s['first_to_saturate']]}; first shared one (state every worker uses): "
        f"{names[s['first_shared_to_saturate']]}. "
        + ("Before either, this" if s["machine_runs_out_at_studies_per_s"] < min(sat.values()) else "This")
        + f" {report['cpus']}-CPU machine runs out: the whole service needs "
        f"{s['whole_service_cpu_ms_per_study']:.1f} ms of CPU per study, "
        f"~{s['machine_runs_out_at_studies_per_s']:.0f} studies/s with nothing else running.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Parse options, run, print the table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=600, help="studies per worker count (default 600)")
    ap.add_argument("--workers", default="1,2,4", help="worker counts, increasing (default 1,2,4)")
    ap.add_argument("--quota", type=float, default=0.4, help="CPUs of each worker's CFS quota (default 0.4)")
    ap.add_argument("--service-quota", type=float, help="CPUs of PostgreSQL's, Redis's and the web's quota")
    ap.add_argument(
        "--shares",
        type=int,
        default=4096,
        help="cpu.shares of every host's cgroup (default 4096, 4x a nice-0 process: on a shared machine the "
        "hosts get their quota before other jobs; 1024 = no priority)",
    )
    ap.add_argument("--chunk-size", type=int, default=16, help="CXR_CHUNK_SIZE (default 16: small tails)")
    ap.add_argument("--upload-group", type=int, default=50, help="files per upload request")
    ap.add_argument(
        "--model-dir", type=Path, help="model artifact copied to each worker (default: committed)"
    )
    ap.add_argument(
        "--keep", action="store_true", help="keep the hosts' folders (logs) afterwards, until the next run"
    )
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args()
    counts = tuple(int(x) for x in args.workers.split(","))
    if list(counts) != sorted(set(counts)) or counts[0] < 1:
        ap.error("--workers: increasing positive counts, e.g. 1,2,4")
    opts = Options(
        studies=args.studies,
        workers=counts,
        quota=args.quota,
        service_quota=args.service_quota,
        shares=args.shares,
        chunk_size=args.chunk_size,
        upload_group=args.upload_group,
        model_dir=args.model_dir,
        keep=args.keep,
    )
    # run's `finally` removes everything on Ctrl-C (also when started with SIGINT ignored: `cmd &`) or TERM.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    images = load_images(opts.studies, sources=FIXTURE_SOURCES)
    report = run(opts, images)
    print(table(report))
    if report["cleanup_errors"]:
        print("clean-up problems: " + "; ".join(report["cleanup_errors"]))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
