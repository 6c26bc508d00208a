"""Image bytes in PostgreSQL at scale (issue 14, point 8): size, write speed, report query time to 100,000.

    .venv/bin/python bench/pg_images.py [--studies 100000] [--step 10000] [--json FILE]

Into a throwaway database (dropped afterwards), batches of --batch-size studies go in through the app's own
write path (store.studies.add_studies: the image row, INSERT ... ON CONFLICT DO NOTHING, and the study row,
committed every --group studies), each with image bytes of a realistic size: PNG/JPEG 100-500 KB and a share
of DICOM at 2-6 MB (--dicom-share). The bytes are random after a correct file signature: like real PNG, JPEG
and compressed DICOM pixel data they do not compress, and images.data is stored EXTERNAL anyway (out of line
in TOAST, no compression attempt; migration 0003), so they take the space the real files would. They are
never decoded here. Each batch is then marked screened (a prediction and input statistics per
study, in SQL).

After every --step studies it prints: the database's, the images table's (heap + TOAST + index) and the
studies table's size (pg_total_relation_size), the write rate of the step (studies/s and MB/s of image bytes;
time in add_studies and its commit only), the time of the report page's queries on the newest and on the
first batch (progress, first page of rows, summary, drift; median of 5), the poll, and a worker's read of one
chunk of bytes.

Disk first: the estimated size must leave --min-free-gb free on the database's file system (df), else the
run is cut to the steps that fit, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from sqlalchemy import case, create_engine, insert, literal, select, text, update  # noqa: E402

from bench.throughput import create_database, drop_database  # noqa: E402
from store import migrate  # noqa: E402
from store.db import dispose_all, session_scope  # noqa: E402
from store.drift import batch_drift  # noqa: E402
from store.reports import ReportQuery, batch_summary, report_page  # noqa: E402
from store.studies import add_studies, batch_progress, create_batch, load_image_bytes  # noqa: E402
from store.tables import (  # noqa: E402
    Batch,
    InputStats,
    ModelVersion,
    Prediction,
    Study,
    StudyStatus,
    User,
    utcnow,
)
from store.users import create_user  # noqa: E402

MB = 1024 * 1024
SIGNATURES = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff\xe0", "dicom": b"\x00" * 128 + b"DICM"}


def synthetic_files(
    rng: np.random.Generator, n: int, *, dicom_share: float, start: int
) -> list[dict[str, Any]]:
    """n upload dicts as add_studies takes them: PNG/JPEG of 100-500 KB, DICOM of 2-6 MB, distinct bytes."""
    files = []
    for i in range(n):
        if rng.random() < dicom_share:
            fmt, size, side = "dicom", int(rng.uniform(2, 6) * MB), 2500
        else:
            fmt, size, side = ("png", "jpeg")[i % 2], int(rng.uniform(100, 500) * 1024), 1024
        sig = SIGNATURES[fmt]
        data = sig + rng.bytes(size - len(sig))
        files.append(
            {"filename": f"s{start + i}.{fmt}", "data": data, "fmt": fmt, "width": side, "height": side}
        )
    return files


def screen_in_sql(url: str, *, batch_id: int, model_version_id: int) -> None:
    """The batch as after screening: DONE, one prediction and one row of input statistics per study."""
    now = utcnow()
    with session_scope(url) as s:
        s.execute(
            update(Study)
            .where(Study.batch_id == batch_id)
            .values(status=StudyStatus.DONE, finished_at=now, attempts=1)
            .execution_options(synchronize_session=False)
        )
        ids = select(Study.id).where(Study.batch_id == batch_id).subquery()
        label = case((ids.c.id % 3 == 0, "covid"), (ids.c.id % 3 == 1, "normal"), else_="pneumonia")
        band = case(
            (ids.c.id % 3 == 0, "COVID-19 suspected"),
            (ids.c.id % 3 == 1, "likely normal"),
            else_="pneumonia suspected",
        )
        cols = ["study_id", "model_version_id", "label", "p_covid", "p_normal", "p_pneumonia", "triage"]
        s.execute(
            insert(Prediction).from_select(
                [*cols, "elapsed_ms", "created_at"],
                select(
                    ids.c.id,
                    literal(model_version_id),
                    label,
                    literal(0.3),
                    literal(0.4),
                    literal(0.3),
                    band,
                    literal(4.0),
                    literal(now),
                ),
            )
        )
        s.execute(
            insert(InputStats).from_select(
                ["study_id", "width", "height", "bit_depth", "mean_intensity", "border_minus_centre"],
                select(ids.c.id, literal(1024), literal(1024), literal(8), literal(0.5), literal(-0.1)),
            )
        )


def median_ms(fn: Callable[[], Any], runs: int = 5) -> float:
    """Median wall time of fn in milliseconds (one warm-up run first)."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def report_queries(url: str, batch_id: int) -> dict[str, float]:
    """ms of each query the batch report page runs (web/reports.py), on this batch."""
    out = {}
    with session_scope(url) as s:
        batch = s.get(Batch, batch_id)
        out["poll"] = median_ms(lambda: batch_progress(s, batch_ids=[batch_id]))
        out["rows_page"] = median_ms(lambda: report_page(s, batch=batch, query=ReportQuery(per_page=50)))
        out["rows_page_priority"] = median_ms(
            lambda: report_page(s, batch=batch, query=ReportQuery(per_page=50, sort="priority"))
        )
        out["summary"] = median_ms(lambda: batch_summary(s, batch=batch))
        out["drift"] = median_ms(lambda: batch_drift(s, batch_id=batch_id))
    out["page_total"] = out["poll"] + out["rows_page"] + out["summary"] + out["drift"]
    return out


