"""The kill switch and an operator's pause hold a journey before its next outside step.

Real parts: the time-skipping server, the worker ``build_worker`` makes (with its kill switch
gate, reading the switches at every outside step here: ``KAERU_KILL_SWITCH_CACHE=0.001``), the
real SMTP server on loopback and SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker, WorkflowInterceptorClassInput
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.email.addresses import message_id_for
from kaeru.db import session
from kaeru.holds import (
    GLOBAL,
    KILL_SWITCH,
    PAUSE_SIGNAL,
    PAUSED,
    RELEASE_JOURNEY,
    RELEASE_KILL_SWITCH,
    RESUME_SIGNAL,
    PauseJourney,
    ResumeJourney,
)
from kaeru.kill_switch import KillSwitchGate, turn_off, turn_on
from kaeru.models import Customer
from kaeru.search_attributes import HELD, OUTCOME
from tests.conftest import TIME_SKIPPING_STARTS, make_settings, start_time_skipping
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import DAY, SHOE, Shopper, record_histories
from tests.workflows.test_order_confirmation import ORDER, Buyer
from tests.workflows.test_order_confirmation import buyer as buyer  # the fixture
from worker import PASSTHROUGH, activities_for, build_worker, kill_switch_gate, workflows
from workflows.kit import STALE_AFTER
from workflows.order_confirmation import OrderConfirmation

MAIL_FROM = make_settings("sqlite://").mail_from
#: Workers read the switches at every outside step (the default caches them for 5 s).
FRESH = timedelta(milliseconds=1)


@contextlib.asynccontextmanager
async def shopper_on_a_worker(
    env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer, **overrides: Any
) -> AsyncIterator[Shopper]:
    """The ``shopper`` fixture's worker with the settings ``overrides``."""
    settings = make_settings(sqlite_url, smtp_port=smtp.port, **overrides)
    async with httpx.AsyncClient() as http, build_worker(env.client, settings, http):
        shopper = Shopper(env, sqlite_url, smtp, settings.task_queue)
        with session(sqlite_url) as s:
            s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
        yield shopper
        with contextlib.suppress(RPCError):
            await shopper.handle.terminate("test over")
        await record_histories(shopper.env.client, shopper.journey_id)


@pytest_asyncio.fixture(loop_scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server for each test of this module (about a second to start).

    With one server per xdist worker, a test here sometimes could not skip time at all: its
    first sleep timed out although no activity of its worker was running (stacks dumped at
    the timeout), and each later sleep on that server too (stop 23's CI and stop 24's third
    run: up to 19 tests). It reproduced about once in four runs of this module with -n 2,
    always right after another test of the module on the same server, which suggests the
    server still counted work of an earlier test (a task handed to a worker that was shutting
    down) as running. A server of its own per test ends that; the cause is in the closing
    note of stop 24, for whoever takes it up."""
    env = await start_time_skipping()
    yield env
    TIME_SKIPPING_STARTS.forget(env.client)  # ended with the server
    await env.shutdown()


@pytest.fixture
async def held_shopper(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Shopper]:
    """The ``shopper`` fixture's worker, reading the kill switches at every outside step."""
    async with shopper_on_a_worker(
        time_skipping_env, sqlite_url, smtp, kill_switch_cache=FRESH
    ) as shopper:
        yield shopper


@pytest.fixture
async def cached_shopper(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Shopper]:
    """The ``shopper`` fixture's worker, keeping what it read of the switches for the default
    KAERU_KILL_SWITCH_CACHE (5 s)."""
    async with shopper_on_a_worker(
        time_skipping_env, sqlite_url, smtp, kill_switch_cache=timedelta(seconds=5)
    ) as shopper:
        yield shopper


def quiet_in(now: datetime, start: timedelta, end: timedelta) -> dict[str, str]:
    """Quiet hours (shop time, UTC here) from ``now + start`` to ``now + end`` of the day."""
    return {"quiet_start": f"{now + start:%H:%M}", "quiet_end": f"{now + end:%H:%M}"}


async def held_by(shopper: Shopper, why: str | None) -> Any:
    """Wait (in real time) until the journey's status says ``why`` holds it; its status."""
    for _ in range(200):
        status = await shopper.status()
        if status.held == why:
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"journey held by {status.held!r}, expected {why!r}")


