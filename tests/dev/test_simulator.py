"""``kaeru simulate``: each test runs the real simulator (time-skipping server, real worker
activities, loopback SMTP, throwaway SQLite) on a timeline, as a developer would."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kaeru.cli import app
from kaeru.dev.simulator import Simulation, simulate

EXAMPLE = Path(__file__).parents[2] / "examples" / "timelines" / "cart-purchase.yaml"
runner = CliRunner()


@pytest.fixture(autouse=True)
def no_local_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The journey's waits are the defaults, not a developer's .env or KAERU_* variables."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)


def timeline(tmp_path: Path, text: str, name: str = "timeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, ["simulate", *map(str, args)])


async def test_purchase_after_the_email(tmp_path: Path) -> None:
    """The shipped example: the reminder goes out a day after the cart, the open puts Ada in
    the ad audience a day later, her order ends the journey and takes her out of it."""
    result = await simulate("cart-abandonment", EXAMPLE, tmp_path / "out")
    assert [(m.step, f"{m.at:%a %H:%M}") for m in result.messages] == [("cart_email", "Tue 10:00")]
    assert "Linen dress" in result.messages[0].subject
    assert (result.outcome, result.last_step) == ("purchased", "ad_audience")
    assert [line.split("  ", 1)[0] for line in result.audience] == [
        "Wed 2026-03-04 18:00",  # a day after the open (Tuesday 18:00)
        "Fri 2026-03-06 16:00",  # the order
    ]
    assert "added the shopper" in result.audience[0]
    assert "removed the shopper" in result.audience[1]
    html, text = result.messages[0].files
    assert html.name == "01-cart_email.html" and html.parent == tmp_path / "out"
    assert "Linen dress" in html.read_text() and "89.00 EUR" in text.read_text()
    assert any("journey ended: purchased" in line for line in result.story)


async def test_open_ad_click_coupon_then_ignored(tmp_path: Path) -> None:
    """The shipped coupon example: open → ad audience → ad click → coupon email → no order."""
    path = EXAMPLE.with_name("cart-coupon.yaml")
    result = await simulate("cart-abandonment", path, tmp_path / "out")
    sent = [(m.step, f"{m.at:%a %H:%M}") for m in result.messages]
    assert sent == [("cart_email", "Tue 10:00"), ("offer_email", "Fri 09:00")]
    assert (result.outcome, result.last_step) == ("offer_ignored", "offer_email")
    coupon = next(
        m.group(1) for line in result.story if (m := re.search(r"issued coupon (\S+)", line))
    )
    assert coupon in result.messages[1].text
    assert len(result.audience) == 2 and "removed" in result.audience[1]


async def test_json_timeline_not_opened(tmp_path: Path) -> None:
    path = timeline(
        tmp_path,
        """{"customer": {"id": "cy", "email": "cy@example.com"},
 "start": "2026-03-02T10:00:00Z",
 "events": [{"at": "+2h", "track": "Product Added",
             "properties": {"product_id": "belt-1", "name": "Leather belt", "price": 20}}]}""",
        "timeline.json",
    )
    result: Simulation = await simulate("cart-abandonment", path, tmp_path / "out")
    assert [(m.step, f"{m.at:%a %H:%M}") for m in result.messages] == [("cart_email", "Tue 12:00")]
    assert result.outcome == "not_opened"
    assert result.audience == []


async def test_quiet_hours_read_the_timelines_clock(tmp_path: Path) -> None:
    """A cart left at 23:00 in Tokyo: the reminder a day later falls in the customer's quiet
    hours (the defaults, 21:00-08:00 local), and goes at 08:00 their time, whatever the real
    clock says while the preview runs."""
    path = timeline(
        tmp_path,
        """{"customer": {"id": "yu", "email": "yu@example.com"},
 "start": "2026-03-02T13:00:00Z",
 "events": [{"at": "+1m", "identify": {"timezone": "Asia/Tokyo"}},
            {"at": "+1h", "track": "Product Added",
             "properties": {"product_id": "belt-1", "name": "Leather belt", "price": 20}}]}""",
        "timeline.json",
    )
    result: Simulation = await simulate("cart-abandonment", path, tmp_path / "out")
    # Added Mon 14:01 UTC (23:01 in Tokyo); due Tue 14:01 UTC, quiet until 08:00 Wed in Tokyo.
    assert [(m.step, f"{m.at:%a %H:%M}") for m in result.messages] == [("cart_email", "Tue 23:00")]


def test_the_cli_prints_what_the_customer_receives(tmp_path: Path) -> None:
    out = tmp_path / "out"
    printed = invoke("cart-abandonment", EXAMPLE, "--out", out)
    assert printed.exit_code == 0, printed.output
    assert "Tue 2026-03-03 10:00  cart_email: Still thinking about Linen dress?" in printed.output
    assert "Journey ended: purchased (last step ad_audience)" in printed.output
    assert f"Emails saved in {out}" in printed.output
    assert (out / "01-cart_email.html").exists()


GOOD_START = """customer: {id: ada, email: ada@example.com}
start: 2026-03-02T09:00:00Z
events:
  - at: Monday 10:00
    track: Product Added
    properties: {product_id: dress-1, name: Linen dress, price: 89}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD_START + "  - at: Funday 10:00\n    open: cart_email\n",
            "line 7: 'Funday 10:00' is not a time",
        ),
        (
            GOOD_START + "  - at: +1d\n    trak: Product Added\n",
            "line 8: unknown key 'trak' in an event",
        ),
        (
            GOOD_START + "  - at: +1d\n    open: cart_email\n    track: Order Completed\n",
            "line 7: an event needs exactly one of",
        ),
        (
            GOOD_START + "  - at: 2026-03-01T10:00:00Z\n    track: Cart Viewed\n",
            "line 7: Sun 2026-03-01 10:00 is before the previous line's time",
        ),
        (GOOD_START + "  - at: +1d\n    track: [Order\n", "line 9: not valid YAML"),
        (
            GOOD_START.replace("start: 2026-03-02T09:00:00Z", "start: soon"),
            "line 2: start must be an ISO 8601 time",
        ),
        (GOOD_START + "colour: blue\n", "line 7: unknown key 'colour' in the timeline"),
        # Found only when played: the offer email is not sent by Tuesday noon.
        (
            GOOD_START + "  - at: Tuesday 12:00\n    open: offer_email\n",
            "line 7: the customer has no 'offer_email' email to open at Tue 2026-03-03 12:00 "
            "(it received: cart_email)",
        ),
    ],
)
def test_bad_timelines_name_the_line_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    printed = invoke("cart-abandonment", timeline(tmp_path, text))
    assert printed.exit_code == 2, printed.output
    assert message in " ".join(printed.output.split()), printed.output
    assert "Traceback" not in printed.output


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.yaml", GOOD_START.replace("Monday 10:00", "10:00"), "line 4: '10:00' is not a time"),
        (
            "t.yaml",
            GOOD_START.replace("ada@example.com", "not-an-address"),
            "line 1: ingestion refuses this event: traits.email is not an email address",
        ),
        (
            "t.json",
            '{"customer": {"id": "x"},\n\t"start": "2026-03-02T09:00:00Z",\n'
            '\t"events": [{"at": "+1h", "track": "Product Added"}\n\t{"at": "+1h"}]}',
            "line 4: not valid JSON (Expecting ',' delimiter)",
        ),
        (
            "t.json",
            '{"customer": {"id": "x"},\n\t"start": "2026-03-02T09:00:00Z",\n'
            '\t"events": [{"at": "+1h", "track": "Product Added"},\n\t{"at": "+1h"}]}',
            "line 4: an event needs exactly one of track, identify, open, click, ad_click",
        ),
    ],
)
def test_bad_lines_are_named_as_written(tmp_path: Path, name: str, text: str, message: str) -> None:
    printed = invoke("cart-abandonment", timeline(tmp_path, text, name))
    assert printed.exit_code == 2, printed.output
    assert message in " ".join(printed.output.split()), printed.output


