"""`cxr status`: the readiness checks of /readyz, printed for an operator (exit 1 when not ready)."""

from __future__ import annotations

import json
import sys

import click

from config import load_settings


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (as /readyz answers).")
def status_command(as_json: bool) -> None:
    """Database, migrations, broker, serving model and queue depths; exit status 1 when not ready."""
    from web.health import readiness  # no Flask app is built: plain functions
    from worker.app import make_celery, queue_depths

    settings = load_settings()
    app = make_celery(settings, set_as_current=False)
    checks = readiness(settings, app)
    ready = all(c.ok for c in checks)
    depths: dict[str, int] | str
    try:
        depths = queue_depths(app) if any(c.name == "broker" and c.ok for c in checks) else "broker down"
    except Exception as exc:  # noqa: BLE001 - status must print what it can
        depths = f"{type(exc).__name__}: {exc}"
    if as_json:
        body = {"ready": ready, "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        click.echo(json.dumps({**body, "queues": depths}))
    else:
        for c in checks:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<10} {c.detail}")
        shown = ", ".join(f"{q}={n}" for q, n in depths.items()) if isinstance(depths, dict) else depths
        click.echo(f"     {'queues':<10} {shown}")
        click.echo("ready" if ready else "NOT READY")
    sys.exit(0 if ready else 1)
