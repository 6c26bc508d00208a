"""SQLAlchemy 2.0 typed models: the one schema that web, worker and CLI share."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship

# Stable constraint names so Alembic migrations are identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the schema uses."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with the shared naming convention."""

    metadata = MetaData(naming_convention=NAMING)


class Role(enum.StrEnum):
    """What a user may do."""

    USER = "user"
    REVIEWER = "reviewer"
    ADMIN = "admin"


class StudyStatus(enum.StrEnum):
    """RECEIVED -> QUEUED -> RUNNING -> DONE or FAILED."""

    RECEIVED = "RECEIVED"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable and readable in psql.
    return Enum(cls, name=name, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


class User(Base):
    """An account; created by an admin."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"), default=Role.USER)
    api_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Set by an admin's password reset (and for the first admin): the next sign-in must choose a new one.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # In every session id: bumped by logout, password change, disable and token revoke, so every session
    # issued before ends at its next request (the cookie alone is not enough to stay signed in).
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    batches: Mapped[list[Batch]] = relationship(back_populates="owner", foreign_keys="Batch.owner_id")

    @property
    def is_admin(self) -> bool:
        """True for administrators."""
        return self.role == Role.ADMIN


class Batch(Base):
    """One upload of many studies by one user."""

    __tablename__ = "batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    notes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Soft delete: the rows stay for the audit trail; the batch disappears from every page and the API.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deleted_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)

    owner: Mapped[User] = relationship(back_populates="batches", foreign_keys=[owner_id])
    studies: Mapped[list[Study]] = relationship(back_populates="batch", order_by="Study.id")


class Image(Base):
    """Image bytes, content-addressed by sha256 and kept in SQL so any worker host can read them."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Study(Base):
    """One image to classify, with its state machine."""

    __tablename__ = "studies"
    __table_args__ = (
        Index("ix_studies_status_lease", "status", "lease_expires_at"),
        # A batch's progress is counted from this index alone (index-only scan; migration 0008); it also
        # serves every lookup by batch_id.
        Index("ix_studies_batch_id_status", "batch_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    # NULL when the upload was rejected before its bytes were worth keeping (e.g. empty file).
    image_sha256: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"), nullable=True, index=True)
    # The client's file name: metadata only, escaped on output, never used as a path.
    original_filename: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    format: Mapped[str] = mapped_column(String(16), default="unknown")
    width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Hashed patient key (DICOM PatientID or a field given at upload) so retraining splits stay patient-level.
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    thumbnail_png: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))
    status: Mapped[StudyStatus] = mapped_column(
        _enum(StudyStatus, "study_status"), default=StudyStatus.RECEIVED
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Who holds the study while RUNNING (the Celery task id) and until when.
    claim_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    batch: Mapped[Batch] = relationship(back_populates="studies")
    predictions: Mapped[list[Prediction]] = relationship(back_populates="study", order_by="Prediction.id")


class ModelVersion(Base):
    """One trained model artifact known to the system."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    artifact_path: Mapped[str] = mapped_column(String(1024))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    is_serving: Mapped[bool] = mapped_column(Boolean, default=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    card: Mapped[str] = mapped_column(Text, default="")
    # The artifact's meta["band_legend"] (band -> one-sentence meaning); None for artifacts without one.
    band_legend: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    # Class and band shares of the artifact's out-of-fold predictions (worker.drift); None without oof.csv.
    drift_reference: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ModelFile(Base):
    """One file of a model version's artifact folder, kept in SQL so any worker host can write the folder."""

    __tablename__ = "model_files"
    __table_args__ = (UniqueConstraint("model_version_id", "name", name="uq_model_files_version_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    # The file's name inside the artifact folder (meta.json, model.tflite, ...); never a path.
    name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prediction(Base):
    """The output of one model version on one study; never overwritten."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("study_id", "model_version_id", name="uq_predictions_study_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    label: Mapped[str] = mapped_column(String(16))
    p_covid: Mapped[float] = mapped_column(Float)
    p_normal: Mapped[float] = mapped_column(Float)
    p_pneumonia: Mapped[float] = mapped_column(Float)
    triage: Mapped[str] = mapped_column(String(64))
    elapsed_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="predictions")
    model_version: Mapped[ModelVersion] = relationship()


class Heatmap(Base):
    """Grad-CAM heat map of one prediction (study, model version), computed by the worker after screening."""

    __tablename__ = "heatmaps"
    __table_args__ = (UniqueConstraint("study_id", "model_version_id", name="uq_heatmaps_study_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    # The class explained (the prediction's finding).
    class_name: Mapped[str] = mapped_column(String(16))
    # RGBA PNG cropped to the image's content area; NULL with an error when it could not be computed.
    png: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    elapsed_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class InputStats(Base):
    """One study's input statistics, written by the worker when it decodes the image (drift watch)."""

    __tablename__ = "input_stats"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), primary_key=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    bit_depth: Mapped[int | None] = mapped_column(Integer, nullable=True)
    mean_intensity: Mapped[float] = mapped_column(Float)  # 0..1, bone bright
    # Mean of the outer tenth minus mean of the central half: negative on an ordinary film (dark air around).
    border_minus_centre: Mapped[float] = mapped_column(Float)
    manufacturer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    view: Mapped[str | None] = mapped_column(String(16), nullable=True)


class DicomResult(Base):
    """A result sent back as DICOM for one prediction: the Structured Report ("sr") or the Grad-CAM
    Secondary Capture ("sc"), kept so that it can be downloaded and (re)sent to the configured destination."""

    __tablename__ = "dicom_results"
    __table_args__ = (UniqueConstraint("prediction_id", "kind", name="uq_dicom_results_prediction_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When it reached CXR_DICOM_DESTINATION (None: not sent, or no destination), and the last send error.
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    send_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Review(Base):
    """A reviewer's confirmation or correction of a finished study's label; the newest one counts."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    reviewer_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True
    )
    label: Mapped[str] = mapped_column(String(16))
    # True when the reviewer agreed with the prediction shown, False when they corrected it.
    agrees: Mapped[bool] = mapped_column(Boolean)
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RunStatus(enum.StrEnum):
    """Life of a retraining run."""

    RUNNING = "RUNNING"
    PROMOTED = "PROMOTED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"


class RetrainRun(Base):
    """One retraining attempt: progress, the gate's verdict and its reasons."""

    __tablename__ = "retrain_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(32))
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), default=RunStatus.RUNNING)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs_total: Mapped[int] = mapped_column(Integer, default=0)
    n_reviewed: Mapped[int] = mapped_column(Integer, default=0)
    current_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    candidate_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reasons: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Lock(Base):
    """A named lock with a lease, so a crashed holder does not block the next one forever."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEvent(Base):
    """Who did what, when: sign-ins, uploads, account changes, promotions."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128), default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
