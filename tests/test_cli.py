"""The ``kaeru`` command: expected problems are one clear line and a non-zero exit."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect
from typer.testing import CliRunner, Result

from kaeru.cli import app
from kaeru.db import get_engine, session
from kaeru.models import AudienceMember
from kaeru.settings import Settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KAERU_ variable or .env of the developer's leaks in; .kaeru/ lands in tmp_path."""
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def kaeru(*args: str, **env: str) -> Result:
    return runner.invoke(app, list(args), env=env)


def assert_clear_failure(result: Result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.stderr


def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cli.db'}"


def test_a_bad_setting_names_the_variable_and_the_fix(tmp_path: Path) -> None:
    result = kaeru("migrate", KAERU_CART_EMAIL_DELAY="abc")

    assert_clear_failure(result, "KAERU_CART_EMAIL_DELAY='abc' is not valid", "P1D")
    assert not (tmp_path / ".kaeru").exists()


def test_a_bad_setting_in_dotenv_is_reported_the_same_way(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("KAERU_CART_COUPON_CURRENCY=dollars\n")

    result = kaeru("audience")

    assert_clear_failure(result, "KAERU_CART_COUPON_CURRENCY='dollars'", "ISO 4217")


def test_migrate_creates_the_database(tmp_path: Path) -> None:
    url = database_url(tmp_path)

    result = kaeru("migrate", KAERU_DATABASE_URL=url)

    assert result.exit_code == 0, result.output
    assert "up to date" in result.stdout
    assert {"events", "audience_members", "customers"} <= set(
        inspect(get_engine(url)).get_table_names()
    )
    again = kaeru("migrate", KAERU_DATABASE_URL=url)
    assert again.exit_code == 0, again.output


def test_migrate_defaults_to_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    result = kaeru("migrate")

    assert result.exit_code == 0, result.output
    assert (tmp_path / ".kaeru" / "kaeru.db").exists()


def test_audience_on_an_empty_database(tmp_path: Path) -> None:
    url = database_url(tmp_path)
    assert kaeru("migrate", KAERU_DATABASE_URL=url).exit_code == 0

    one = kaeru("audience", "cart-retargeting", KAERU_DATABASE_URL=url)
    every = kaeru("audience", KAERU_DATABASE_URL=url)

    assert one.exit_code == 0, one.output
    assert "No one is in 'cart-retargeting'" in one.stdout
    assert every.exit_code == 0, every.output
    assert "No local audience has members yet" in every.stdout


def test_audience_lists_its_members(tmp_path: Path) -> None:
    url = database_url(tmp_path)
    assert kaeru("migrate", KAERU_DATABASE_URL=url).exit_code == 0
    with session(url) as s:
        s.add(
            AudienceMember(
                audience="cart-retargeting",
                customer_id="alice",
                email_sha256="0" * 64,
                journey_id="cart-abandonment-alice",
                added_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
            )
        )

    one = kaeru("audience", "cart-retargeting", KAERU_DATABASE_URL=url)
    every = kaeru("audience", KAERU_DATABASE_URL=url)

    assert one.exit_code == 0, one.output
    assert "alice" in one.stdout and "cart-abandonment-alice" in one.stdout
    assert "2024-05-01 12:00:00" in one.stdout
    assert "cart-retargeting" in every.stdout and "1" in every.stdout


def test_audience_without_a_database_says_to_migrate(tmp_path: Path) -> None:
    result = kaeru("audience", "x", KAERU_DATABASE_URL=database_url(tmp_path))

    assert_clear_failure(result, "kaeru migrate")
    assert not (tmp_path / "cli.db").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_setup_with_temporal_unreachable_says_which_setting(tmp_path: Path) -> None:
    address = f"127.0.0.1:{closed_port()}"

    result = kaeru("setup", KAERU_TEMPORAL_ADDRESS=address)

    assert_clear_failure(result, f"cannot reach Temporal at {address}", "KAERU_TEMPORAL_ADDRESS")


def test_dev_with_the_api_port_taken_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = kaeru("dev", KAERU_API_PORT=str(port))

    assert_clear_failure(result, f"127.0.0.1:{port}", "KAERU_API_PORT")


def test_api_without_a_write_key_says_to_set_one() -> None:
    assert_clear_failure(kaeru("api"), "KAERU_WRITE_KEY")


def test_settings_table_lists_every_setting() -> None:
    result = kaeru("settings-table")

    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| Variable | Default | Meaning |"
    for field in Settings.model_fields:
        assert f"| `KAERU_{field.upper()}` |" in result.stdout
    assert len(lines) == 2 + len(Settings.model_fields)
    assert "| `KAERU_CART_EMAIL_DELAY` | `86400` (1 day) |" in result.stdout


def test_a_malformed_database_url_is_named() -> None:
    result = kaeru("migrate", KAERU_DATABASE_URL="nonsense")

    assert_clear_failure(result, "KAERU_DATABASE_URL=nonsense is not a database URL")