async def held_attribute(shopper: Shopper) -> str | None:
    return (await shopper.handle.describe()).typed_search_attributes.get(HELD)


async def cart_email_key(shopper: Shopper) -> list[Any]:
    """The shopper's emails whose Message-ID is the cart email's (its idempotency key)."""
    wanted = message_id_for(await shopper.message_key("cart_email"), MAIL_FROM)
    return [m for m in shopper.emails() if m["Message-ID"] == wanted]


async def test_the_switch_holds_the_email_and_the_release_sends_it_once(
    held_shopper: Shopper,
) -> None:
    shopper = held_shopper
    turn_on(shopper.db, GLOBAL, actor="test", reason="wrong prices", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    status = await held_by(shopper, KILL_SWITCH)
    assert status.step == "cart_email"
    assert any("held before the cart_email step by the kill switch" in x for x in status.story)
    assert "wrong prices" in status.story[-1]
    assert await held_attribute(shopper) == KILL_SWITCH
    await asyncio.sleep(0.3)  # a send would have reached the loopback server by now
    assert shopper.emails() == []

    turn_off(shopper.db, GLOBAL)
    await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH))
    await shopper.wait_for_emails(1)
    await held_by(shopper, None)
    assert await held_attribute(shopper) is None
    # The journey goes on: not opened within a day, it ends; one cart email in all.
    await shopper.skip(DAY + 60)
    assert await shopper.outcome() == "not_opened"
    assert len(await cart_email_key(shopper)) == 1
    assert len(shopper.emails()) == 1


async def test_a_purchase_while_held_ends_the_journey_without_a_send(
    held_shopper: Shopper,
) -> None:
    shopper = held_shopper
    turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await held_by(shopper, KILL_SWITCH)
    await shopper.purchase("o-held")
    assert await shopper.outcome() == "purchased"
    attributes = (await shopper.handle.describe()).typed_search_attributes
    assert attributes.get(OUTCOME) == "purchased" and attributes.get(HELD) is None
    assert shopper.emails() == []
    [conversion] = shopper.touchpoints("conversion")
    assert conversion.order_id == "o-held"


async def test_a_journey_the_release_missed_tries_again_on_its_own(
    held_shopper: Shopper,
) -> None:
    """No resume signal (the switch went off as the journey was being held): the held step
    tries again a minute later, and the email goes out once."""
    shopper = held_shopper
    turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await held_by(shopper, KILL_SWITCH)
    await shopper.skip(5 * 60)  # still on: held again, now for two minutes
    await held_by(shopper, KILL_SWITCH)
    assert shopper.emails() == []
    turn_off(shopper.db, GLOBAL)
    await shopper.skip(3 * 60)
    await shopper.wait_for_emails(1)
    assert len(await cart_email_key(shopper)) == 1


async def test_the_switch_of_another_kind_does_not_hold_this_one(held_shopper: Shopper) -> None:
    shopper = held_shopper
    turn_on(shopper.db, "welcome", actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_emails(1)
    assert (await shopper.status()).held is None


async def test_the_switch_of_its_kind_holds_it(held_shopper: Shopper) -> None:
    shopper = held_shopper
    turn_on(shopper.db, "cart-abandonment", actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    status = await held_by(shopper, KILL_SWITCH)
    assert "cart-abandonment switch" in status.story[-1]
    assert shopper.emails() == []


async def test_a_paused_journey_waits_before_its_email_until_resumed(
    held_shopper: Shopper,
) -> None:
    shopper = held_shopper
    await shopper.cart("Product Added", **SHOE)
    await shopper.handle.signal(PAUSE_SIGNAL, PauseJourney(reason="checking", actor="cli:ann"))
    # Shown at once, before it reaches a step that acts: operators find it paused.
    status = await held_by(shopper, PAUSED)
    assert "paused by cli:ann: checking" in status.story[-1]
    assert await held_attribute(shopper) == PAUSED
    await shopper.skip(DAY + 60)  # its timers keep running: it reaches the email, and waits
    await shopper.wait_for_step("cart_email")
    await asyncio.sleep(0.3)
    assert shopper.emails() == []
    # A switch going off does not end an operator's pause.
    await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH))
    await asyncio.sleep(0.3)
    assert shopper.emails() == [] and (await shopper.status()).held == PAUSED

    await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_JOURNEY, actor="x"))
    await shopper.wait_for_emails(1)
    await held_by(shopper, None)
    assert len(await cart_email_key(shopper)) == 1


