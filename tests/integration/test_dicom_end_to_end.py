"""End to end the way a hospital sends: storescu pushes the seven fixtures to `cxr dicom-listen`, a real
worker screens them, the SR of each finished study is fetched from the web app and checked: the finding,
and that neither the SR nor the stored instance carries the patient's identifiers."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import requests
from sqlalchemy import select

from intake.deid import keyed_uid
from store import migrate
from store.db import session_scope
from store.studies import load_image_bytes
from store.tables import Batch, DicomResult, Prediction, Role, Study, StudyStatus
from tests.conftest import make_user
from tests.intake.dicom_helpers import CORRUPT, fixture_paths, require_tool
from tests.intake.test_deid import check_deidentified
from tests.procs import (
    _spawn,
    free_port,
    log_tail,
    port_open,
    service_env,
    settings_from_env,
    start_web,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.slow
STORESCU_CFG = Path(__file__).parent.parent / "intake" / "storescu.cfg"
FINDING_CODES = {"covid": "840539006", "pneumonia": "233604007", "normal": "17621005"}


def _login(base: str, username: str) -> requests.Session:
    web = requests.Session()
    page = web.get(f"{base}/login", timeout=10).text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    data = {"username": username, "password": "correct horse battery"}
    if token:
        data["csrf_token"] = token.group(1)
    resp = web.post(f"{base}/login", data=data, allow_redirects=False, timeout=10)
    assert resp.status_code == 302, resp.text
    return web


def test_storescu_to_sr(data_dir: Path, procs: list) -> None:
    require_tool("storescu")
    fixtures = fixture_paths()
    assert len(fixtures) == 7
    url = f"sqlite:///{data_dir / 'cxr.sqlite3'}"
    migrate.upgrade(url)
    make_user(url, "root", role=Role.ADMIN)
    dicom_port = free_port()
    env = service_env(data_dir, database_url=url, dicom_port=dicom_port)
    listener = _spawn(
        [sys.executable, "-c", "from cli.main import main; main()", "dicom-listen"],
        env,
        data_dir / "dicom.log",
    )
    procs.append(listener)
    wait_for(lambda: port_open(dicom_port), 60, message="the DICOM receiver")
    procs.append(start_worker(env, queues="inference,explain"))
    web, base = start_web(env)
    procs.append(web)

    folder = data_dir / "outbox"
    folder.mkdir()
    for path in fixtures:
        (folder / path.name).write_bytes(path.read_bytes())
    sent = subprocess.run(
        ["storescu", "-nh", "-xf", str(STORESCU_CFG), "Chest", "-aet", "WARD_CR", "-aec", "CXR_SCREEN"]
        + ["+sd", "127.0.0.1", str(dicom_port), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Store Failed" not in sent.stderr or CORRUPT in sent.stderr, sent.stderr

    def finished() -> list[Study] | None:
        if listener.poll() is not None:
            pytest.fail(f"dicom-listen exited:\n{log_tail(listener)}")
        with session_scope(url) as s:
            studies = list(s.scalars(select(Study)))
            if len(studies) == 7 and all(
                st.status in (StudyStatus.DONE, StudyStatus.FAILED) for st in studies
            ):
                n_sr = len(list(s.scalars(select(DicomResult.id).where(DicomResult.kind == "sr"))))
                if n_sr == 6:
                    s.expunge_all()
                    return studies
        return None

    studies = wait_for(finished, 300, interval=1.0, message="the batch and its SRs")
    with session_scope(url) as s:
        batches = list(s.scalars(select(Batch)))
        assert len(batches) == 1 and batches[0].owner.username == "dicom"
        labels = {p.study_id: p.label for p in s.scalars(select(Prediction))}
    done = [st for st in studies if st.status == StudyStatus.DONE]
    failed = [st for st in studies if st.status == StudyStatus.FAILED]
    assert len(done) == 6 and len(failed) == 1 and "JPEG 2000" in failed[0].error

    session = _login(base, "root")
    originals = {p.name: p.read_bytes() for p in fixtures}
    for study in done:
        resp = session.get(f"{base}/studies/{study.id}/sr.dcm", timeout=30)
        assert resp.status_code == 200 and resp.headers["Content-Type"] == "application/dicom"
        sr = pydicom.dcmread(io.BytesIO(resp.content))
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
        assert items["Finding"].ConceptCodeSequence[0].CodeValue == FINDING_CODES[labels[study.id]]
        assert sr.PatientID == study.patient_key  # the keyed pseudonym, never the sender's PatientID
        raw_ids = {
            str(pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).PatientID) for b in originals.values()
        }
        assert not any(r and r in resp.content.decode("latin-1") for r in raw_ids)
    # Each stored instance is de-identified, tag by tag, against the file sent (found by its keyed UID).
    key = settings_from_env(env).deid_key
    with session_scope(url) as s:
        stored = load_image_bytes(s, studies=done)
    by_uid = {
        pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID: data
        for data in stored.values()
    }
    for name, raw in originals.items():
        if name != CORRUPT:
            uid = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPInstanceUID
            check_deidentified(raw, by_uid[keyed_uid(key, uid)])
