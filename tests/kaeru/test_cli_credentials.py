"""``kaeru operators`` and ``kaeru keys``: secrets shown once, kept only as hashes, never
listed; clear failures; every change audited with the CLI's actor; ``kaeru api`` starts on
database keys alone."""

from __future__ import annotations

import hashlib
import re
import socket

from sqlalchemy import text
from typer.testing import Result

from kaeru.audit import cli_actor, entries
from kaeru.cli import api_key_problem
from kaeru.db import session
from tests.conftest import make_settings
from tests.support.cli import (  # noqa: F401 - clean_environment is a fixture
    assert_clear_failure,
    clean_environment,
    run_kaeru,
)


def kaeru(url: str, *args: str, **env: str) -> Result:
    return run_kaeru(list(args), {"KAERU_DATABASE_URL": url, **env}, columns=200)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.output


def rows(url: str, table: str) -> list[dict[str, object]]:
    with session(url) as s:
        return [dict(r._mapping) for r in s.execute(text(f"SELECT * FROM {table} ORDER BY id"))]  # noqa: S608


def test_keys_are_shown_once_kept_hashed_and_never_listed(database_url: str) -> None:
    made = ok(kaeru(database_url, "keys", "create", "backend-2026-12"))
    key = re.findall(r"kaeru_sk_[A-Za-z0-9_-]{43}", made)[0]
    browser = re.findall(
        r"kaeru_bk_[A-Za-z0-9_-]{43}", ok(kaeru(database_url, "keys", "create", "web", "--browser"))
    )[0]

    stored = rows(database_url, "write_keys")
    assert [(r["name"], r["kind"]) for r in stored] == [
        ("backend-2026-12", "server"),
        ("web", "browser"),
    ]
    assert stored[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert stored[1]["key_hash"] == hashlib.sha256(browser.encode()).hexdigest()
    for row, secret in zip(stored, (key, browser), strict=True):
        assert all(secret not in str(value) for value in row.values())
        assert row["prefix"] == secret[:16] and row["created_by"] == cli_actor()

    listed = ok(kaeru(database_url, "keys", "list"))
    assert "backend-2026-12" in listed and key[:16] in listed
    assert key not in listed and browser not in listed and key[16:] not in listed

    ok(kaeru(database_url, "keys", "revoke", "backend-2026-12"))
    assert rows(database_url, "write_keys")[0]["revoked_at"] is not None
    assert_clear_failure(
        kaeru(database_url, "keys", "revoke", "backend-2026-12"), "already revoked"
    )
    assert_clear_failure(
        kaeru(database_url, "keys", "revoke", "nope"), "no key 'nope'", "kaeru keys list"
    )
    assert_clear_failure(
        kaeru(database_url, "keys", "create", "backend-2026-12"), "already a key", "another name"
    )
    assert_clear_failure(kaeru(database_url, "keys", "create", "a b"), "not allowed")

    found = [(e.actor, e.action, e.target) for e in reversed(entries(database_url))]
    assert found == [
        (cli_actor(), "write_key.create", "backend-2026-12"),
        (cli_actor(), "write_key.create", "web"),
        (cli_actor(), "write_key.revoke", "backend-2026-12"),
    ]
    assert all(key not in str(e.detail) for e in entries(database_url))


def test_operators_are_added_listed_and_revoked(database_url: str) -> None:
    made = ok(kaeru(database_url, "operators", "add", "ann", "--role", "read-only"))
    token = re.findall(r"kaeru_op_[A-Za-z0-9_-]{43}", made)[0]
    ok(kaeru(database_url, "operators", "add", "bob", "--role", "operator"))

    stored = rows(database_url, "operators")
    assert [(r["name"], r["role"]) for r in stored] == [("ann", "read-only"), ("bob", "operator")]
    assert stored[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert all(token not in str(value) for value in stored[0].values())

    listed = ok(kaeru(database_url, "operators", "list"))
    assert "ann" in listed and "read-only" in listed and token not in listed

    assert_clear_failure(
        kaeru(database_url, "operators", "add", "eve", "--role", "admin"),
        "no role 'admin'",
        "--role read-only or --role operator",
    )
    assert_clear_failure(
        kaeru(database_url, "operators", "add", "ann", "--role", "operator"), "already an operator"
    )
    assert_clear_failure(
        kaeru(database_url, "operators", "add", "operator", "--role", "operator"),
        "KAERU_OPERATOR_TOKEN",
    )
    ok(kaeru(database_url, "operators", "revoke", "ann"))
    assert_clear_failure(kaeru(database_url, "operators", "revoke", "ann"), "already revoked")
    assert_clear_failure(kaeru(database_url, "operators", "revoke", "zed"), "no operator 'zed'")

    found = [(e.actor, e.action, e.target) for e in reversed(entries(database_url))]
    assert found == [
        (cli_actor(), "operator.add", "ann"),
        (cli_actor(), "operator.add", "bob"),
        (cli_actor(), "operator.revoke", "ann"),
    ]


def test_kaeru_api_needs_a_write_key_from_the_environment_or_the_database(
    sqlite_url: str,
) -> None:
    no_key = make_settings(sqlite_url, write_key=None)
    problem = api_key_problem(no_key)
    assert problem is not None
    assert "kaeru keys create" in problem and "KAERU_WRITE_KEY" in problem
    assert_clear_failure(
        kaeru(sqlite_url, "api", KAERU_OPERATOR_TOKEN="x" * 32), "no write key", "kaeru keys create"
    )

    # A browser key alone is not enough: the shop's server needs a server key.
    ok(kaeru(sqlite_url, "keys", "create", "web", "--browser"))
    assert api_key_problem(no_key) is not None
    ok(kaeru(sqlite_url, "keys", "create", "backend"))
    assert api_key_problem(no_key) is None
    # `kaeru api` itself gets past the key check: the port in use is then the one problem.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = kaeru(sqlite_url, "api", KAERU_API_PORT=str(port))
    assert_clear_failure(result, f"127.0.0.1:{port}", "KAERU_API_PORT")
    # With the key revoked there is none again.
    ok(kaeru(sqlite_url, "keys", "revoke", "backend"))
    assert api_key_problem(no_key) is not None
    # The environment's key still works on its own.
    assert api_key_problem(make_settings(sqlite_url, write_key="k" * 32)) is None
