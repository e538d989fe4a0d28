"""``kaeru operators`` and ``kaeru keys``: operator accounts and write keys (kaeru/credentials.py).

A secret is printed once, when made; the database keeps only its SHA-256. Every change is
recorded in the audit log with the CLI's actor. A revoke reaches every API process within
KAERU_CREDENTIALS_CACHE_TTL seconds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from kaeru import audit, credentials
from kaeru.cli import console, database_problems, database_url_checked, fail, load_settings
from kaeru.credentials import ROLES, CredentialError, Role

operators_app = typer.Typer(
    help="Operator accounts of the admin API and the dashboard (roles read-only, operator).",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Write keys kept hashed in the database: several valid at once, each revocable.",
    no_args_is_help=True,
)


def say(text: str) -> None:
    console.print(text, soft_wrap=True, markup=False)


def _url() -> tuple[str, str]:
    return database_url_checked(load_settings())


def _when(at: datetime | None) -> str:
    return "" if at is None else f"{at:%Y-%m-%d %H:%M:%S} UTC"


@operators_app.command("add")
def operators_add(
    name: Annotated[str, typer.Argument(help="The account's name (the audit log shows it).")],
    role: Annotated[
        str, typer.Option(help=f"{' or '.join(ROLES)}: read-only may only read.")
    ] = "read-only",
) -> None:
    """Make an operator account and print its token (once: it is not kept)."""
    if role not in ROLES:
        fail(f"there is no role {role!r}", f"Use --role {' or --role '.join(ROLES)}.")
    checked: Role = "operator" if role == "operator" else "read-only"
    url, label = _url()
    with database_problems(label):
        try:
            account, token = credentials.add_operator(url, name, checked, audit.cli_actor())
        except CredentialError as exc:
            fail(str(exc))
    say(f"Operator {account.name} ({account.role}) added. Its token, shown only now:")
    say(token)
    say("Send it as `Authorization: Bearer <token>`, or sign in to /dashboard/login with it.")


@operators_app.command("list")
def operators_list() -> None:
    """Every operator account, revoked ones too (never a token)."""
    url, label = _url()
    with database_problems(label):
        found = credentials.operators(url)
    table = Table("name", "role", "created", "created by", "revoked")
    for a in found:
        table.add_row(a.name, a.role, _when(a.created_at), a.created_by, _when(a.revoked_at))
    console.print(table)
    if not found:
        say("No accounts yet: `kaeru operators add NAME --role operator` makes one.")


@operators_app.command("revoke")
def operators_revoke(name: Annotated[str, typer.Argument(help="The account's name.")]) -> None:
    """Revoke an account: its token and dashboard sign-ins stop working (within
    KAERU_CREDENTIALS_CACHE_TTL seconds in every API process)."""
    url, label = _url()
    with database_problems(label):
        try:
            credentials.revoke_operator(url, name, audit.cli_actor())
        except CredentialError as exc:
            fail(str(exc))
    say(f"Operator {name} revoked.")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="The key's name, e.g. shop-backend-2026-12.")],
    browser: Annotated[
        bool, typer.Option("--browser", help="A browser key (public, limited) instead.")
    ] = False,
) -> None:
    """Make a write key and print it (once: only its hash is kept)."""
    url, label = _url()
    with database_problems(label):
        try:
            row, key = credentials.create_key(
                url, name, "browser" if browser else "server", audit.cli_actor()
            )
        except CredentialError as exc:
            fail(str(exc))
    say(f"Write key {row.name} ({row.kind}) created. The key, shown only now:")
    say(key)
    say("Send it as the HTTP Basic auth user name (or writeKey); it works at once.")


@keys_app.command("list")
def keys_list() -> None:
    """Every managed write key by name and prefix, revoked ones too (never the key)."""
    url, label = _url()
    with database_problems(label):
        found = credentials.keys(url)
    table = Table("name", "kind", "prefix", "created", "created by", "revoked")
    for k in found:
        table.add_row(
            k.name, k.kind, f"{k.prefix}…", _when(k.created_at), k.created_by, _when(k.revoked_at)
        )
    console.print(table)
    if not found:
        say("No managed keys yet: `kaeru keys create NAME` makes one.")


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a write key: refused (401) within KAERU_CREDENTIALS_CACHE_TTL seconds."""
    url, label = _url()
    with database_problems(label):
        try:
            credentials.revoke_key(url, name, audit.cli_actor())
        except CredentialError as exc:
            fail(str(exc))
    say(f"Write key {name} revoked.")
