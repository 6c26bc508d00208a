"""Who sees and who may change a batch: owner, admin, reviewer, other user."""

from __future__ import annotations

from store.db import session_scope
from store.studies import batches_visible_to, create_batch, get_batch_for
from store.tables import Role, User
from tests.conftest import make_user


def test_visibility_and_manage_rights(db_url: str) -> None:
    """Reviewers see every batch but may not change others'; other users see nothing of it."""
    owner = make_user(db_url, "owner")
    other = make_user(db_url, "other")
    reviewer = make_user(db_url, "reviewer", Role.REVIEWER)
    admin = make_user(db_url, "admin", Role.ADMIN)
    with session_scope(db_url) as s:
        batch_id = create_batch(s, owner=s.get(User, owner), name="b").id
    with session_scope(db_url) as s:
        for uid, sees, manages in (
            (owner, True, True),
            (admin, True, True),
            (reviewer, True, False),
            (other, False, False),
        ):
            user = s.get(User, uid)
            assert (get_batch_for(s, user=user, batch_id=batch_id) is not None) is sees, user.username
            assert (get_batch_for(s, user=user, batch_id=batch_id, manage=True) is not None) is manages
            assert ([b.id for b in batches_visible_to(s, user=user)] == [batch_id]) is sees
        assert get_batch_for(s, user=s.get(User, admin), batch_id=batch_id + 999) is None
