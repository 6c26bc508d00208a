"""A pytest plugin: the hardening suite writes its own results table, docs/hardening_results.md.

Tests marked `@pytest.mark.hardening("<case>")` are the issue-13 cases (faults, abuse, load). At the end of a
session the table is written only when that session collected the whole suite (no path narrower than the test
folder, no hardening test deselected by -k, -m or --deselect) and every hardening test actually ran (passed,
failed or errored; none skipped, none left out by -x). So a partial local run never overwrites the table with
a partial one, and a failure is written down like a pass. A test adds its measurement to its row with
`record_property("measured", "...")`. `python -m pytest -m hardening` runs just them.

tests/conftest.py imports `pytest_configure` from here; elsewhere load it with `-p tests.hardening_results`.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

MARKER = "hardening"
RESULTS_FILE = Path("docs") / "hardening_results.md"


@dataclass
class _Row:
    case: str
    outcome: str = "not run"
    duration_s: float = 0.0
    finished: datetime | None = None
    ran: bool = False
    skipped: bool = False
    measured: str = ""


@dataclass(eq=False)  # hashable by identity: pluggy keeps plugins in sets
class HardeningResults:
    """Collects the hardening tests' reports during a session and writes the table at its end."""

    config: pytest.Config
    rows: dict[str, _Row] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        """A hardening test left out by -k, -m or --deselect makes the run partial."""
        for item in items:
            if item.get_closest_marker(MARKER) is not None:
                self.partial.append(f"{item.nodeid} deselected")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """Note every hardening test collected, and whether the whole suite was collected."""
        for item in session.items:
            marker = item.get_closest_marker(MARKER)
            if marker is not None:
                case = marker.args[0] if marker.args else marker.kwargs.get("case", item.name)
                self.rows[item.nodeid] = _Row(case=str(case))
        suite = _suite_dirs(self.config)
        for arg in self.config.args:
            path = (self.config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
            # The argument must name a suite folder or one above it (not a file or folder inside it).
            if "::" in arg or not any(path == d or path in d.parents for d in suite):
                self.partial.append(f"only {arg} collected")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Add up each phase's duration; the outcome is the call's, or the failing phase's."""
        row = self.rows.get(report.nodeid)
        if row is None:
            return
        row.duration_s += report.duration
        row.finished = datetime.now(UTC)
        measured = [str(v) for k, v in report.user_properties if k == "measured"]
        if measured:
            row.measured = "; ".join(measured)
        if hasattr(report, "wasxfail"):
            row.ran = True
            row.outcome = "xfailed" if report.skipped else "xpassed"
        elif report.skipped:
            row.skipped = True
            row.outcome = "skipped"
        elif report.failed:
            row.ran = True
            row.outcome = "failed" if report.when == "call" else f"error ({report.when})"
        elif report.when == "call" and report.passed:
            row.ran = True
            row.outcome = "passed"

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Write the table when the run was complete; say why not otherwise (with -v)."""
        if not self.rows:
            return
        reasons = list(self.partial)
        reasons += [f"{n} not run" for n, r in self.rows.items() if not r.ran and not r.skipped]
        reasons += [f"{n} skipped" for n, r in self.rows.items() if r.skipped]
        if reasons:
            if self.config.get_verbosity() > 0:
                print(f"\n{RESULTS_FILE} not written (partial run: {'; '.join(reasons[:3])})")
            return
        path = self.config.rootpath / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.table())
        print(f"\n{RESULTS_FILE} written ({len(self.rows)} hardening tests)")

    def table(self) -> str:
        """The Markdown page: how it was made, then one row per test."""
        now = datetime.now(UTC)
        ci = os.environ.get("CI", "")
        command = shlex.join(["python", "-m", "pytest", *self.config.invocation_params.args])
        lines = [
            "# Hardening suite: results of the last complete run",
            "",
            "Written by `tests/hardening_results.py` at the end of a pytest run in which every test",
            'marked `@pytest.mark.hardening("<case>")` ran; a partial run leaves this file alone.',
            "Do not edit by hand: run the command below again.",
            "",
            f"- date: {now:%Y-%m-%d %H:%M} UTC",
            f"- command: `{'CI=' + ci + ' ' if ci else ''}{command}`",
            f"- commit: {_commit(self.config.rootpath)}",
            f"- machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}",
            "",
            "| case | test | outcome | measured | duration (s) | finished (UTC) |",
            "|---|---|---|---|---|---|",
        ]
        for nodeid, row in sorted(self.rows.items(), key=lambda kv: (kv[1].case, kv[0])):
            finished = f"{row.finished:%Y-%m-%d %H:%M:%S}" if row.finished else ""
            test, measured = nodeid.replace("|", "\\|"), row.measured.replace("|", "\\|")
            lines.append(
                f"| {row.case} | `{test}` | {row.outcome} | {measured} | {row.duration_s:.1f} | {finished} |"
            )
        outcomes = [r.outcome for r in self.rows.values()]
        lines += ["", f"{outcomes.count('passed')} of {len(outcomes)} passed.", ""]
        return "\n".join(lines)


def _suite_dirs(config: pytest.Config) -> list[Path]:
    """The folders a run must be given (or default to) to have collected the whole suite."""
    testpaths = config.getini("testpaths") or ["."]
    return [(config.rootpath / p).resolve() for p in testpaths]


def _commit(root: Path) -> str:
    """The short commit id, with a note when the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" (with uncommitted changes)" if dirty else "")


def pytest_configure(config: pytest.Config) -> None:
    """Register the recorder for this session."""
    config.pluginmanager.register(HardeningResults(config), "cxr-hardening-results")
