"""`cxr dicom-listen`: the DICOM C-STORE receiver (intake.dicom_receiver) in the foreground."""

from __future__ import annotations

import signal
import threading

import click

from config import load_settings
from ops.logs import setup_from_settings


@click.command("dicom-listen")
@click.option("--host", default=None, help="Address to listen on [default: $CXR_DICOM_HOST or 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [default: $CXR_DICOM_PORT or 11112].")
@click.option("--ae-title", default=None, help="Our AE title [default: $CXR_DICOM_AE_TITLE or CXR_SCREEN].")
def dicom_listen_command(host: str | None, port: int | None, ae_title: str | None) -> None:
    """Receive chest X-rays by DICOM C-STORE (and answer C-ECHO) until Ctrl-C or SIGTERM."""
    from intake.dicom_receiver import serve

    changes = {"dicom_host": host, "dicom_port": port, "dicom_ae_title": ae_title}
    settings = load_settings().with_overrides(**{k: v for k, v in changes.items() if v is not None})
    # ops.logs keeps pynetdicom (every PDU at INFO) to its warnings, and our own lines.
    setup_from_settings(settings, process="dicom")
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    serve(settings, stop)
    click.echo("DICOM receiver stopped.", err=True)
