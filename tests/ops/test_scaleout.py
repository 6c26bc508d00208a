"""bench/scaleout.py's machinery at tiny scale: separate hosts really are separate, and each study runs once.

Needs root, `ip netns`, the cgroup v1 cpu and cpuacct controllers and the PostgreSQL and Redis server
binaries: under CI=true a missing one fails the test, elsewhere it skips with the reason. Speed is not
asserted here (it lives in bench/README.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bench import scaleout
from store.db import session_scope
from store.tables import Prediction, Study, StudyStatus
from tests.conftest import IN_CI
from tests.procs import sample_images

STUDIES = 40


def require_lab() -> None:
    """Skip (fail under CI=true) unless this machine can make namespaces and cgroups and run the servers."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        missing.append("`ip netns` (iproute2)")
    if (
        not (scaleout.CPU_ROOT / "cpu.cfs_quota_us").exists()
        or not (scaleout.ACCT_ROOT / "cpuacct.usage").exists()
    ):
        missing.append(f"cgroup v1 cpu and cpuacct controllers at {scaleout.CPU_ROOT}, {scaleout.ACCT_ROOT}")
    missing += [
        f"`{tool}`" for tool in ("initdb", "pg_ctl", "redis-server", "runuser") if not shutil.which(tool)
    ]
    if missing:
        reason = "the scale-out machinery needs " + ", ".join(missing)
        if IN_CI:
            pytest.fail(reason + " (CI=true requires it)")
        pytest.skip(reason)


def netns_of(pid: int) -> str:
    """The name of the network namespace a process is in (`ip netns identify`)."""
    return subprocess.run(
        ["ip", "netns", "identify", str(pid)], capture_output=True, text=True
    ).stdout.strip()


def cpu_cgroup_of(pid: int) -> str:
    """The process's cgroup in the v1 cpu hierarchy, e.g. /cxs123-w1."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path
    return ""


def started(pid: int) -> tuple[int, str] | None:
    """(pid, start time since boot) of a live process, None when gone (a process reusing the id differs)."""
    try:
        return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """Direct children of a process (a Celery parent's pool process)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_hosts_in_own_namespaces_and_cgroups_each_study_once() -> None:
    require_lab()
    images = sample_images(STUDIES)
    seen: list[dict[str, Any]] = []

    def look_inside(cluster: scaleout.Cluster, run: dict[str, Any]) -> None:
        lab = cluster.lab
        pids: list[int] = []
        for host, proc in cluster.workers:
            pool = children(proc.pid)
            assert pool, f"{host.name}: the Celery parent has no pool process"
            for pid in [proc.pid, *pool]:
                assert netns_of(pid) == host.ns
                assert cpu_cgroup_of(pid) == f"/{host.ns}"
            assert Path(host.cpu_cgroup, "cpu.cfs_quota_us").read_text().strip() == "40000"
            # Its own files at the common path, every other host's folder hidden.
            root = Path(f"/proc/{proc.pid}/root")
            assert (root / str(host.mount_dir).lstrip("/") / "model" / "meta.json").exists()
            assert os.listdir(root / str(host.hidden).lstrip("/")) == []
            pids += [proc.pid, *pool]
        for name in ("pg", "redis", "web"):
            host = lab.hosts[name]
            assert host.pids(), f"nothing runs in {name}'s cgroup"
            for pid in host.pids():
                assert netns_of(pid) == host.ns
            pids += host.pids()
        with session_scope(cluster.database_url) as s:
            per_study = s.execute(
                select(Study.status, func.count(Prediction.id))
                .outerjoin(Prediction, Prediction.study_id == Study.id)
                .group_by(Study.id)
            ).all()
        # Every study of every batch so far (warm-ups included): DONE, with exactly one prediction.
        assert per_study and set(per_study) == {(StudyStatus.DONE, 1)}
        processes = [started(pid) for pid in pids]
        seen.append({"workers": run["workers"], "processes": processes, "namespaces": list(lab.namespaces)})
        seen[-1].update(cgroups=list(lab.cgroups), base=lab.base)

    # The kernel's default cgroup weight (1024): no priority over other jobs, speed is not asserted.
    report = scaleout.run(
        scaleout.Options(studies=STUDIES, workers=(1, 2), quota=0.4, shares=1024),
        images,
        on_running=look_inside,
        say=lambda _line: None,
    )

    assert [r["workers"] for r in report["runs"]] == [1, 2]
    for r in report["runs"]:
        assert (r["done"], r["failed"], r["studies_with_several_predictions"]) == (STUDIES, 0, 0)
    assert [s["workers"] for s in seen] == [1, 2]
    # Everything made is gone: namespaces, cgroups, processes, folders.
    assert report["cleanup_errors"] == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert not set(seen[-1]["namespaces"]) & set(listed)
    assert not [p for p in seen[-1]["cgroups"] if p.exists()]
    assert not [p for s in seen for p in s["processes"] if p is not None and started(p[0]) == p]
    assert not seen[-1]["base"].exists()


def _run(workers: int, rate: float, cpu: dict[str, float], upload: dict[str, float]) -> dict[str, Any]:
    return {
        "workers": workers,
        "studies": 100,
        "studies_per_s": rate,
        "window_s": 100 / rate,
        "cpu_s": cpu,
        "upload_cpu_s": upload,
        "client_cpu_s": 0.0,
        "machine_busy_cores": 2.0,
    }


def test_summary_ratios_and_first_to_saturate() -> None:
    runs = [
        _run(
            1,
            10.0,
            {"pg": 0.1, "redis": 0.01, "web": 0.2, "w1": 4.0},
            {"pg": 0.1, "redis": 0, "web": 0.8, "w1": 0},
        ),
        _run(
            2,
            18.0,
            {"pg": 0.1, "redis": 0.01, "web": 0.2, "w1": 2.0, "w2": 2.2},
            {"pg": 0.1, "redis": 0, "web": 0.8},
        ),
    ]
    caps = {"pg": 2.0, "redis": 1.0, "web": 1.0}
    summary = scaleout.summarise(runs, caps, scaleout.Options(quota=0.4), ncpu=2)

    assert (runs[1]["ratio_to_1"], runs[1]["efficiency"]) == (1.8, 0.9)
    # Worker columns count w1, w2 only (not the web, whose name also starts with w).
    assert runs[1]["worker_cpu_ms_per_study"] == 42.0
    assert runs[1]["workers_share_of_quota"] == round(4.2 / (100 / 18) / 0.8, 2)
    # Uploads count: web 10 ms/study on 1 core -> 100 studies/s; PostgreSQL 2 ms on 2 cores -> 1,000.
    assert summary["per_study_cpu_ms"]["web"] == 10.0
    assert summary["saturates_at_studies_per_s"]["web"] == 100.0
    assert summary["saturates_at_studies_per_s"]["pg"] == 1000.0
    assert (summary["first_to_saturate"], summary["first_shared_to_saturate"]) == ("web", "pg")
    assert summary["saturates_at_workers"]["web"] == 10.0
