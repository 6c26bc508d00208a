"""How fast the web stores uploads, in process: Flask test client, PostgreSQL, no worker, no HTTP server.

    .venv/bin/python bench/web_store.py [--files 1000] [--group 100]

Uploads --files chest X-rays to one batch through the JSON API in requests of --group files and prints
files/s (validation + SQL + request handling). A throwaway PostgreSQL database is created and dropped.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.throughput import create_database, drop_database, load_images  # noqa: E402
from store import migrate  # noqa: E402
from store.db import dispose_all, session_scope  # noqa: E402
from store.tables import Role  # noqa: E402
from store.users import create_user, issue_api_token  # noqa: E402
from web import create_app  # noqa: E402


def main() -> None:
    """Run the measurement and print files/s."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--group", type=int, default=100)
    ap.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    images = load_images(args.files)
    admin, name, url = create_database(args.pg_admin_url, "cxr_webstore_")
    try:
        migrate.upgrade(url)
        with session_scope(url) as s:
            user = create_user(s, username="bench", password="bench password 123", role=Role.ADMIN)
            token = issue_api_token(s, user=user)
        client = create_app({"DATABASE_URL": url, "TESTING": True}).test_client()
        headers = {"Authorization": f"Bearer {token}"}
        created = client.post("/api/v1/batches", json={"name": "web store"}, headers=headers)
        batch_id = created.get_json()["id"]
        t0 = time.perf_counter()
        for i in range(0, args.files, args.group):
            files = [(io.BytesIO(data), n) for n, data in images[i : i + args.group]]
            r = client.post(
                f"/api/v1/batches/{batch_id}/files",
                data={"files": files},
                headers=headers,
                content_type="multipart/form-data",
            )
            if r.status_code != 201:
                sys.exit(f"upload failed: {r.status_code} {r.get_data(as_text=True)[:500]}")
        elapsed = time.perf_counter() - t0
        print(f"web stored {args.files / elapsed:.0f} files/s ({args.files} files in {elapsed:.2f} s)")
    finally:
        dispose_all()
        drop_database(admin, name)


if __name__ == "__main__":
    main()
