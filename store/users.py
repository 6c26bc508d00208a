"""Accounts: creation by an admin, password checks (werkzeug.security), API tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from store.audit import record_event
from store.tables import Role, User

# Werkzeug's scrypt (its default), self-describing: "scrypt:32768:8:1$<salt>$<hex>".
PASSWORD_METHOD = "scrypt"
_LEGACY_PREFIX = "scrypt$"  # hashes written by hand before werkzeug: "scrypt$n$r$p$salt$digest"
MIN_PASSWORD = 10


class UserError(ValueError):
    """A user operation was refused; the message says why."""


def hash_password(password: str) -> str:
    """A salted, self-describing password hash (werkzeug.security)."""
    return generate_password_hash(password, method=PASSWORD_METHOD)


def needs_rehash(stored: str) -> bool:
    """True for a hash in the old hand-written format: replaced at the next successful sign-in."""
    return stored.startswith(_LEGACY_PREFIX)


def verify_password(stored: str, password: str) -> bool:
    """Constant-time check of password against a stored hash (werkzeug's, or the old hand-written scrypt)."""
    if not needs_rehash(stored):
        try:
            return check_password_hash(stored, password)
        except ValueError:
            return False
    return _verify_legacy(stored, password)


def _verify_legacy(stored: str, password: str) -> bool:
    try:
        _scheme, n, r, p, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    digest = hashlib.scrypt(
        password.encode(),
        salt=bytes.fromhex(salt_hex),
        n=int(n),
        r=int(r),
        p=int(p),
        dklen=len(digest_hex) // 2,
    )
    return hmac.compare_digest(digest.hex(), digest_hex)


def create_user(
    session: Session, *, username: str, password: str, role: Role = Role.USER, created_by: int | None = None
) -> User:
    """Create an account; refuses duplicates and short passwords."""
    username = username.strip()
    if not username or len(username) > 64:
        raise UserError("username must be 1-64 characters")
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password must be at least {MIN_PASSWORD} characters")
    if session.scalar(select(User).where(User.username == username)) is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=Role(role))
    session.add(user)
    session.flush()
    record_event(
        session,
        user_id=created_by,
        action="user.create",
        target=f"user:{user.id}",
        details={"username": username, "role": str(user.role)},
    )
    return user


def ensure_service_user(session: Session, *, username: str) -> User:
    """The account that owns batches arriving without a person (the DICOM receiver's); created if missing.

    Its password is random and never shown: nobody signs in as it unless an admin sets one (`cxr user`).
    """
    user = session.scalar(select(User).where(User.username == username.strip()))
    if user is None:
        user = create_user(session, username=username, password=secrets.token_urlsafe(32))
    return user


_DUMMY_HASH: list[str] = []


def _dummy_hash() -> str:
    """A hash of a random password made once per process: unknown users cost one verify, like known ones."""
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(hash_password(secrets.token_urlsafe(16)))
    return _DUMMY_HASH[0]


def authenticate(session: Session, *, username: str, password: str) -> User | None:
    """The active user with these credentials, or None; an old-format hash is upgraded (caller commits)."""
    user = session.scalar(select(User).where(User.username == username.strip()))
    if user is None or not user.is_active:
        # Exactly one verify against a hash of the same kind, so user names cannot be probed by timing
        # (hashing a dummy here as well made unknown names take two hashes' time).
        verify_password(_dummy_hash(), password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return user


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_api_token(session: Session, *, user: User) -> str:
    """Create or replace the user's API token; the plain token is returned once, only its hash kept."""
    token = "cxr_" + secrets.token_urlsafe(32)
    user.api_token_hash = _token_digest(token)
    record_event(session, user_id=user.id, action="user.api_token", target=f"user:{user.id}")
    return token


def user_for_token(session: Session, token: str) -> User | None:
    """The active user owning this API token, or None."""
    if not token:
        return None
    user = session.scalar(select(User).where(User.api_token_hash == _token_digest(token)))
    return user if user is not None and user.is_active else None


def ensure_admin(session: Session, *, username: str = "admin") -> tuple[User, str] | None:
    """Create a first admin with a one-time random password if no admin exists; returns it, else None."""
    if session.scalar(select(func.count()).select_from(User).where(User.role == Role.ADMIN)):
        return None
    password = secrets.token_urlsafe(12)
    user = create_user(session, username=username, password=password, role=Role.ADMIN)
    # The printed one-time password is changed at the first sign-in.
    user.must_change_password = True
    return user, password


def set_password(session: Session, *, user: User, password: str, changed_by: int | None = None) -> None:
    """Replace a user's password (clears a pending forced change); old sessions stop working."""
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password must be at least {MIN_PASSWORD} characters")
    user.password_hash = hash_password(password)
    user.must_change_password = False
    end_sessions(session, user=user)
    record_event(session, user_id=changed_by, action="user.password", target=f"user:{user.id}")


def change_own_password(session: Session, *, user: User, current: str, new: str) -> None:
    """A user replaces their own password; the current one must be right and the new one different."""
    if not verify_password(user.password_hash, current):
        raise UserError("the current password is wrong")
    if new == current:
        raise UserError("the new password must differ from the current one")
    set_password(session, user=user, password=new, changed_by=user.id)


def reset_password(session: Session, *, user: User, admin: User) -> str:
    """An admin resets a password: a random temporary one (returned once) that must be changed at sign-in.

    The user's sessions end at once (the session id carries a fingerprint of the hash).
    """
    temporary = secrets.token_urlsafe(12)
    user.password_hash = hash_password(temporary)
    user.must_change_password = True
    end_sessions(session, user=user)
    record_event(session, user_id=admin.id, action="user.password_reset", target=f"user:{user.id}")
    return temporary


def set_active(session: Session, *, user: User, active: bool, admin: User) -> None:
    """Disable or re-enable an account; a disabled user's sessions and API token stop working at once."""
    if user.id == admin.id and not active:
        raise UserError("you cannot disable your own account")
    if user.is_active == active:
        return
    user.is_active = active
    if not active:
        end_sessions(session, user=user)
    record_event(
        session,
        user_id=admin.id,
        action="user.enable" if active else "user.disable",
        target=f"user:{user.id}",
        details={"username": user.username},
    )


def get_user(session: Session, *, user_id: int) -> User | None:
    """One account by id, or None."""
    return session.get(User, user_id)


def list_users(session: Session) -> list[User]:
    """All accounts, oldest first."""
    return list(session.scalars(select(User).order_by(User.id)))


def end_sessions(session: Session, *, user: User) -> None:
    """Every session of this user issued so far ends at its next request (the caller commits)."""
    user.session_generation = (user.session_generation or 0) + 1


def revoke_api_token(session: Session, *, user: User) -> bool:
    """Remove the user's API token (it stops working at the next request); False when there was none."""
    if user.api_token_hash is None:
        return False
    user.api_token_hash = None
    record_event(session, user_id=user.id, action="user.api_token_revoke", target=f"user:{user.id}")
    return True