async def test_a_held_journey_cancelled_ends_cancelled(held_shopper: Shopper) -> None:
    shopper = held_shopper
    turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await held_by(shopper, KILL_SWITCH)
    await shopper.handle.cancel(reason="bad campaign")
    with pytest.raises(WorkflowFailureError):
        await shopper.handle.result()
    attributes = (await shopper.handle.describe()).typed_search_attributes
    assert attributes.get(OUTCOME) == "cancelled" and attributes.get(HELD) is None
    assert shopper.emails() == []


@pytest.mark.journeys("order-confirmation")
async def test_the_global_switch_lets_receipts_go_out(buyer: Buyer) -> None:
    buyer.settings = buyer.settings.model_copy(update={"kill_switch_cache": FRESH})
    turn_on(buyer.db, GLOBAL, actor="test", include_transactional=False)
    async with buyer.working():
        await buyer.orders(**ORDER)
        assert await buyer.outcome() == "confirmed"
    assert len(buyer.emails()) == 1


@pytest.mark.journeys("order-confirmation")
async def test_the_global_switch_turned_on_for_all_holds_receipts_too(buyer: Buyer) -> None:
    buyer.settings = buyer.settings.model_copy(update={"kill_switch_cache": FRESH})
    turn_on(buyer.db, GLOBAL, actor="test", include_transactional=True)
    async with buyer.working():
        await buyer.orders(**ORDER)
        for _ in range(200):
            if (await buyer.handle.query(OrderConfirmation.status)).held == KILL_SWITCH:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the order confirmation was not held")
        assert buyer.emails() == []
        turn_off(buyer.db, GLOBAL)
        await buyer.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH))
        assert await buyer.outcome() == "confirmed"
    assert len(buyer.emails()) == 1


class _PreviousWorkflowCode(KillSwitchGate):
    """The gate beside workflow code of the version before holds (a rolling deploy): its
    activities come without the holds header."""

    def workflow_interceptor_class(self, input: WorkflowInterceptorClassInput) -> None:
        return None


async def test_journeys_of_code_that_knows_no_holds_are_not_held(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    """Held, such a journey would end ``failed``: it acts as it did before the switch."""
    settings = make_settings(sqlite_url, smtp_port=smtp.port, kill_switch_cache=FRESH)
    gate = kill_switch_gate(settings)
    old = _PreviousWorkflowCode(gate.reader, gate.journeys)
    turn_on(sqlite_url, GLOBAL, actor="test", include_transactional=False)
    async with httpx.AsyncClient() as http:
        worker = Worker(
            time_skipping_env.client,
            task_queue=settings.task_queue,
            workflows=list(workflows()),
            activities=activities_for(settings, http),
            interceptors=[old],
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
            ),
        )
        async with worker:
            shopper = Shopper(time_skipping_env, sqlite_url, smtp, settings.task_queue)
            with session(sqlite_url) as s:
                s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
            try:
                await shopper.cart("Product Added", **SHOE)
                await shopper.skip(DAY + 60)
                await shopper.wait_for_emails(1)
                assert (await shopper.status()).held is None
            finally:
                with contextlib.suppress(RPCError):
                    await shopper.handle.terminate("test over")


async def test_the_release_is_not_held_again_by_what_a_worker_read_before_it(
    cached_shopper: Shopper,
) -> None:
    """The worker keeps its read of the switches for 5 s: the step the release tries again a
    moment after the switch went off must not be held by that read (it would then wait for
    its recheck timer, minutes away, which nothing skips here)."""
    shopper = cached_shopper
    turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await held_by(shopper, KILL_SWITCH)
    turn_off(shopper.db, GLOBAL)
    await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH))
    await shopper.wait_for_emails(1)  # within seconds, real time
    await held_by(shopper, None)
    assert len(await cart_email_key(shopper)) == 1


