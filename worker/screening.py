"""Plain screening functions the Celery tasks call (tests call them directly, with the real predictor).

The chunk protocol, all through store.studies' compare-and-set functions:
  1. a chunk holding a study that was delivered before (it may have crashed a worker) is split into
     one task per such study, so a poison study can only take itself down;
  2. claim (QUEUED -> RUNNING, attempts + 1, token = the Celery task id), read the bytes and COMMIT, so no
     lock is held on SQLite or PostgreSQL while the model runs;
  3. run the model on the whole chunk as one array;
  4. write every result (DONE with its prediction, or FAILED with a readable reason) and commit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from config import Settings
from ops.logs import bind as bind_log
from ops.metrics import STAGE_SECONDS, STUDIES_DONE, STUDIES_FAILED
from store.db import session_scope
from store.drift import save_input_stats
from store.models_registry import register_model_version, serving_version
from store.studies import (
    claim_studies,
    complete_studies,
    fail_study,
    load_image_bytes,
    reconcile,
    release_studies,
)
from store.tables import ModelVersion, Study, StudyStatus
from worker.artifacts import artifact_dir
from worker.stages import predict_staged

log = logging.getLogger("cxr.worker")

NO_IMAGE_REASON = "No image data was stored for this file (it was empty or rejected at upload)."
INTERNAL_ERROR_REASON = "The model could not process this image ({kind}); contact the administrator."

Enqueue = Callable[[Sequence[int], int], int]
"""send(study_ids, chunk_size) -> number of tasks; called only after the session committed."""
Explain = Callable[[Sequence[int], int], object]
"""send_explain(study_ids, model_version_id): heat maps of committed predictions."""


@dataclass(frozen=True)
class ServingModel:
    """A predictor loaded in this process and the model_versions row its predictions refer to."""

    predictor: Any
    model_version_id: int
    version: str


@dataclass
class ChunkOutcome:
    """What one run of screen_chunk did."""

    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    not_claimed: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    split: bool = False
    # study id -> (metric reason: decode | no_image | internal, the reason stored on the study)
    fail_kinds: dict[int, tuple[str, str]] = field(default_factory=dict)


# Per-process cache of registered version ids (predictors are cached by model.serve.load_predictor).
# Keyed by pid as well: a forked child must not use its parent's.
_version_ids: dict[tuple[int, str, str], int] = {}


def load_artifact(artifact_dir: Path | None) -> Any:
    """The predictor of an artifact folder (None: the committed default), loaded once per process."""
    from model.serve import load_predictor  # the interpreter is imported here, never at import time

    return load_predictor(artifact_dir)


def get_predictor(settings: Settings) -> Any:
    """The configured model (CXR_MODEL_DIR, else the committed default) of this process."""
    return load_artifact(settings.model_dir)


def model_version_id(database_url: str, predictor: Any) -> int:
    """Register the predictor's version in model_versions (serving if none serves yet); its id, cached."""
    key = (os.getpid(), database_url, predictor.version)
    cached = _version_ids.get(key)
    if cached is not None:
        return cached
    for attempt in range(3):
        try:
            with session_scope(database_url) as session:
                mv = register_model_version(
                    session,
                    version=predictor.version,
                    artifact_path=str(predictor.artifact_dir),
                    artifact_sha256=predictor.artifact_sha256,
                    metrics=dict(predictor.metrics or {}),
                    card=predictor.card or "",
                    band_legend=(getattr(predictor, "meta", None) or {}).get("band_legend"),
                    serve_if_none=True,
                )
                mv_id = mv.id
            break
        except IntegrityError:
            # Another worker registered the same version at the same moment: read theirs.
            if attempt == 2:
                raise
            with session_scope(database_url) as session:
                found = session.scalar(
                    select(ModelVersion.id).where(ModelVersion.version == predictor.version)
                )
            if found is not None:
                mv_id = found
                break
    _version_ids[key] = mv_id
    return mv_id


def _serving_row(settings: Settings, session: Session | None = None) -> tuple[int, str, Path | None] | None:
    """(id, version, folder on this host or None) of the serving version, or None when the registry is empty.

    The folder is the registered one when it is here and matches, else written from SQL (worker.artifacts).
    With a session, the query runs in it and its transaction is committed (nothing stays open while a newly
    promoted model loads); without, in a session of its own.
    """
    if session is None:
        with session_scope(settings.database_url) as own:
            return _serving_row(settings, own)
    mv = serving_version(session)
    row = (mv.id, mv.version, artifact_dir(settings, session, mv)) if mv is not None else None
    session.commit()
    return row


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s; using the configured model and recording its own version", message)


