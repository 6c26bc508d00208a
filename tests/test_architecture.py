"""The floors of docs/architecture.md, checked by reading every module's imports (no code is run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
QUERY_BUILDERS = {"select", "insert", "update", "delete", "text"}


def _modules(package: str) -> list[Path]:
    root = REPO_ROOT / package
    return [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))


def imports(path: Path) -> Iterator[tuple[str, set[str]]]:
    """(imported module, names imported from it) for every import statement of a file, nested ones too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, set()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, {alias.name for alias in node.names}


def _within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(package: str, forbidden: tuple[str, ...], *, allowed: tuple[str, ...] = ()) -> list[str]:
    """package's imports of anything under `forbidden`, except modules under `allowed`."""
    out = []
    for path in _modules(package):
        for module, names in imports(path):
            targets = [f"{module}.{n}" for n in names] or [module]
            if any(_within(t, *forbidden) and not _within(t, *allowed) for t in targets):
                out.append(f"{path.relative_to(REPO_ROOT)} imports {module} {sorted(names) or ''}")
    return out


def test_web_never_imports_tensorflow_or_model_code() -> None:
    """web/ reaches the model only through the queue."""
    assert not violations("web", ("tensorflow", "keras", "ai_edge_litert", "model", "worker.tasks"))
    assert not violations("web", ("worker",), allowed=("worker.app",))


def test_web_builds_no_query() -> None:
    """Every query lives in store/: web/ imports no statement builder from SQLAlchemy."""
    found = [
        f"{path.relative_to(REPO_ROOT)}: {module} {sorted(names & QUERY_BUILDERS)}"
        for path in _modules("web")
        for module, names in imports(path)
        if _within(module, "sqlalchemy") and (names & QUERY_BUILDERS or module != "sqlalchemy.orm")
    ]
    assert not found, found


def test_intake_imports_no_flask_or_tensorflow() -> None:
    """intake/ is plain Python: a DICOM receiver or the CLI can use it without a web app or a model."""
    assert not violations("intake", ("flask", "flask_login", "flask_wtf", "flask_smorest", "werkzeug", "web"))
    assert not violations("intake", ("tensorflow", "keras", "ai_edge_litert", "model"))
    assert not violations("intake", ("worker",), allowed=("worker.app",))


def test_model_imports_neither_store_nor_flask() -> None:
    """model/ is pure ML: of ours only config and the format module intake.formats."""
    assert not violations("model", ("store", "flask", "web", "worker", "werkzeug"))
    assert not violations("model", ("intake",), allowed=("intake.formats",))


@pytest.mark.parametrize("module", ["config.py", "intake/formats.py"])
def test_the_lowest_modules_import_nothing_of_ours(module: str) -> None:
    """config.py and intake/formats.py sit beneath everything: they import no package of this project."""
    ours = ("config", "store", "model", "intake", "worker", "web", "cli")
    assert not violations(module, ours)


def test_store_imports_no_flask_tensorflow_or_model() -> None:
    """The SQL package knows neither the web nor the model."""
    assert not violations("store", ("flask", "tensorflow", "keras", "model", "intake", "worker", "web"))


def test_the_checks_see_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: a module that imports select and TensorFlow is reported."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.py").write_text("from sqlalchemy import select\n\ndef f():\n    import tensorflow\n")
    monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path)
    assert len(violations("bad", ("tensorflow", "sqlalchemy"))) == 2


def test_ops_sits_beside_config() -> None:
    """ops/ (logging, metrics) is imported by every floor, so it imports nothing of ours but config."""
    assert not violations("ops", ("store", "model", "intake", "worker", "web", "cli"))