def test_unknown_journey_lists_the_known_ones(tmp_path: Path) -> None:
    printed = invoke("welcom", timeline(tmp_path, GOOD_START))
    assert printed.exit_code == 2
    said = " ".join(printed.output.split())
    assert "no journey named 'welcom': the known journeys are " in said
    for kind in ("browse-abandonment", "cart-abandonment", "order-confirmation", "welcome"):
        assert kind in said


def test_a_timeline_that_never_starts_the_journey(tmp_path: Path) -> None:
    text = GOOD_START.replace("track: Product Added", "track: Product Viewed")
    printed = invoke("cart-abandonment", timeline(tmp_path, text))
    assert printed.exit_code == 2
    assert "never starts the cart-abandonment journey" in " ".join(printed.output.split())
    assert "Product Added" in printed.output


def test_a_bad_setting_is_named_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "tomorrow")
    printed = invoke("cart-abandonment", EXAMPLE)
    assert printed.exit_code == 1
    assert "KAERU_CART_EMAIL_DELAY='tomorrow' is not valid" in printed.output
    assert "Traceback" not in printed.output


async def test_the_configured_waits_shape_the_preview(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marketer previews the journey as configured: KAERU_CART_EMAIL_DELAY moves the email."""
    monkeypatch.setenv("KAERU_CART_EMAIL_DELAY", "PT2H")
    result = await simulate("cart-abandonment", EXAMPLE, tmp_path / "out")
    assert [(m.step, f"{m.at:%a %H:%M}") for m in result.messages] == [("cart_email", "Mon 12:00")]


async def test_a_click_in_the_email_reaches_the_journey(tmp_path: Path) -> None:
    """A click (through the email's own tracking link) counts as engagement, as an open does."""
    text = GOOD_START + "  - at: Tuesday 12:00\n    click: cart_email\n    link: 1\n"
    result = await simulate("cart-abandonment", timeline(tmp_path, text), tmp_path / "out")
    assert result.outcome == "ad_not_clicked"
    assert result.audience[0].startswith("Wed 2026-03-04 12:00  added the shopper")


async def test_a_customer_whose_id_is_their_email_address(tmp_path: Path) -> None:
    """As the router does, the simulator runs the journey under the id's pseudonym
    (``KAERU_PSEUDONYMOUS_IDS=auto``): the email's own tracking link still reaches it."""
    text = GOOD_START.replace("id: ada,", "id: ada@example.com,")
    text += "  - at: Tuesday 12:00\n    click: cart_email\n    link: 1\n"
    result = await simulate("cart-abandonment", timeline(tmp_path, text), tmp_path / "out")
    assert result.outcome == "ad_not_clicked"
    assert result.audience[0].startswith("Wed 2026-03-04 12:00  added the shopper")


async def test_welcome_series_from_the_sign_up(tmp_path: Path) -> None:
    """The shipped welcome example: the customer's identify (it sets the email) starts the
    series; welcome at once, the shop's best-sellers (its shop_orders) on day 3, the coupon on
    day 7, then the coupon's wait runs out."""
    result = await simulate("welcome", EXAMPLE.with_name("welcome.yaml"), tmp_path / "out")
    sent = [(m.step, f"{m.at:%a %m-%d %H:%M}") for m in result.messages]
    assert sent == [
        ("welcome_email", "Mon 03-02 09:00"),
        ("bestsellers_email", "Thu 03-05 09:00"),
        ("offer_email", "Mon 03-09 09:00"),
    ]
    assert "Linen dress" in result.messages[1].text  # the most ordered of the shop_orders
    coupon = next(
        m.group(1) for line in result.story if (m := re.search(r"issued coupon (\S+)", line))
    )
    assert coupon in result.messages[2].subject
    assert (result.outcome, result.last_step) == ("offer_ignored", "offer_email")
    assert result.audience == []


async def test_order_confirmation_at_once(tmp_path: Path) -> None:
    """The shipped order example: the confirmation goes out the minute the order comes in."""
    path = EXAMPLE.with_name("order-confirmation.yaml")
    result = await simulate("order-confirmation", path, tmp_path / "out")
    assert [(m.step, f"{m.at:%a %H:%M}") for m in result.messages] == [
        ("confirmation_email", "Wed 14:30")
    ]
    assert "1002" in result.messages[0].subject
    text = result.messages[0].text
    assert "Leather belt" in text and "129.00 EUR" in text
    assert result.outcome == "confirmed"


def test_the_cli_shows_ad_audiences_only_when_touched(tmp_path: Path) -> None:
    welcome = invoke("welcome", EXAMPLE.with_name("welcome.yaml"), "--out", tmp_path / "w")
    assert welcome.exit_code == 0, welcome.output
    assert "Mon 2026-03-02 09:00  welcome_email: Welcome to" in welcome.output
    assert "Ad audiences" not in welcome.output
    cart = invoke("cart-abandonment", EXAMPLE, "--out", tmp_path / "c")
    assert "Ad audiences" in cart.output and "added the shopper" in cart.output


def test_a_welcome_that_never_starts_says_what_starts_it(tmp_path: Path) -> None:
    text = GOOD_START.replace("{id: ada, email: ada@example.com}", "{id: ada}")
    printed = invoke("welcome", timeline(tmp_path, text))
    assert printed.exit_code == 2, printed.output
    said = " ".join(printed.output.split())
    assert "never starts the welcome journey" in said
    assert "identify: set email" in said


def test_shop_orders_must_be_a_list_of_orders(tmp_path: Path) -> None:
    printed = invoke("welcome", timeline(tmp_path, GOOD_START + "shop_orders: 3\n"))
    assert printed.exit_code == 2, printed.output
    assert "line 7: shop_orders must be a list" in " ".join(printed.output.split())


async def test_welcome_starts_at_a_later_identify_and_ends_at_the_first_order(
    tmp_path: Path,
) -> None:
    text = """customer: {id: dee}
start: 2026-03-02T09:00:00Z
events:
  - at: Tuesday 11:00
    identify: {email: dee@example.com}
  - at: Wednesday 12:00
    track: Order Completed
    properties: {order_id: "7", total: 10, currency: EUR}
"""
    result = await simulate("welcome", timeline(tmp_path, text), tmp_path / "out")
    sent = [(m.step, f"{m.at:%a %H:%M}") for m in result.messages]
    assert sent == [("welcome_email", "Tue 11:00")]
    assert result.outcome == "purchased"
    assert result.story[-1] == "Wed 2026-03-04 12:00  journey ended: purchased"
