"""The price-drop alert (workflows/price_drop.py), every branch on the time-skipping server
with the real activities (the catalogue read from SQLite and PostgreSQL, a real SMTP server),
events routed by the registry as the router routes them; and the proof that
docs/writing-a-journey.md shows the journey's real code and templates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.common import TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from kaeru.cli import settings_markdown
from kaeru.db import session
from kaeru.journeys import JourneyError, deliveries, discover, prefix_of, read_settings, registry
from kaeru.models import Customer, Product
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from worker import PASSTHROUGH, build_worker, workflows
from workflows.kit import EVENT_SIGNAL, Journey, JourneyEvent, JourneyResult
from workflows.price_drop import PriceDropAlert

pytestmark = pytest.mark.journeys("price-drop")

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "writing-a-journey.md"
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)


@dataclass
class Viewer:
    """One shopper whose product views and orders are routed as the router routes them."""

    env: WorkflowEnvironment
    smtp: SMTPTestServer
    settings: Settings
    db: str
    customer_id: str
    seq: int = 0

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        return self.env.client.get_workflow_handle(
            f"price-drop-{self.customer_id}", result_type=JourneyResult
        )

    async def route(self, name: str, **props: Any) -> int:
        """Deliver an event by the registry's deliveries; returns how many started a journey."""
        self.seq += 1
        event = JourneyEvent(self.seq, name, f"m-{uuid.uuid4()}", datetime.now(UTC), props)
        started = 0
        for target in deliveries(name, self.customer_id, props):
            if target.start:
                started += 1
                await self.env.client.start_workflow(
                    target.route.workflow_name,
                    target.route.make_input(self.customer_id, self.settings),
                    id=target.workflow_id,
                    task_queue=self.settings.task_queue,
                    start_signal=EVENT_SIGNAL,
                    start_signal_args=[event],
                    search_attributes=TypedSearchAttributes(
                        Journey.start_search_attributes(self.customer_id)
                    ),
                )
            else:
                with contextlib.suppress(RPCError):  # none live: nothing to do
                    await self.env.client.get_workflow_handle(target.workflow_id).signal(
                        EVENT_SIGNAL, event
                    )
        return started

    async def viewed(self, product_id: str, price: float | None, **props: Any) -> int:
        if price is not None:
            props["price"] = price
        return await self.route("Product Viewed", product_id=product_id, **props)

    async def story(self) -> list[str]:
        return list((await self.handle.query(PriceDropAlert.status)).story)

    async def waiting(self) -> None:
        """Wait (in real time) until the journey has a timer: only then may time be skipped."""
        for _ in range(200):
            history = await self.handle.fetch_history()
            if any(e.event_type == EventType.EVENT_TYPE_TIMER_STARTED for e in history.events):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the journey never started a timer")

    async def told(self, words: str) -> list[str]:
        """Wait (in real time) until the story has a line containing ``words``."""
        for _ in range(200):
            story = await self.story()
            if any(words in line for line in story):
                return story
            await asyncio.sleep(0.05)
        raise AssertionError(f"the story never said {words!r}: {await self.story()}")

    async def skip(self, by: timedelta) -> None:
        await self.env.sleep(by)

    async def outcome(self) -> str:
        return (await self.handle.result()).outcome

    def emails(self) -> list[Message]:
        return [m.message for m in self.smtp.messages if self.email in m.rcpt_tos]

    @property
    def email(self) -> str:
        return f"{self.customer_id}@shoppers.test"


def price(db: str, product_id: str, amount_minor: int, currency: str = "USD") -> None:
    """The catalogue's price of ``product_id`` now (as a server-key event would set it)."""
    with session(db) as s:
        product = s.exec(select(Product).where(Product.product_id == product_id)).first()
        product = product or Product(product_id=product_id, name=product_id.title())
        product.name = {"shoe": "Trail Shoe", "sock": "Wool Socks"}.get(product_id, product_id)
        product.price_minor, product.currency = amount_minor, currency
        product.url = f"https://shop.test/p/{product_id}"
        s.add(product)


def text_of(message: Message) -> str:
    """The plain-text part of a sent message."""
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError("no text part")