def chunk_read(url: str, batch_id: int, rng: np.random.Generator, chunk: int = 64) -> tuple[float, float]:
    """(ms, MB/s) of a worker's read of one chunk's image bytes (store.studies.load_image_bytes)."""
    with session_scope(url) as s:
        ids = s.scalars(select(Study.id).where(Study.batch_id == batch_id)).all()
        pick = sorted(int(i) for i in rng.choice(ids, size=min(chunk, len(ids)), replace=False))
        studies = s.scalars(select(Study).where(Study.id.in_(pick))).all()
        t0 = time.perf_counter()
        data = load_image_bytes(s, studies=studies)
        seconds = time.perf_counter() - t0
    total = sum(len(b or b"") for b in data.values())
    return seconds * 1000, total / MB / seconds


def sizes(url: str) -> dict[str, float]:
    """MB of the database, of images (heap, TOAST, indexes) and of studies (with its indexes)."""
    with session_scope(url) as s:
        row = s.execute(
            text(
                "SELECT pg_database_size(current_database()), pg_total_relation_size('images'), "
                "pg_relation_size('images'), "
                "pg_relation_size((SELECT reltoastrelid FROM pg_class WHERE relname = 'images')), "
                "pg_indexes_size('images'), pg_total_relation_size('studies'), "
                "pg_total_relation_size('predictions') + pg_total_relation_size('input_stats')"
            )
        ).one()
    keys = ("database", "images_total", "images_heap", "images_toast", "images_indexes", "studies_total")
    out = {k: round(v / MB, 1) for k, v in zip(keys, row[:6], strict=True)}
    out["predictions_and_stats"] = round(row[6] / MB, 1)
    return out


def data_directory(url: str) -> Path:
    """PostgreSQL's data directory (for df), or / when it cannot be read."""
    try:
        with session_scope(url) as s:
            path = Path(str(s.scalar(text("SHOW data_directory"))))
        return path if path.exists() else Path("/")
    except Exception:  # noqa: BLE001 - not a superuser: df of the root file system
        return Path("/")