def serving_model(settings: Settings, session: Session | None = None) -> ServingModel:
    """The model to use now: the registry's serving version, else the configured one (then registered).

    Read for every chunk (one small query), so a promotion takes effect at the next chunk without a
    restart; each artifact is loaded once per process. An empty registry is seeded with the configured
    model (CXR_MODEL_DIR or the committed default). The serving version's files come from its registered
    folder or from SQL (worker.artifacts); a version with neither (registered before files were kept in SQL,
    folder elsewhere) falls back to the configured model, whose own version is recorded with each prediction.
    """
    serving = _serving_row(settings, session)
    if serving is not None:
        mv_id, version, path = serving
        if path is not None:
            predictor = load_artifact(path)
            if predictor.version == version:
                return ServingModel(predictor, mv_id, version)
            _warn_once(f"the artifact at {path} is now {predictor.version}, the registry serves {version}")
        else:
            _warn_once(f"serving model {version} has no artifact on this host nor its files in SQL")
    predictor = get_predictor(settings)
    return ServingModel(predictor, model_version_id(settings.database_url, predictor), predictor.version)


def split_suspects(
    session: Session, *, study_ids: Sequence[int], token: str, settings: Settings
) -> list[list[int]] | None:
    """For a chunk holding studies delivered before, release them and return the chunks to send instead.

    A study with attempts >= 1 that is still active was delivered and never finished: its worker may have
    died on it. Running it in a chunk again would take the chunk's other studies down with it, and their
    attempts would run out too. So each such study gets a task of its own; the fresh ones stay together.
    Returns None when the chunk can run as is. The caller commits, then sends.
    """
    if len(study_ids) <= 1:
        return None
    rows = session.execute(
        select(Study.id, Study.attempts).where(
            Study.id.in_(study_ids), Study.status.in_((StudyStatus.QUEUED, StudyStatus.RUNNING))
        )
    ).all()
    suspects = sorted(i for i, attempts in rows if attempts >= 1)
    if not suspects:
        return None
    # This very message may have been delivered before (same task id = same token): hand back what it holds.
    release_studies(session, study_ids=suspects, token=token, lease_s=settings.queued_lease_s)
    fresh = sorted(i for i, attempts in rows if attempts < 1)
    return ([fresh] if fresh else []) + [[i] for i in suspects]


def screen_chunk(
    session: Session,
    *,
    study_ids: Sequence[int],
    token: str,
    model: ServingModel,
    settings: Settings,
) -> ChunkOutcome:
    """Claim, classify as one array, and record these studies; commits. Idempotent per (study, model version).

    Studies not claimable (already DONE/FAILED, or held by another live task) are left alone. On a soft time
    limit or an unexpected error the studies still held are released to QUEUED and listed in `requeued` (the
    caller sends them again, one per task); the attempt counter bounds how often that can happen.
    """
    from celery.exceptions import SoftTimeLimitExceeded

    outcome = ChunkOutcome()
    claimed = claim_studies(
        session,
        study_ids=list(study_ids),
        token=token,
        lease_s=settings.running_lease_s,
        max_attempts=settings.max_attempts,
    )
    held = [s.id for s in claimed]
    bind_log(batch_id=claimed[0].batch_id if claimed else None)
    outcome.not_claimed = sorted(set(study_ids) - set(held))
    if not claimed:
        session.commit()  # out-of-attempts studies may have been marked FAILED
        return outcome
    try:
        # Read in the claim's transaction (one commit fewer); the commit makes the claim visible (progress
        # shows RUNNING) and no lock is held during inference.
        images = load_image_bytes(session, studies=claimed)
        session.commit()
        runnable = [sid for sid in held if images.get(sid)]
        for sid in held:
            if not images.get(sid) and fail_study(session, study_id=sid, token=token, reason=NO_IMAGE_REASON):
                outcome.failed.append(sid)
                outcome.fail_kinds[sid] = ("no_image", NO_IMAGE_REASON)
        # What is not a chest X-ray never gets here: the validity gate ran at intake (intake.files), where
        # a refused image became a FAILED study, so this core spends its time on the model alone.
        results: list[Any] = []
        stats: list[Any] = []  # input statistics per runnable study (drift watch)
        elapsed_ms = 0.0
        if runnable:
            started = time.perf_counter()
            results = predict_staged(
                model.predictor,
                [images[sid] for sid in runnable],
                max_pixels=settings.max_image_pixels,
                stats_out=stats,
            )
            # One array for the chunk: each study's share of the chunk's wall time.
            elapsed_ms = (time.perf_counter() - started) * 1000.0 / len(runnable)
            if len(results) != len(runnable):
                raise RuntimeError(f"predictor returned {len(results)} results for {len(runnable)} images")
        write_started = time.perf_counter()
        _record(session, runnable, results, token=token, model=model, elapsed_ms=elapsed_ms, outcome=outcome)
        rows = [{"study_id": sid, **st} for sid, st in zip(runnable, stats, strict=False) if st]
        save_input_stats(session, rows=rows)  # drift watch: best effort, so stats may be shorter (none)
        session.commit()
        STAGE_SECONDS.labels("write").observe(time.perf_counter() - write_started)
        count_outcome(outcome)
    except (SoftTimeLimitExceeded, Exception) as exc:
        session.rollback()
        kind = "time limit" if isinstance(exc, SoftTimeLimitExceeded) else type(exc).__name__
        outcome.done.clear()
        outcome.failed.clear()
        outcome.requeued = release_studies(
            session, study_ids=held, token=token, lease_s=settings.queued_lease_s
        )
        session.commit()
        log.warning("chunk %s released after %s: %s", held, kind, exc)
        if not isinstance(exc, SoftTimeLimitExceeded):
            log.exception("screening error")
    return outcome