async def test_a_resume_starts_the_recheck_backoff_over(held_shopper: Shopper) -> None:
    shopper = held_shopper
    turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await held_by(shopper, KILL_SWITCH)
    # Held again after 1 minute, then after 2 more, then for 4: the first wait of more than
    # 2 minutes left is the third.
    for _ in range(40):
        await shopper.skip(30)
        await asyncio.sleep(0.1)
        before = await shopper.status()
        now = await shopper.env.get_current_time()
        if before.waiting_until is not None and before.waiting_until - now > timedelta(minutes=2):
            break
    else:
        raise AssertionError("the recheck did not back off")
    # A resume while the switch is still on (another switch went off, an operator's resume):
    # held again at once, and its next recheck is the first one again, a minute away.
    await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH))
    for _ in range(200):
        status = await shopper.status()
        if status.held == KILL_SWITCH and status.waiting_until not in (None, before.waiting_until):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the resumed step was not held again")
    assert status.waiting_until is not None
    left = status.waiting_until - await shopper.env.get_current_time()
    assert left <= timedelta(minutes=1, seconds=5), left
    assert shopper.emails() == []


async def test_a_held_email_released_in_quiet_hours_waits_for_their_end(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    """The send gate granted the slot before the hold; the release, three hours later, is in
    quiet hours: the email asks the gate again and goes out as they end, once."""
    now = (await time_skipping_env.get_current_time()).astimezone(UTC)
    quiet = quiet_in(now, timedelta(hours=2), timedelta(hours=4))
    async with shopper_on_a_worker(
        time_skipping_env, sqlite_url, smtp, kill_switch_cache=FRESH, **quiet
    ) as shopper:
        turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
        await shopper.cart("Product Added", **SHOE)
        await shopper.skip(DAY + 60)  # the gate grants the slot (not quiet), the switch holds
        await held_by(shopper, KILL_SWITCH)
        await shopper.skip(3 * 3600)  # into the quiet hours
        released = await time_skipping_env.get_current_time()
        turn_off(shopper.db, GLOBAL)
        await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_KILL_SWITCH))
        for _ in range(200):
            status = await shopper.status()
            if status.waiting_for == "a send slot":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"the released email did not wait for a slot: {status.story}")
        assert any("quiet hours" in line for line in status.story[-2:]), status.story
        opens = status.waiting_until
        assert opens is not None and f"{opens:%H:%M}" == quiet["quiet_end"], opens
        assert timedelta(minutes=30) < opens - released < timedelta(hours=2), opens
        await asyncio.sleep(0.3)
        assert shopper.emails() == []
        await shopper.skip((opens - await time_skipping_env.get_current_time()).total_seconds())
        await shopper.wait_for_emails(1)
        assert len(await cart_email_key(shopper)) == 1


async def test_a_pause_past_the_stale_limit_drops_the_email(held_shopper: Shopper) -> None:
    """The gate granted the slot, then the journey was paused for longer than the stale limit
    (two days from when it wanted to send): the resume asks the gate again, which drops it."""
    shopper = held_shopper
    await shopper.cart("Product Added", **SHOE)
    await shopper.handle.signal(PAUSE_SIGNAL, PauseJourney(reason="checking", actor="cli:ann"))
    await held_by(shopper, PAUSED)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_step("cart_email")
    await shopper.skip(STALE_AFTER.total_seconds() + 3600)
    await asyncio.sleep(0.3)
    assert shopper.emails() == []
    await shopper.handle.signal(RESUME_SIGNAL, ResumeJourney(scope=RELEASE_JOURNEY, actor="x"))
    # Dropped as the gate drops a message that waited too long: the journey ends as it does
    # when its reminder is skipped.
    assert await shopper.outcome() == "already_reminded"
    story = (await shopper.status()).story
    assert any(
        "did not send the cart email (stale): held past the message's stale limit" in line
        for line in story
    ), story
    assert shopper.emails() == []


async def test_a_switch_on_past_the_stale_limit_drops_the_email(held_shopper: Shopper) -> None:
    """Each recheck asks the gate again too: past the stale limit the email is dropped while
    the switch is still on, and the journey goes on without it."""
    shopper = held_shopper
    turn_on(shopper.db, GLOBAL, actor="test", include_transactional=False)
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    await held_by(shopper, KILL_SWITCH)
    await shopper.skip(STALE_AFTER.total_seconds() + 3600)
    assert await shopper.outcome() == "already_reminded"
    story = (await shopper.status()).story
    assert any("held past the message's stale limit" in line for line in story), story
    assert shopper.emails() == []
