"""`cxr retrain`: one retraining run, here or on the training queue (wiring over worker.retrain)."""

from __future__ import annotations

import click

from config import load_settings


@click.command("retrain")
@click.option(
    "--enqueue", is_flag=True, help="Send the run to the training queue instead of running it here."
)
def retrain_command(enqueue: bool) -> None:
    """Train a candidate on base data plus reviewed labels, gate it, promote it only if it is no worse."""
    if enqueue:
        from worker.app import send_retrain

        click.echo(f"retraining requested (task {send_retrain('cli')})")
        return
    from worker.retrain import run_retraining

    outcome = run_retraining(load_settings(), trigger="cli")
    click.echo(f"run {outcome.run_id}: {outcome.status}")
    for reason in outcome.reasons:
        click.echo(f"  - {reason}")
    if outcome.candidate_version:
        click.echo(f"candidate: {outcome.candidate_version}")
    if outcome.status == "FAILED":
        raise SystemExit(1)
