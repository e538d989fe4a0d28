from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kaeru.audit import cli_actor, entries, record


def test_entries_are_newest_first_and_filter(database_url: str) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    record(database_url, "ann", "journey.cancel", "cart-c-1", {"reason": "test"})
    record(database_url, "bob", "write_key.revoke", "wk_1")
    record(database_url, "ann", "journey.pause", "cart-c-2")

    assert [e.action for e in entries(database_url)] == [
        "journey.pause",
        "write_key.revoke",
        "journey.cancel",
    ]
    assert [e.target for e in entries(database_url, action="journey.")] == ["cart-c-2", "cart-c-1"]
    assert [e.action for e in entries(database_url, action="journey.pause")] == ["journey.pause"]
    [bobs] = entries(database_url, actor="bob")
    assert bobs.target == "wk_1" and bobs.detail == {} and bobs.at >= start
    assert entries(database_url, since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert entries(database_url, limit=1)[0].action == "journey.pause"


def test_the_cli_actor_names_the_os_user() -> None:
    assert cli_actor().startswith("cli:") and len(cli_actor()) > 4
