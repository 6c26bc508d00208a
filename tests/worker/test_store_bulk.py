"""store.studies.add_studies: a whole upload in a few statements; images stored once, order kept."""

from __future__ import annotations

from sqlalchemy import func, select

from store.db import session_scope
from store.studies import add_studies, create_batch
from store.tables import Image, Study, StudyStatus
from store.users import create_user


def test_add_studies_dedupes_images_keeps_order_and_rejections(db_url: str) -> None:
    """Identical bytes stored once (also across uploads); studies in order with ids; rejections FAILED."""
    with session_scope(db_url) as s:
        user = create_user(s, username="bulk", password="correct horse battery")
        batch = create_batch(s, owner=user, name="bulk")
        [earlier_id] = add_studies(s, batch=batch, files=[{"filename": "earlier.png", "data": b"AAA"}])
        earlier = s.get(Study, earlier_id)
        ids = add_studies(
            s,
            batch=batch,
            files=[
                {"filename": "a.png", "data": b"AAA", "fmt": "png", "width": 2, "height": 3},
                {"filename": "b.png", "data": b"BBB", "fmt": "png", "thumbnail_png": b"thumb"},
                {"filename": "b-again.png", "data": b"BBB", "fmt": "png"},
                {"filename": "empty.png", "data": None, "error": "The file is empty.", "size_bytes": 0},
                {"filename": "x" * 600, "data": None, "error": "Not an image.", "size_bytes": 42},
            ],
        )
        assert all(ids) and ids == sorted(ids) and ids[0] > earlier.id
    with session_scope(db_url) as s:
        rows = {st.id: st for st in s.scalars(select(Study).where(Study.id.in_(ids)))}
        got = [(rows[i].original_filename[:12], rows[i].status, rows[i].size_bytes) for i in ids]
        assert got == [
            ("a.png", StudyStatus.RECEIVED, 3),
            ("b.png", StudyStatus.RECEIVED, 3),
            ("b-again.png", StudyStatus.RECEIVED, 3),
            ("empty.png", StudyStatus.FAILED, 0),
            ("x" * 12, StudyStatus.FAILED, 42),
        ]
        assert rows[ids[0]].image_sha256 == earlier.image_sha256
        assert rows[ids[1]].image_sha256 == rows[ids[2]].image_sha256
        assert (rows[ids[0]].width, rows[ids[0]].height, rows[ids[1]].thumbnail_png) == (2, 3, b"thumb")
        assert rows[ids[3]].error == "The file is empty." and rows[ids[3]].finished_at is not None
        assert len(rows[ids[4]].original_filename) == 512
        assert s.scalar(select(func.count()).select_from(Image)) == 2
