"""The results-table plugin (tests/hardening_results.py), run on a small suite of its own in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.procs import REPO_ROOT

SUITE = {
    "pytest.ini": "[pytest]\ntestpaths = suite\nmarkers =\n    hardening(case): a hardening case\n",
    "suite/test_a.py": (
        "import os\nimport pytest\n\n"
        '@pytest.mark.hardening("case A")\ndef test_a():\n    pass\n\n'
        '@pytest.mark.hardening("case B")\n@pytest.mark.parametrize("x", [1, 2])\n'
        "def test_b(x):\n    assert x == 1\n\n"
        "def test_plain():\n    pass\n"
    ),
    "suite/test_c.py": (
        "import os\nimport pytest\n\n"
        '@pytest.mark.hardening("case C")\ndef test_c():\n'
        '    if os.environ.get("SKIP_C"):\n        pytest.skip("service missing")\n'
    ),
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny project: three hardening cases (one test fails), one ordinary test."""
    for name, text in SUITE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def _pytest(project: Path, *args: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in {"CI", "SKIP_C", "PYTEST_ADDOPTS"}}
    base.update(env, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.hardening_results", "-p", "no:cacheprovider", *args],
        cwd=project,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: test_b[2] fails on purpose
    return proc.stdout


def test_partial_runs_leave_the_table_alone(project: Path) -> None:
    """A narrower path, -k, -x, a skipped case: nothing is written."""
    table = project / "docs" / "hardening_results.md"
    for args, env in [
        (["suite/test_a.py"], {}),
        (["suite/test_c.py::test_c"], {}),
        (["-k", "test_a"], {}),
        (["-x"], {}),  # stops at test_b[2]: test_c never runs
        ([], {"SKIP_C": "1"}),
    ]:
        out = _pytest(project, "-v", *args, **env)
        assert not table.exists(), (args, env, out)
        assert "not written (partial run" in out, out


def test_a_complete_run_writes_every_case_with_its_outcome(project: Path) -> None:
    """The whole suite (or -m hardening) writes one row per hardening test, failures included."""
    table = project / "docs" / "hardening_results.md"
    _pytest(project, CI="true")
    text = table.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| case ")][1:]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| case A", "`suite/test_a.py::test_a`", "passed"],
        ["| case B", "`suite/test_a.py::test_b[1]`", "passed"],
        ["| case B", "`suite/test_a.py::test_b[2]`", "failed"],
        ["| case C", "`suite/test_c.py::test_c`", "passed"],
    ]
    assert "test_plain" not in text
    plugin = "-p tests.hardening_results -p no:cacheprovider"
    assert f"- command: `CI=true python -m pytest {plugin}`" in text
    assert "3 of 4 passed." in text

    table.unlink()
    _pytest(project, "-m", "hardening")
    assert f"- command: `python -m pytest {plugin} -m hardening`" in table.read_text()