def count_outcome(outcome: ChunkOutcome) -> None:
    """After the commit: count DONE and FAILED studies, one log line per failure (no traceback: expected)."""
    STUDIES_DONE.inc(len(outcome.done))
    for sid in outcome.failed:
        kind, reason = outcome.fail_kinds.get(sid, ("internal", ""))
        STUDIES_FAILED.labels(kind).inc()
        log.info("study failed: %s", reason, extra={"study_id": sid, "reason_kind": kind})


def _record(
    session: Session,
    study_ids: Sequence[int],
    results: Sequence[Any],
    *,
    token: str,
    model: ServingModel,
    elapsed_ms: float,
    outcome: ChunkOutcome,
) -> None:
    from model.preprocess import ImageDecodeError

    predicted: list[dict[str, Any]] = []
    for sid, result in zip(study_ids, results, strict=True):
        if isinstance(result, BaseException):
            reason = (
                str(result)
                if isinstance(result, ImageDecodeError)
                else INTERNAL_ERROR_REASON.format(kind=type(result).__name__)
            )
            if fail_study(session, study_id=sid, token=token, reason=reason):
                outcome.failed.append(sid)
                kind = "decode" if isinstance(result, ImageDecodeError) else "internal"
                outcome.fail_kinds[sid] = (kind, reason)
        else:
            predicted.append(
                {
                    "study_id": sid,
                    "label": result.label,
                    "p_covid": result.p_covid,
                    "p_normal": result.p_normal,
                    "p_pneumonia": result.p_pneumonia,
                    "triage": result.triage,
                    "elapsed_ms": elapsed_ms,
                }
            )
    # One UPDATE and one INSERT for the whole chunk: per-study round trips cost a third of the time.
    outcome.done += complete_studies(
        session, token=token, model_version_id=model.model_version_id, results=predicted
    )


def run_screen_task(
    study_ids: Sequence[int],
    *,
    token: str,
    settings: Settings,
    enqueue: Enqueue,
    explain: Explain | None = None,
) -> ChunkOutcome:
    """One delivery of cxr.screen_chunk: one session; split, or screen; send follow-ups after the commit.

    explain, when given, is sent the studies now DONE (after the commit) so their heat maps are computed.
    """
    ids = sorted({int(i) for i in study_ids})
    # One connection for the whole delivery (no checkout + ping per commit). The serving version is read and
    # its transaction committed first, so no transaction stays open while a newly promoted model loads.
    with session_scope(settings.database_url, hold_connection=True) as session:
        model = serving_model(settings, session)
        chunks = split_suspects(session, study_ids=ids, token=token, settings=settings)
        if chunks is not None:
            session.commit()
            for chunk in chunks:
                enqueue(chunk, len(chunk))
            return ChunkOutcome(split=True, requeued=ids)
        outcome = screen_chunk(session, study_ids=ids, token=token, model=model, settings=settings)
    for sid in outcome.requeued:
        enqueue([sid], 1)
    if explain is not None and outcome.done:
        try:
            explain(outcome.done, model.model_version_id)
        except Exception as exc:  # noqa: BLE001 - the predictions are stored; the page shows the map as pending
            log.warning(
                "heat maps of %d studies not queued: %s: %s", len(outcome.done), type(exc).__name__, exc
            )
    return outcome


def reconcile_once(settings: Settings, *, enqueue: Enqueue) -> list[int]:
    """Requeue studies whose lease ran out (FAILED when out of attempts), commit, then enqueue them."""
    with session_scope(settings.database_url) as session:
        ids = reconcile(session, queued_lease_s=settings.queued_lease_s, max_attempts=settings.max_attempts)
    if ids:
        enqueue(ids, settings.chunk_size)
        log.info("reconciler requeued %d studies", len(ids))
    return ids
