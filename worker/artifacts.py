"""The one place a worker decides which folder to read a model version from (screening, heat maps, DICOM
results, retraining's comparison): store.model_files.local_artifact with this host's cache folder."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.orm import Session

from config import Settings
from store.model_files import cache_root, local_artifact
from store.tables import ModelVersion

log = logging.getLogger("cxr.worker")


def artifact_dir(settings: Settings, session: Session, model_version: ModelVersion) -> Path | None:
    """This model version's folder on this host: registered and matching, else written from SQL; else None.

    None (the version's files are neither here nor in SQL, or could not be written here) leaves each caller
    its own fallback: the configured model for screening, "not on this worker host" for heat maps.
    """
    try:
        return local_artifact(session, model_version=model_version, cache_dir=cache_root(settings.data_dir))
    except (OSError, ValueError, LookupError) as exc:
        log.warning(
            "model %s: its files from SQL could not be written under %s: %s: %s",
            model_version.version,
            cache_root(settings.data_dir),
            type(exc).__name__,
            exc,
        )
        return None
