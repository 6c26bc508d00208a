"""One logging set-up for every process (web, worker, beat, DICOM receiver, CLI): text or JSON lines.

CXR_LOG_FORMAT=json writes one JSON object per line (python-json-logger) with the process, the logger, the
message and the ids bound to the current work (batch_id, study_ids, task_id) or passed with `extra=`.
The default is one readable line, the same ids appended as key=value. Expected input errors (a file that is
not an image, a refused DICOM instance) are logged as one line by their callers, never with a traceback.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

# The ids an operator greps for; bound per task / request, or given with extra={...}.
CONTEXT_KEYS = ("batch_id", "study_id", "study_ids", "task_id", "calling_ae", "reason_kind")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "cxr_log_context", default=None
)
# Libraries that talk too much at INFO.
QUIET = {"pynetdicom": logging.WARNING, "urllib3": logging.WARNING, "PIL": logging.WARNING}


def bind(**values: Any) -> contextvars.Token:
    """Add ids to this thread's / task's log context (None values are dropped); returns a reset token."""
    merged = {**(_context.get() or {}), **{k: v for k, v in values.items() if v is not None}}
    return _context.set(merged)


def clear(token: contextvars.Token | None = None) -> None:
    """Forget the bound ids (back to the state before `bind`, or empty)."""
    if token is not None:
        _context.reset(token)
    else:
        _context.set(None)


@contextmanager
def context(**values: Any) -> Iterator[None]:
    """The ids bound for the duration of a block."""
    token = bind(**values)
    try:
        yield
    finally:
        clear(token)


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record (an explicit extra= wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keep the record; only add attributes."""
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger[pid]: message key=value ...`, the traceback (if any) below."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The readable line with the record's ids appended."""
        line = super().format(record)
        ids = " ".join(
            f"{k}={getattr(record, k)}" for k in CONTEXT_KEYS if getattr(record, k, None) is not None
        )
        if not ids:
            return line
        head, sep, rest = line.partition("\n")
        return f"{head} {ids}{sep}{rest}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner or click may swap it after set-up)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        """The current sys.stderr."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def make_formatter(fmt: str, process: str) -> logging.Formatter:
    """The formatter of CXR_LOG_FORMAT: "json" or "text"."""
    if fmt == "json":
        return JsonFormatter(
            ["asctime", "levelname", "name", "process", "message"],
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
            static_fields={"service": process},
            json_ensure_ascii=False,
        )
    return TextFormatter()


def setup_logging(
    fmt: str = "text", level: str | int = "INFO", *, process: str = "cxr", stream: TextIO | None = None
) -> logging.Handler:
    """Configure the root logger: one handler (ours replaces a previous one of ours), the context filter.

    Handlers installed by others (pytest's capture, an embedding application) are left in place.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "cxr_handler", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.cxr_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(make_formatter(fmt, process))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name, lib_level in QUIET.items():
        logging.getLogger(name).setLevel(lib_level)
    logging.captureWarnings(True)
    return handler


def setup_from_settings(settings: Any, *, process: str, min_level: int = logging.NOTSET) -> logging.Handler:
    """setup_logging with CXR_LOG_FORMAT and CXR_LOG_LEVEL of these settings (never below min_level)."""
    level = max(logging.getLevelName(str(settings.log_level).upper()) or logging.INFO, min_level)
    return setup_logging(settings.log_format, level, process=process)
