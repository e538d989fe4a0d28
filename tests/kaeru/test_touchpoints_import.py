"""``kaeru touchpoints import FILE``: offline purchases, visits and contacts from a CSV file, each
row once however often the file is imported, a bad file stored not at all; through typer's
runner, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import col, select
from typer.testing import CliRunner, Result

from kaeru.cli import app as cli
from kaeru.db import session, write_session
from kaeru.models import Event, Order, Touchpoint, utcnow
from kaeru.settings import Settings

runner = CliRunner()
HEADER = "customer_id,kind,occurred_at,channel,order_id,value,currency,coupon_code,key"


def import_file(url: str, path: Path, **env: str) -> Result:
    return runner.invoke(
        cli, ["touchpoints", "import", str(path)], env={"KAERU_DATABASE_URL": url, **env}
    )


def written(tmp_path: Path, *lines: str, name: str = "touches.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stored(url: str) -> tuple[list[Touchpoint], list[Event], list[Order]]:
    with session(url) as s:
        return (
            list(s.exec(select(Touchpoint).order_by(col(Touchpoint.id)))),
            list(s.exec(select(Event).order_by(col(Event.seq)))),
            list(s.exec(select(Order))),
        )


def test_each_row_is_one_touch_and_a_purchase_an_order_event_for_the_journeys(
    database_url: str, tmp_path: Path
) -> None:
    path = written(
        tmp_path,
        # Columns in another order than documented, and a spreadsheet's upper-case cells.
        "kind,customer_id,occurred_at,channel,order_id,value,currency,coupon_code,key",
        "purchase,u1,2026-11-30T15:04:00+09:00,POS,store-881,19.99,usd,SPRING,",
        "visit,u1,2026-11-29T10:00:00Z,store,,,,,",
        "contact,u2,2026-11-28T08:30:00+01:00,call-centre,,,,,crm-4411",
        "",
    )
    first = import_file(database_url, path)
    assert first.exit_code == 0, first.output
    assert "1 purchase(s) and 2 visit(s) or contact(s); 0 already" in first.output

    touches, events, orders = stored(database_url)
    purchase, visit, contact = touches
    assert (purchase.kind, purchase.customer_id, purchase.order_id, purchase.value_minor) == (
        "purchase",
        "u1",
        "store-881",
        1999,
    )
    assert (purchase.currency, purchase.coupon_code) == ("USD", "SPRING")
    assert (purchase.channel, purchase.detail["offline"]) == ("pos", True)
    assert purchase.occurred_at == datetime(2026, 11, 30, 6, 4, tzinfo=UTC)
    assert (visit.kind, visit.channel, visit.occurred_at) == (
        "visit",
        "store",
        datetime(2026, 11, 29, 10, tzinfo=UTC),
    )
    assert (contact.kind, contact.customer_id, contact.channel, contact.key) == (
        "contact",
        "u2",
        "call-centre",
        "import/crm-4411",
    )
    assert all(t.journey_id is None and t.value_minor is None for t in (visit, contact))
    # The purchase waits in the outbox for the router, as one the API stored would.
    [event] = events
    assert (event.name, event.customer_id, event.routed_at) == ("Order Completed", "u1", None)
    assert event.payload["context"] == {"channel": "pos"}
    assert [(o.order_id, o.total_minor, o.currency) for o in orders] == [("store-881", 1999, "USD")]

    again = import_file(database_url, path)
    assert again.exit_code == 0, again.output
    assert "0 purchase(s) and 0 visit(s) or contact(s); 3 already imported before" in again.output
    assert [len(rows) for rows in stored(database_url)] == [3, 1, 1]


def test_a_bad_file_names_each_bad_line_with_its_fix_and_stores_nothing(
    database_url: str, tmp_path: Path
) -> None:
    soon = (utcnow() + timedelta(days=2)).isoformat()
    path = written(
        tmp_path,
        HEADER,
        "u1,visit,2026-11-29T10:00:00Z,store,,,,,",  # line 2: good
        "u1,visit,2026-11-29 10:00,store,,,,,",
        "u1,walk-by,2026-11-29T10:00:00Z,store,,,,,",
        "u1,visit,2026-11-29T10:00:00Z,web,,,,,",
        "u1,purchase,2026-11-29T10:00:00Z,pos,,19.99,USD,,",
        "u1,visit,2026-11-29T10:00:00Z,store,,5.00,USD,,",
        "u1,purchase,2026-11-29T10:00:00Z,pos,o-1,19.999,USD,,",
        "u1,purchase,2026-11-29T10:00:00Z,pos,o-1,19.99,dollars,,",
        ",visit,2026-11-29T10:00:00Z,store,,,,,",
        "u1,visit,2026-11-29T10:00:00Z,store,,,,,",
        f"u1,visit,{soon},store,,,,,",
        "u1,visit,2026-11-29T10:00:00Z,store,,,,,,one too many",
    )
    result = import_file(database_url, path)
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    for expected in (
        "line 3: occurred_at '2026-11-29 10:00' has no time zone",
        "e.g. 2026-11-30T15:04:00+09:00",
        "line 4: kind 'walk-by' is not one of purchase, visit, contact",
        "line 5: channel 'web' is not a store channel: give one of call-centre, pos, store, "
        "or add it to KAERU_OFFLINE_CHANNELS",
        "line 6: a purchase needs its order_id",
        "line 7: a visit has no value, currency: leave those cells empty",
        "line 8: value '19.999' has more decimals than USD has (2)",
        "line 9: currency 'dollars' is not an ISO 4217 code",
        "line 10: customer_id must be the shop's customer id",
        "line 11: the same touch as line 2",
        "line 12: occurred_at",
        "is in the future",
        "line 13: more cells than the header's 9 columns",
        "has 11 bad line(s): nothing was imported",
    ):
        assert expected in out, expected
    assert "Traceback" not in result.output
    assert [len(rows) for rows in stored(database_url)] == [0, 0, 0]


def test_a_store_order_id_of_another_customers_order_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    """Order ids are one per order: a till's 1001 stored over an online order 1001 of someone
    else would be taken for that order, and its purchase lost to the reports."""
    with write_session(database_url) as s:
        s.add(Order(order_id="1001", customer_id="online-ann", total_minor=500, currency="USD"))
    path = written(
        tmp_path,
        HEADER,
        "bob,purchase,2026-11-29T10:00:00Z,pos,1001,19.99,USD,,",
    )
    result = import_file(database_url, path)
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "line 2: order_id '1001' is already an order of another customer" in out
    assert "pos-1001" in out and "1 bad line(s)" in out
    assert [len(rows) for rows in stored(database_url)] == [0, 0, 1]
    # The same order of its own customer (a till's copy of it) is no problem.
    own = written(
        tmp_path, HEADER, "online-ann,purchase,2026-11-29T10:00:00Z,pos,1001,5.00,USD,,", name="o"
    )
    assert import_file(database_url, own).exit_code == 0


def test_a_wrong_header_or_encoding_is_said_with_the_fix(database_url: str, tmp_path: Path) -> None:
    typo = written(tmp_path, "custmer_id,kind,occurred_at,channel", "u1,visit,2026-11-29Z,store")
    result = import_file(database_url, typo)
    out = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "line 1: unknown column(s) 'custmer_id' and missing column(s) customer_id" in out
    assert f"e.g. {HEADER}" in out

    twice = written(tmp_path, f"{HEADER},kind", "u1,visit,2026-11-29Z,store,,,,,,x", name="2.csv")
    assert "line 1: column(s) kind named twice" in import_file(database_url, twice).output

    empty = written(tmp_path, "", name="empty.csv")
    assert "the file is empty" in import_file(database_url, empty).output

    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"{HEADER}\nJos\xe9,visit,2026-11-29T10:00Z,store,,,,,\n".encode("latin-1"))
    bad = import_file(database_url, latin)
    assert bad.exit_code == 1 and "is not UTF-8 text" in bad.output

    # Another shop's store channels.
    shop = written(tmp_path, HEADER, "u1,visit,2026-11-29T10:00:00Z,kiosk,,,,,", name="k.csv")
    assert import_file(database_url, shop).exit_code == 1
    ok = import_file(database_url, shop, KAERU_OFFLINE_CHANNELS="kiosk,pos")
    assert ok.exit_code == 0, ok.output
    [touch] = stored(database_url)[0]
    assert (touch.kind, touch.channel) == ("visit", "kiosk")


def test_a_store_channel_that_is_no_channel_name_is_refused_with_an_example() -> None:
    with pytest.raises(ValidationError, match=r"'Store Front' is not a channel name.*pos,store"):
        Settings(_env_file=None, offline_channels="pos, Store Front")
    assert Settings(_env_file=None, offline_channels=" pos,,kiosk ").offline_channel_set == {
        "pos",
        "kiosk",
    }


def test_the_example_file_imports(database_url: str) -> None:
    example = Path(__file__).parents[2] / "examples" / "store-touchpoints.csv"
    result = import_file(database_url, example)
    assert result.exit_code == 0, result.output
    assert "2 purchase(s) and 2 visit(s) or contact(s)" in result.output
    touches = stored(database_url)[0]
    assert sorted((t.kind, t.channel, t.value_minor, t.currency) for t in touches) == [
        ("contact", "call-centre", None, None),
        ("purchase", "pos", 2480, "JPY"),
        ("purchase", "pos", 3600, "USD"),
        ("visit", "store", None, None),
    ]
