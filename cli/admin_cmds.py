"""`cxr db ...` and `cxr user ...`: thin wrappers over store/."""

from __future__ import annotations

import click

from config import load_settings
from store import migrate
from store.db import session_scope
from store.tables import Role
from store.users import UserError, create_user, ensure_admin, issue_api_token, list_users


@click.group("db")
def db_group() -> None:
    """Database schema commands."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    migrate.upgrade(load_settings().database_url, revision)
    click.echo(f"database at {revision}")


@db_group.command("downgrade")
@click.option("--revision", default="base", show_default=True)
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION."""
    migrate.downgrade(load_settings().database_url, revision)
    click.echo(f"database at {revision}")


@click.group("user")
def user_group() -> None:
    """Account commands (accounts are created by an admin)."""


@user_group.command("create")
@click.argument("username")
@click.option(
    "--role", type=click.Choice([r.value for r in Role]), default=Role.USER.value, show_default=True
)
@click.password_option(prompt="Password (10 characters or more)")
def user_create(username: str, role: str, password: str) -> None:
    """Create an account."""
    try:
        with session_scope(load_settings().database_url) as session:
            user = create_user(session, username=username, password=password, role=Role(role))
            click.echo(f"created {user.role.value} {user.username!r} (id {user.id})")
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc


@user_group.command("ensure-admin")
def user_ensure_admin() -> None:
    """Create the first admin with a one-time password if there is no admin yet."""
    with session_scope(load_settings().database_url) as session:
        created = ensure_admin(session)
        if created is None:
            click.echo("an admin account already exists")
        else:
            user, password = created
            click.echo(f"created admin {user.username!r}; one-time password: {password}")


@user_group.command("token")
@click.argument("username")
def user_token(username: str) -> None:
    """Issue a new API token for USERNAME (replaces the old one) and print it once."""
    with session_scope(load_settings().database_url) as session:
        user = next((u for u in list_users(session) if u.username == username), None)
        if user is None:
            raise click.ClickException(f"no user {username!r}")
        click.echo(issue_api_token(session, user=user))


@user_group.command("list")
def user_list() -> None:
    """List accounts."""
    with session_scope(load_settings().database_url) as session:
        for u in list_users(session):
            click.echo(f"{u.id}\t{u.username}\t{u.role.value}\t{'active' if u.is_active else 'disabled'}")