def main() -> None:  # noqa: PLR0915 - one linear script
    """Run the measurement, print a table, and optionally save it as JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--step", type=int, default=10_000, help="measure after every this many studies")
    ap.add_argument("--batch-size", type=int, default=10_000, help="studies per batch")
    ap.add_argument("--group", type=int, default=200, help="studies per add_studies call and commit")
    ap.add_argument(
        "--dicom-share", type=float, default=0.02, help="share of 2-6 MB DICOM files (rest PNG/JPEG)"
    )
    ap.add_argument("--min-free-gb", type=float, default=20.0, help="stop before the disk has less free")
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    mean_mb = args.dicom_share * 4 + (1 - args.dicom_share) * 300 / 1024
    pg_dir = data_directory(args.pg_admin_url)
    free_gb = shutil.disk_usage(pg_dir).free / 1024**3
    # Table + TOAST pages + WAL not yet recycled: budget 1.1x the bytes and 2 GB of WAL.
    fits = int(max(0.0, free_gb - args.min_free_gb - 2) * 1024 / (mean_mb * 1.1))
    studies = min(args.studies, fits // args.step * args.step)
    need_gb = args.studies * mean_mb * 1.1 / 1024
    print(
        f"disk: {free_gb:.1f} GB free on the file system of {pg_dir}; {args.studies} studies of "
        f"{mean_mb:.2f} MB on average need ~{need_gb:.1f} GB; keeping {args.min_free_gb:.0f} GB free "
        f"-> running {studies}",
        flush=True,
    )
    if studies < args.step:
        sys.exit("not enough free disk for one step")

    admin, db_name, url = create_database(args.pg_admin_url, "cxr_pgimg_")
    report: dict[str, Any] = {
        "studies_planned": args.studies,
        "studies_run": studies,
        "dicom_share": args.dicom_share,
        "free_gb_before": round(free_gb, 1),
        "steps": [],
    }
    try:
        migrate.upgrade(url)
        with session_scope(url) as s:
            owner_id = create_user(s, username="bench", password="bench password 123").id
            mv = ModelVersion(version="bench", artifact_path="-", artifact_sha256="0" * 64, is_serving=True)
            s.add(mv)
            s.flush()
            mv_id = mv.id
        header = (
            f"{'studies':>8} {'db GB':>7} {'images GB':>9} {'TOAST GB':>8} {'studies MB':>10} "
            f"{'studies/s':>9} {'MB/s':>6} {'page ms':>8} {'(first)':>8} {'poll ms':>7} {'chunk read':>12} "
            f"{'df free GB':>10}"
        )
        print(header, flush=True)
        done, batch_ids, batch_id, in_batch = 0, [], 0, 0
        while done < studies:
            insert_s, written = 0.0, 0
            step_end = done + args.step
            while done < step_end:
                if in_batch == 0 or in_batch >= args.batch_size:
                    with session_scope(url) as s:
                        batch_id = create_batch(s, owner=s.get(User, owner_id), name=f"b{len(batch_ids)}").id
                    batch_ids.append(batch_id)
                    in_batch = 0
                n = min(args.group, step_end - done, args.batch_size - in_batch)
                files = synthetic_files(rng, n, dicom_share=args.dicom_share, start=done)
                t0 = time.perf_counter()
                with session_scope(url) as s:
                    add_studies(s, batch=s.get(Batch, batch_id), files=files)
                insert_s += time.perf_counter() - t0
                written += sum(len(f["data"]) for f in files)
                done += n
                in_batch += n
                if in_batch >= args.batch_size:
                    screen_in_sql(url, batch_id=batch_id, model_version_id=mv_id)
            if in_batch < args.batch_size:  # a partly filled batch is measured as it stands
                screen_in_sql(url, batch_id=batch_id, model_version_id=mv_id)
            analyze = create_engine(url, isolation_level="AUTOCOMMIT")
            with analyze.connect() as conn:  # what autovacuum would have done by now
                conn.execute(text("ANALYZE"))
            analyze.dispose()
            size = sizes(url)
            newest, first = report_queries(url, batch_ids[-1]), report_queries(url, batch_ids[0])
            read_ms, read_mbs = chunk_read(url, batch_ids[-1], rng)
            free_now = shutil.disk_usage(pg_dir).free / 1024**3
            step = {
                "studies": done,
                "sizes_mb": size,
                "write_studies_per_s": round(args.step / insert_s, 1),
                "write_mb_per_s": round(written / MB / insert_s, 1),
                "image_mb_written": round(written / MB, 1),
                "report_newest_batch_ms": {k: round(v, 1) for k, v in newest.items()},
                "report_first_batch_ms": {k: round(v, 1) for k, v in first.items()},
                "chunk_read_ms": round(read_ms, 1),
                "chunk_read_mb_per_s": round(read_mbs, 1),
                "df_free_gb": round(free_now, 1),
            }
            report["steps"].append(step)
            print(
                f"{done:>8} {size['database'] / 1024:>7.2f} {size['images_total'] / 1024:>9.2f} "
                f"{size['images_toast'] / 1024:>8.2f} {size['studies_total']:>10.1f} "
                f"{step['write_studies_per_s']:>9.1f} {step['write_mb_per_s']:>6.1f} "
                f"{newest['page_total']:>8.1f} {first['page_total']:>8.1f} {newest['poll']:>7.1f} "
                f"{read_ms:>6.0f} ms/64 {free_now:>10.1f}",
                flush=True,
            )
            if free_now < args.min_free_gb:
                print(f"stopping: less than {args.min_free_gb} GB free", flush=True)
                break
    finally:
        dispose_all()
        drop_database(admin, db_name)
        print(f"dropped {db_name}; df free now {shutil.disk_usage(pg_dir).free / 1024**3:.1f} GB", flush=True)
    print(json.dumps(report["steps"][-1] if report["steps"] else {}, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("CXR_ENV", "test")
    main()
