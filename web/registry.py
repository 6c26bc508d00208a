"""Model registry page: versions with metrics and cards, promotions, retraining runs; admins act."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, url_for
from flask_login import current_user, login_required
from werkzeug.wrappers import Response

from store.models_registry import get_version, list_versions, promote, promotion_history, serving_version
from store.retraining import list_runs, retraining_progress
from store.tables import RetrainRun
from web.auth import current_row
from web.common import ActionForm, admin_required, band_legend, reviewer_required
from web.db import get_db
from worker import app as queue  # Celery only, never TensorFlow

bp = Blueprint("registry", __name__)
log = logging.getLogger(__name__)


# Metric names worth a headline, in display order; everything else is under "all metrics".
HEADLINE_KEYS = (
    # out-of-fold (mean over cross-validation folds): what every model since issue 10 is chosen by
    "macro_f1_mean",
    "macro_f1_sd",
    "decided_macro_f1",
    "covid_sens_at_spec90_mean",
    "covid_sens_at_spec95_mean",
    "auroc_covid_mean",
    "accuracy_mean",
    # older artifacts (validation/test numbers)
    "macro_f1",
    "covid_sensitivity",
    "covid_sensitivity_lcb",
    "covid_specificity",
    "auroc_macro",
    "accuracy",
    "ece",
)
MAX_METRICS = 200


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e6 else f"{value:.3g}"
    if isinstance(value, list | tuple):
        # Confidence intervals and the like: short lists of numbers read well inline.
        if len(value) <= 4 and all(isinstance(v, int | float) for v in value):
            return "[" + ", ".join(_fmt(v) for v in value) + "]"
        return f"({len(value)} values)"
    return str(value)[:200]


def flatten_metrics(metrics: object, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """(dotted.key, formatted value) for every leaf of a possibly nested metrics dict, capped."""
    if not isinstance(metrics, dict):
        return [(prefix or "value", _fmt(metrics))] if metrics not in (None, {}) else []
    out: list[tuple[str, str]] = []
    for key, value in metrics.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and depth < 4:
            out.extend(flatten_metrics(value, name, depth + 1))
        else:
            out.append((name, _fmt(value)))
        if len(out) >= MAX_METRICS:
            break
    return out[:MAX_METRICS]


def headline_metrics(metrics: object) -> list[tuple[str, str]]:
    """The few numbers that matter (macro-F1, COVID-19 sensitivity, ECE, ...), grouped by section."""
    rank = {k: i for i, k in enumerate(HEADLINE_KEYS)}
    top = metrics if isinstance(metrics, dict) else {}
    sections: list[str] = []
    picked: list[tuple[str, str]] = []
    for key, value in flatten_metrics(metrics):
        section, _, name = key.rpartition(".")
        raw = top.get(key)
        # Named headline metrics at any depth, and plain top-level counts (e.g. reviewed_images).
        plain_number = not section and isinstance(raw, int | float) and not isinstance(raw, bool)
        if name in rank or plain_number:
            if section not in sections:
                sections.append(section)
            picked.append((key, value))

    def order(kv: tuple[str, str]) -> tuple[int, int]:
        section, _, name = kv[0].rpartition(".")
        return sections.index(section), rank.get(name, len(rank))

    return sorted(picked, key=order)


def run_dict(run: RetrainRun, versions: dict[int, str]) -> dict[str, Any]:
    """A retraining run for display and JSON."""
    return {
        "id": run.id,
        "trigger": run.trigger,
        "status": run.status.value,
        "epoch": run.epoch,
        "epochs_total": run.epochs_total,
        "n_reviewed": run.n_reviewed,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "candidate_version": versions.get(run.candidate_version_id) if run.candidate_version_id else None,
        "current_version": versions.get(run.current_version_id) if run.current_version_id else None,
        "reasons": run.reasons or "",
    }


@bp.route("/models")
@reviewer_required
def models() -> str:
    """Every model version with metrics and card, which one serves, promotions and retraining runs."""
    db = get_db()
    versions = list_versions(db)
    names = {mv.id: mv.version for mv in versions}
    return render_template(
        "models.html",
        versions=[
            {"mv": mv, "headline": headline_metrics(mv.metrics), "metrics": flatten_metrics(mv.metrics)}
            for mv in versions
        ],
        serving=serving_version(db),
        history=promotion_history(db),
        runs=[run_dict(r, names) for r in list_runs(db, limit=20)],
        active=retraining_progress(db),
        is_admin=current_user.is_admin,
    )


@bp.route("/models/<int:version_id>/card")
@login_required
def card(version_id: int) -> str:
    """One model version's card and band legend, for every signed-in user (reports link here)."""
    mv = get_version(get_db(), version_id=version_id)
    if mv is None:
        abort(404)
    return render_template("model_card.html", mv=mv, legend=band_legend(mv.band_legend))


@bp.route("/models/<int:version_id>/promote", methods=["POST"])
@admin_required
def promote_version(version_id: int) -> Response:
    """Make this version the serving one (a rollback when it is older); recorded in the audit trail."""
    if not ActionForm().validate_on_submit():
        abort(400)
    db = get_db()
    mv = get_version(db, version_id=version_id)
    if mv is None:
        abort(404, description="No such model version.")
    if mv.is_serving:
        flash(f"Model {mv.version} is already serving.", "info")
        return redirect(url_for("registry.models"))
    previous = serving_version(db)
    promote(db, model_version=mv, user_id=current_row().id)
    db.commit()
    was = f" (was {previous.version})" if previous else ""
    flash(f"Model {mv.version} now serves{was}; workers switch at their next chunk.", "info")
    return redirect(url_for("registry.models"))


@bp.route("/models/retrain", methods=["POST"])
@admin_required
def retrain() -> Response:
    """Ask for a retraining run now; the task takes the SQL lock itself, so nothing is written here."""
    if not ActionForm().validate_on_submit():
        abort(400)
    try:
        queue.send_retrain("admin")
    except Exception as exc:  # noqa: BLE001 - the page must say the request did not go out
        log.exception("sending the retraining task failed")
        flash(f"The retraining request could not be queued ({type(exc).__name__}); try again later.", "error")
        return redirect(url_for("registry.models"))
    flash(
        "Retraining requested. It runs on the training queue; if a run is already in progress this request "
        "does nothing. Progress shows here and on the dashboard.",
        "info",
    )
    return redirect(url_for("registry.models"))
