"""The retraining job: reviewed labels in, a gated candidate out. Called by the Celery task and `cxr retrain`.

One run at a time (SQL lock with a lease, renewed every epoch). A crash leaves the serving model untouched:
promotion is the last step, in the same transaction that closes the run.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from config import Settings
from store.db import session_scope
from store.locks import release_lock, renew_lock
from store.models_registry import promote, register_model_version, serving_version
from store.retraining import RETRAIN_LOCK, finish_run, set_progress, start_run
from store.reviews import reviewed_for_training
from store.tables import Image, RunStatus
from worker.artifacts import artifact_dir

log = logging.getLogger("cxr.retrain")


@dataclass(frozen=True)
class RetrainOutcome:
    """What one call of run_retraining did."""

    run_id: int | None
    status: str  # "skipped" when another run holds the lock
    reasons: list[str]
    candidate_version: str | None = None


def models_dir(settings: Settings) -> Path:
    """Where the trainer keeps immutable copies of model versions (other hosts get the files from SQL)."""
    return settings.data_dir / "models"


def run_retraining(
    settings: Settings, *, trigger: str, holder: str | None = None, shuffle_labels: bool = False
) -> RetrainOutcome:
    """Cross-validate the serving recipe on base + reviewed data, gate the candidate, promote or reject it."""
    from dataclasses import replace

    from model.artifact import artifact_sha256, read_meta
    from model.pipeline import ReviewedExample, develop
    from model.retrain import GateMargins, compare, gate
    from model.serve import DEFAULT_ARTIFACT_DIR

    holder = holder or f"retrain-{uuid.uuid4().hex[:12]}"
    url = settings.database_url
    with session_scope(url) as session:
        current = serving_version(session)
        # The serving model's recipe and out-of-fold predictions: its folder here, or its files from SQL.
        current_path = (
            (artifact_dir(settings, session, current) or Path(current.artifact_path)) if current else None
        )
        recipe = _recipe_of(current_path or DEFAULT_ARTIFACT_DIR)
        # the same recipe as the serving model; epochs and seed may be set for the deployment (tests: short)
        recipe = replace(
            recipe, epochs=settings.retrain_epochs or recipe.epochs, seed=settings.retrain_seeds[0]
        )
        epochs_total = recipe.epochs * recipe.folds
        run = start_run(
            session,
            holder=holder,
            trigger=trigger,
            lease_s=settings.retrain_lease_s,
            epochs_total=epochs_total,
            current_version_id=current.id if current else None,
        )
        if run is None:
            return RetrainOutcome(None, "skipped", ["another retraining run holds the lock"])
        run_id = run.id
        reviewed = reviewed_for_training(session)
        shas = {r.image_sha256 for r in reviewed}
        blobs = dict(session.execute(select(Image.sha256, Image.data).where(Image.sha256.in_(shas))).all())
    examples = [ReviewedExample(blobs[r.image_sha256], r.label, r.patient_key) for r in reviewed]
    out_dir = models_dir(settings) / f"candidate-run{run_id}"

    def on_epoch(epoch: int, total: int) -> None:
        with session_scope(url) as s:
            set_progress(s, run_id=run_id, epoch=epoch, epochs_total=total)
            if not renew_lock(s, name=RETRAIN_LOCK, holder=holder, lease_s=settings.retrain_lease_s):
                raise RuntimeError("the retraining lock was lost (lease expired); abandoning this run")

    try:
        shutil.rmtree(out_dir, ignore_errors=True)
        meta = develop(
            settings.retrain_base_data,
            out_dir,
            recipe=recipe,
            split_path=settings.retrain_split,
            extra=examples,
            runs_dir=settings.data_dir / "retrain" / "runs",
            name="cnn-retrained",
            shuffle_labels=shuffle_labels,
            on_epoch=on_epoch,
            command="scheduled retraining (worker/retrain.py); see docs/retraining.md",
            log=log.info,
        )
        margins = GateMargins(
            covid_sensitivity_lcb=settings.gate_sensitivity_margin,
            macro_f1=settings.gate_f1_margin,
            ece_max=settings.gate_ece_max,
        )
        serving_dir = current_path if current_path and (current_path / "oof.csv").exists() else None
        if current_path and serving_dir is None:
            # an artifact from before out-of-fold predictions were kept cannot be compared study by study
            cmp, passed = None, False
            reasons = ["the serving model has no out-of-fold predictions (oof.csv) to compare with"]
        else:
            cmp = compare(out_dir, serving_dir) if serving_dir else None
            passed, reasons = gate(cmp, margins, candidate_ece=meta["metrics"]["oof"]["ece"])
        # Immutable, versioned copy on this host; register_model_version also stores its files in SQL, from
        # where worker hosts without this folder write their own copy (worker.artifacts).
        final_dir = models_dir(settings) / meta["version"]
        if not final_dir.exists():
            shutil.copytree(out_dir, final_dir)
        shutil.rmtree(out_dir, ignore_errors=True)
        with session_scope(url) as session:
            mv = register_model_version(
                session,
                version=meta["version"],
                artifact_path=str(final_dir),
                artifact_sha256=artifact_sha256(final_dir),
                metrics={
                    "out_of_fold": meta["metrics"]["oof"],
                    "reviewed_images": meta["data"]["reviewed_images"],
                },
                card=(final_dir / "card.md").read_text(),
                band_legend=meta.get("band_legend"),
                serve_if_none=False,
            )
            gate_report = {
                "paired_on_held_out_studies": cmp.as_dict() if cmp else None,
                "candidate_oof": meta["metrics"]["oof"],
                "serving_oof": read_meta(current_path)["metrics"].get("oof") if current_path else None,
                "margins": margins.__dict__,
                "passed": passed,
            }
            if passed:
                promote(session, model_version=mv, user_id=None)
            finish_run(
                session,
                run_id=run_id,
                status=RunStatus.PROMOTED if passed else RunStatus.REJECTED,
                reasons="; ".join(reasons),
                gate=gate_report,
                candidate_version_id=mv.id,
                n_reviewed=len(examples),
            )
            release_lock(session, name=RETRAIN_LOCK, holder=holder)
        status = "PROMOTED" if passed else "REJECTED"
        log.info("retraining run %d %s: %s", run_id, status, "; ".join(reasons))
        return RetrainOutcome(run_id, status, reasons, meta["version"])
    except BaseException as exc:
        log.exception("retraining run %d failed", run_id)
        shutil.rmtree(out_dir, ignore_errors=True)
        reason = f"training failed ({type(exc).__name__}: {exc}); the serving model is unchanged"
        with session_scope(url) as session:
            finish_run(
                session, run_id=run_id, status=RunStatus.FAILED, reasons=reason, n_reviewed=len(examples)
            )
            release_lock(session, name=RETRAIN_LOCK, holder=holder)
        if isinstance(exc, Exception):
            return RetrainOutcome(run_id, "FAILED", [reason])
        raise


def _recipe_of(artifact_dir: Path):  # noqa: ANN202 - model.pipeline.Recipe (TensorFlow side, imported late)
    """The serving artifact's training recipe; the shipped one when there is no artifact to read."""
    from model.artifact import read_meta
    from model.pipeline import SHIPPED_RECIPE, Recipe

    try:
        return Recipe.from_meta(read_meta(artifact_dir))
    except FileNotFoundError:
        return SHIPPED_RECIPE
