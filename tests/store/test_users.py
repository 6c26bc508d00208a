"""Accounts: passwords hashed by werkzeug.security; hashes in the old hand-written format still work."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from store import migrate
from store.db import session_scope
from store.tables import Role, User
from store.users import authenticate, hash_password, needs_rehash, verify_password


def test_old_scrypt_hashes_still_sign_in_and_are_upgraded(sqlite_url: str) -> None:
    """Accounts hashed by the old hand-written scrypt keep working; the first good sign-in rehashes them."""
    migrate.upgrade(sqlite_url)
    salt = bytes(range(16))
    digest = hashlib.scrypt(b"correct horse battery", salt=salt, n=2**14, r=8, p=1, dklen=64)
    legacy = f"scrypt$16384$8$1${salt.hex()}${digest.hex()}"
    with session_scope(sqlite_url) as s:
        s.add(User(username="old", password_hash=legacy, role=Role.USER))
    assert verify_password(legacy, "correct horse battery") and not verify_password(legacy, "wrong password")
    with session_scope(sqlite_url) as s:
        assert authenticate(s, username="old", password="wrong password") is None
    with session_scope(sqlite_url) as s:
        assert s.scalar(select(User.password_hash).where(User.username == "old")) == legacy  # not on failure
        assert authenticate(s, username="old", password="correct horse battery") is not None
    with session_scope(sqlite_url) as s:
        upgraded = s.scalar(select(User.password_hash).where(User.username == "old"))
        assert upgraded.startswith("scrypt:") and not needs_rehash(upgraded)
        assert authenticate(s, username="old", password="correct horse battery") is not None


def test_new_hashes_are_werkzeugs() -> None:
    """hash_password writes werkzeug's self-describing format, which verifies and needs no upgrade."""
    stored = hash_password("correct horse battery")
    assert stored.startswith("scrypt:") and not needs_rehash(stored)
    assert verify_password(stored, "correct horse battery") and not verify_password(stored, "nope nope nope")
    assert not verify_password("garbage", "correct horse battery")
