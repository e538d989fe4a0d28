"""The ``kaeru`` command: expected problems are one clear line and a non-zero exit."""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect
from sqlmodel import select
from typer.testing import CliRunner, Result

from kaeru.cli import app
from kaeru.db import get_engine, session
from kaeru.journeys import discover, setting_infos
from kaeru.models import AudienceMember, Event
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
    journeys = [item for j in discover() for item in setting_infos(j)]
    shared = {f"KAERU_{field.upper()}" for field in Settings.model_fields}
    for item in journeys:
        assert f"| `{item.variable}` |" in result.stdout
    extra = [item for item in journeys if item.variable not in shared]
    assert len(lines) == 2 + len(Settings.model_fields) + len(extra)
    assert "| `KAERU_CART_ENABLED` | true |" in result.stdout
    assert "| `KAERU_CART_EMAIL_DELAY` | `86400` (1 day) |" in result.stdout


def test_the_readme_shows_the_settings_table_of_the_code() -> None:
    """The README's table is `kaeru settings-table` verbatim: a new setting updates both."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert kaeru("settings-table").stdout.strip() in readme


def test_a_malformed_database_url_is_named() -> None:
    result = kaeru("migrate", KAERU_DATABASE_URL="nonsense")

    assert_clear_failure(result, "KAERU_DATABASE_URL=nonsense is not a database URL")


# ---- kaeru events ------------------------------------------------------------------------------


def park(url: str, *message_ids: str) -> list[int]:
    """Store one parked event per message id (as the router leaves them); their seqs."""
    with session(url) as s:
        stored = [
            Event(
                message_id=message_id,
                customer_id=f"customer-{message_id}",
                type="track",
                name="Product Added",
                payload={},
                route_attempts=10,
                route_error="RPCError: refused",
                parked_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
                park_reason="RPCError: search attribute value size 2054 exceeds size limit 2048",
            )
            for message_id in message_ids
        ]
        s.add_all(stored)
        s.flush()
        return [e.seq for e in stored if e.seq is not None]


def test_events_parked_lists_them_and_retry_and_drop_act_on_them(tmp_path: Path) -> None:
    url = database_url(tmp_path)
    assert kaeru("migrate", KAERU_DATABASE_URL=url).exit_code == 0
    assert "No event is parked" in kaeru("events", "parked", KAERU_DATABASE_URL=url).stdout
    first, second, third = park(url, "m-1", "m-2", "m-3")

    listed = kaeru("events", "parked", KAERU_DATABASE_URL=url)

    assert listed.exit_code == 0, listed.output
    assert "customer-m-1" in listed.stdout and "exceeds size limit" in listed.stdout
    assert "3 parked" in listed.stdout
    retried = kaeru("events", "retry", str(first), str(second), KAERU_DATABASE_URL=url)
    assert retried.exit_code == 0, retried.output
    dropped = kaeru("events", "drop", str(third), KAERU_DATABASE_URL=url)
    assert dropped.exit_code == 0, dropped.output
    with session(url) as s:
        rows = {e.seq: e for e in s.exec(select(Event)).all()}
    assert rows[first].parked_at is None and rows[first].route_attempts == 0
    assert rows[first].retried_at is not None and rows[first].routed_at is None
    assert rows[third].dropped_at is not None and rows[third].routed_at is None
    assert "No event is parked" in kaeru("events", "parked", KAERU_DATABASE_URL=url).stdout


def test_events_retry_of_an_unknown_seq_changes_nothing_and_says_how_to_list(
    tmp_path: Path,
) -> None:
    url = database_url(tmp_path)
    assert kaeru("migrate", KAERU_DATABASE_URL=url).exit_code == 0
    (seq,) = park(url, "m-1")

    result = kaeru("events", "retry", str(seq), "999", KAERU_DATABASE_URL=url)

    assert_clear_failure(result, "no parked event has seq 999", "kaeru events parked")
    assert_clear_failure(kaeru("events", "drop", "999", KAERU_DATABASE_URL=url), "seq 999")
    with session(url) as s:
        (stored,) = s.exec(select(Event)).all()
    assert stored.parked_at is not None and stored.dropped_at is None


def test_events_without_a_database_says_to_migrate(tmp_path: Path) -> None:
    result = kaeru("events", "parked", KAERU_DATABASE_URL=database_url(tmp_path))

    assert_clear_failure(result, "kaeru migrate")


def test_routing_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAERU_MAX_START_EVENT_AGE", "3600")
    monkeypatch.setenv("KAERU_ROUTE_MAX_ATTEMPTS", "4")
    settings = Settings(_env_file=None)
    assert settings.max_start_event_age == timedelta(hours=1)
    assert settings.route_max_attempts == 4
    monkeypatch.setenv("KAERU_MAX_START_EVENT_AGE", "P2D")
    assert Settings(_env_file=None).max_start_event_age == timedelta(days=2)
    result = kaeru("migrate", KAERU_ROUTE_MAX_ATTEMPTS="0")
    assert_clear_failure(result, "KAERU_ROUTE_MAX_ATTEMPTS='0' is not valid")
    table = kaeru("settings-table").stdout
    assert "`KAERU_ROUTE_MAX_ATTEMPTS` | `10`" in table
    assert "`KAERU_MAX_START_EVENT_AGE` | `604800` (7 days)" in table