def html_of(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError("no HTML part")


@contextlib.asynccontextmanager
async def viewer_on(
    env: WorkflowEnvironment,
    db: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Viewer]:
    """A shopper, the catalogue (shoe 100.00 USD, socks 12.00 USD) in ``db`` and a worker.

    With ``KAERU_RECORD_HISTORIES=<dir>`` each test's history is stored there for tests/replay
    (named ``<test>@<workflow id>.json``, as the replay test expects).
    """
    # Only this journey starts: the others that views and orders start (the cart, browse
    # abandonment, order confirmation...) would be left running when the worker stops, and a
    # journey without its worker stops time skipping for every later test.
    for journey in discover():
        if journey is not PriceDropAlert:
            monkeypatch.setenv(f"KAERU_{prefix_of(journey)}_ENABLED", "false")
    registry.cache_clear()
    settings = make_settings(db, smtp_port=smtp.port, shop_url="https://shop.test")
    customer_id = f"c-{uuid.uuid4().hex[:8]}"
    with session(db) as s:
        s.add(Customer(customer_id=customer_id, email=f"{customer_id}@shoppers.test"))
    price(db, "shoe", 10000)
    price(db, "sock", 1200)
    async with httpx.AsyncClient() as http, build_worker(env.client, settings, http):
        one = Viewer(env, smtp, settings, db, customer_id)
        try:
            yield one
        finally:
            record_to = os.environ.get("KAERU_RECORD_HISTORIES")
            with contextlib.suppress(RPCError):
                if record_to:
                    history = await one.handle.fetch_history()
                    name = request.node.name.removeprefix("test_")
                    path = Path(record_to) / f"{name}@{one.handle.id}.json"
                    path.write_text(history.to_json())
            # A journey left running without its worker stops time skipping for later tests.
            with contextlib.suppress(RPCError):
                await one.handle.terminate("test over")
            registry.cache_clear()


@pytest.fixture
async def viewer(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Viewer]:
    async with viewer_on(time_skipping_env, sqlite_url, smtp, monkeypatch, request) as one:
        yield one


@pytest.fixture
async def viewer_on_each_database(
    time_skipping_env: WorkflowEnvironment,
    database_url: str,
    smtp: SMTPTestServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Viewer]:
    """The shopper, once with the catalogue on SQLite and once on PostgreSQL."""
    async with viewer_on(time_skipping_env, database_url, smtp, monkeypatch, request) as one:
        yield one


async def test_a_price_that_falls_enough_sends_one_email_with_the_old_and_new_price(
    viewer_on_each_database: Viewer,
) -> None:
    viewer = viewer_on_each_database
    assert await viewer.viewed("shoe", 100.00, currency="USD") == 1
    await viewer.waiting()
    await viewer.skip(DAY + MINUTE)
    story = await viewer.told("none fell enough")  # the first daily check: the same price
    assert "watching the price of shoe: 100.00 USD when viewed" in " ".join(story)
    assert viewer.emails() == []
    price(viewer.db, "shoe", 9000)  # the shop lowers it by 10%
    await viewer.skip(DAY)
    assert await viewer.outcome() == "alerted"
    [email] = viewer.emails()
    assert email["Subject"] == "Trail Shoe is now 90.00 USD at Kaeru Shop"
    text = text_of(email)
    assert "Trail Shoe: now 90.00 USD, was 100.00 USD (10% off)" in text
    html = html_of(email)
    assert "90.00 USD" in html and "100.00 USD" in html and "10% off" in html
    assert any(
        "shoe fell from 100.00 USD to 90.00 USD (10% off)" in s for s in await viewer.story()
    )


async def test_a_fall_smaller_than_the_minimum_sends_nothing_and_the_watch_ends(
    viewer: Viewer,
) -> None:
    await viewer.viewed("shoe", 100)
    price(viewer.db, "shoe", 9600)  # 4% off: below the default 5%
    await viewer.waiting()
    await viewer.skip(timedelta(days=14, minutes=1))
    assert await viewer.outcome() == "no_price_drop"
    assert viewer.emails() == []
    checks = [line for line in await viewer.story() if "none fell enough" in line]
    assert len(checks) == 14  # KAERU_PRICE_DROP_CHECK_EVERY: once a day for 14 days


async def test_a_fall_of_exactly_the_minimum_counts(viewer: Viewer) -> None:
    await viewer.viewed("shoe", 100)
    price(viewer.db, "shoe", 9500)  # 5% off: the default minimum, reached
    await viewer.waiting()
    await viewer.skip(DAY + MINUTE)
    assert await viewer.outcome() == "alerted"
    assert "Trail Shoe: now 95.00 USD, was 100.00 USD (5% off)" in text_of(viewer.emails()[0])


async def test_the_settings_come_from_the_environment(
    viewer: Viewer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_PRICE_DROP_MIN_DROP_PERCENT", "3")
    monkeypatch.setenv("KAERU_PRICE_DROP_CHECK_EVERY", "PT6H")
    monkeypatch.setenv("KAERU_PRICE_DROP_WATCH", "43200")
    registry.cache_clear()
    await viewer.viewed("shoe", 100)
    price(viewer.db, "shoe", 9600)  # 4% off: enough at 3%
    await viewer.waiting()
    await viewer.skip(timedelta(hours=6, minutes=1))
    assert await viewer.outcome() == "alerted"
    [email] = viewer.emails()
    assert "was 100.00 USD (4% off)" in text_of(email)


async def test_the_watch_ends_after_the_watch_setting(
    viewer: Viewer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_PRICE_DROP_WATCH", "P2D")
    registry.cache_clear()
    await viewer.viewed("shoe", 100)
    await viewer.waiting()
    await viewer.skip(2 * DAY + MINUTE)
    assert await viewer.outcome() == "no_price_drop"
    price(viewer.db, "shoe", 5000)  # after the watch: too late, nobody is told
    assert viewer.emails() == []


async def test_a_purchase_ends_the_watch_with_no_email(viewer: Viewer) -> None:
    await viewer.viewed("shoe", 100)
    await viewer.waiting()
    await viewer.skip(DAY + MINUTE)
    await viewer.told("none fell enough")
    await viewer.route("Order Completed", order_id="o-1", total=100, currency="USD")
    assert await viewer.outcome() == "purchased"
    price(viewer.db, "shoe", 5000)
    await viewer.skip(DAY)
    assert viewer.emails() == []


async def test_a_later_view_adds_its_product_and_only_what_fell_is_in_the_email(
    viewer: Viewer,
) -> None:
    assert await viewer.viewed("shoe", 100) == 1
    await viewer.waiting()
    first = (await viewer.handle.describe()).run_id
    await viewer.viewed("sock", 12)  # signal-with-start reaches the live journey
    assert (await viewer.handle.describe()).run_id == first
    await viewer.told("watching the price of sock")
    price(viewer.db, "sock", 900)  # 25% off; the shoe stays at 100.00
    await viewer.skip(DAY + MINUTE)
    assert await viewer.outcome() == "alerted"
    [email] = viewer.emails()
    assert email["Subject"] == "Wool Socks is now 9.00 USD at Kaeru Shop"
    text = text_of(email)
    assert "Wool Socks: now 9.00 USD, was 12.00 USD (25% off)" in text
    assert "Trail Shoe" not in text


async def test_the_price_compared_is_the_latest_the_shopper_saw(viewer: Viewer) -> None:
    await viewer.viewed("shoe", 100)
    await viewer.waiting()
    price(viewer.db, "shoe", 9000)
    await viewer.viewed("shoe", 90)  # they saw the lower price already: no news
    await viewer.told("90.00 USD when viewed")
    await viewer.skip(DAY + MINUTE)
    await viewer.told("none fell enough")
    assert viewer.emails() == []
    price(viewer.db, "shoe", 8000)  # 11% below the 90.00 they saw
    await viewer.skip(DAY)
    assert await viewer.outcome() == "alerted"
    assert "was 90.00 USD (11% off)" in text_of(viewer.emails()[0])


async def test_it_watches_at_most_twenty_products_dropping_the_watch_that_ends_first(
    viewer: Viewer,
) -> None:
    await viewer.viewed("p0", 10)
    await viewer.waiting()
    for n in range(1, 21):
        await viewer.viewed(f"p{n}", 10)
    await viewer.told("watching the price of p20")
    watching = (await viewer.handle.query(PriceDropAlert.status)).details["watching"]
    assert sorted(watching.split(", ")) == sorted(f"p{n}" for n in range(1, 21))


async def test_a_price_in_another_currency_is_not_compared(viewer: Viewer) -> None:
    await viewer.viewed("shoe", 100, currency="EUR")
    price(viewer.db, "shoe", 5000, "USD")  # a lower number, but not in euros
    await viewer.waiting()
    await viewer.skip(timedelta(days=14, minutes=1))
    assert await viewer.outcome() == "no_price_drop"
    assert viewer.emails() == []


async def test_a_view_without_a_price_watches_nothing(viewer: Viewer) -> None:
    assert await viewer.viewed("shoe", None) == 1
    assert await viewer.outcome() == "nothing_to_watch"
    assert any("named no product and price" in line for line in await viewer.story())
    assert viewer.emails() == []


async def test_switched_off_it_never_starts(
    viewer: Viewer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_PRICE_DROP_ENABLED", "false")
    registry.cache_clear()
    assert await viewer.viewed("shoe", 100) == 0
    with pytest.raises(RPCError):
        await viewer.handle.describe()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KAERU_PRICE_DROP_MIN_DROP_PERCENT", "0"),
        ("KAERU_PRICE_DROP_MIN_DROP_PERCENT", "100"),
        ("KAERU_PRICE_DROP_CHECK_EVERY", "0"),
        ("KAERU_PRICE_DROP_WATCH", "-1"),
    ],
)
def test_settings_it_cannot_use_are_refused_naming_the_variable(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(JourneyError, match=variable):
        read_settings(PriceDropAlert)


def test_kaeru_settings_table_lists_its_settings() -> None:
    table = settings_markdown()
    assert "| `KAERU_PRICE_DROP_ENABLED` | true |" in table
    assert "| `KAERU_PRICE_DROP_WATCH` | `1209600` (14 days) |" in table
    assert "| `KAERU_PRICE_DROP_CHECK_EVERY` | `86400` (1 day) |" in table
    assert "| `KAERU_PRICE_DROP_MIN_DROP_PERCENT` | `5.0` |" in table


async def test_its_history_replays_and_a_changed_step_would_not(viewer: Viewer) -> None:
    """What tests/replay checks for stored histories, on a fresh one: the journey's decisions
    depend on nothing but its history (no clock, no I/O, no randomness in the class)."""
    await viewer.viewed("shoe", 100)
    await viewer.waiting()
    price(viewer.db, "shoe", 9000)
    await viewer.skip(DAY + MINUTE)
    assert await viewer.outcome() == "alerted"
    history = await viewer.handle.fetch_history()
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    await replayer.replay_workflow(history)
    changed = history.to_json().replace('"look_up_products"', '"recommend_products"', 1)
    tampered = await replayer.replay_workflow(
        type(history).from_json(viewer.handle.id, changed), raise_on_replay_failure=False
    )
    assert tampered.replay_failure is not None


# ---- the guide shows the real code ------------------------------------------------------

#: A fenced block in the guide whose line before is "`<path>`:" or "`<path>`, continued:".
SHOWN = re.compile(
    r"^`(?P<path>[\w/.]+)`(?:, continued)?:\n\n```\w*\n(?P<code>.*?)^```$", re.M | re.S
)
JOURNEY_FILES = [
    "workflows/price_drop.py",
    "activities/templates/price_drop.subject.j2",
    "activities/templates/price_drop.txt.j2",
    "activities/templates/price_drop.html.j2",
]


def lines_of(text: str) -> list[str]:
    """The lines that are not blank: the guide splits the file at blank lines between blocks."""
    return [line for line in text.splitlines() if line.strip()]


def shown_in(guide: str) -> dict[str, list[str]]:
    """Each file the guide shows, the lines of its blocks joined in order."""
    shown: dict[str, list[str]] = {}
    for match in SHOWN.finditer(guide):
        shown.setdefault(match["path"], []).extend(lines_of(match["code"]))
    return shown


def test_the_guide_shows_the_whole_journey_and_its_templates_as_they_are() -> None:
    shown = shown_in(GUIDE.read_text())
    assert set(JOURNEY_FILES) <= set(shown), f"not in the guide: {set(JOURNEY_FILES) - set(shown)}"
    for path, lines in shown.items():
        assert lines == lines_of((ROOT / path).read_text()), f"the guide's {path} is not the file"


def test_the_guide_check_catches_a_changed_or_missing_line() -> None:
    guide = GUIDE.read_text()
    file_lines = lines_of((ROOT / JOURNEY_FILES[0]).read_text())
    changed = guide.replace("min_drop_percent: float = field(", "min_drop_percent: int = field(")
    assert shown_in(changed)[JOURNEY_FILES[0]] != file_lines
    dropped = guide.replace('        return await self.finish("no_price_drop")\n', "", 1)
    assert shown_in(dropped)[JOURNEY_FILES[0]] != file_lines
    assert shown_in(guide)[JOURNEY_FILES[0]] == file_lines
