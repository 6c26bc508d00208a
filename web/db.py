"""One SQLAlchemy session per request, opened lazily and closed at teardown."""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from config import Settings
from store.db import session_factory


def init_db(app: Flask, settings: Settings) -> None:
    """Bind a sessionmaker for settings.database_url to app and close the request session at teardown."""
    app.extensions["cxr_settings"] = settings

    @app.teardown_appcontext
    def _close_session(exc: BaseException | None) -> None:
        session: Session | None = g.pop("db", None)
        if session is not None:
            # Anything not explicitly committed by the view is discarded.
            session.rollback()
            session.close()


def get_db() -> Session:
    """This request's database session."""
    if "db" not in g:
        # Resolved per request, not at app creation: a server that forks after create_app must not share
        # its parent's connection pool (store.db.get_engine keys engines by process id).
        g.db = session_factory(get_settings().database_url)()
    return g.db


def get_settings() -> Settings:
    """The settings this app was created with."""
    return current_app.extensions["cxr_settings"]
