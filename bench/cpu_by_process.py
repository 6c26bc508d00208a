"""CPU seconds used by each part of the service while bench/throughput.py runs (reads /proc; Linux only).

    .venv/bin/python bench/cpu_by_process.py 40 & .venv/bin/python bench/throughput.py --memory-studies 0

Counts only CPU used after this script started (processes started later count from zero, start-up included).
"""

from __future__ import annotations

import collections
import os
import sys
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")
PARTS = (
    ("waitress", "web"),
    ("celery worker", "worker"),
    ("throughput.py", "bench driver (upload client, polling; raw runs)"),
    ("postgres", "postgres"),
    ("redis", "redis"),
)


def part_of(cmd: str) -> str | None:
    """Which part of the service a command line belongs to."""
    if "celery" in cmd and " worker" in cmd:
        return "worker"
    return next((name for key, name in PARTS if key in cmd and key != "celery worker"), None)


def cpu_seconds(pid: str) -> tuple[str, float] | None:
    """(command line, user + system CPU seconds) of a process, or None if it is gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return cmd, (int(fields[11]) + int(fields[12])) / HZ


def snapshot() -> dict[tuple[str, str], float]:
    """(part, pid) -> CPU seconds so far, for every process that belongs to a part of the service now."""
    out: dict[tuple[str, str], float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        got = cpu_seconds(pid)
        part = part_of(got[0]) if got else None
        if got is not None and part is not None:
            out[(part, pid)] = got[1]
    return out


Snapshot = dict[tuple[str, str], float]


def cpu_between(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds per part used between two snapshots (a process started in between counts from zero)."""
    total: collections.Counter[str] = collections.Counter()
    for key, value in after.items():
        total[key[0]] += value - before.get(key, 0.0)
    return dict(total)


def main(seconds: float) -> None:
    """Sample every 0.2 s for `seconds`, then print CPU seconds per part."""
    first = snapshot()
    last = dict(first)  # keeps the last reading of processes that exit before the end
    end = time.time() + seconds
    while time.time() < end:
        last.update(snapshot())
        time.sleep(0.2)
    for part, value in sorted(cpu_between(first, last).items(), key=lambda kv: -kv[1]):
        print(f"{part:40s} {value:7.2f} s CPU")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 60.0)
