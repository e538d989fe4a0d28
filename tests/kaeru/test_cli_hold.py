"""``kaeru kill-switch`` and ``kaeru journeys pause|resume|cancel``: what they say, their exit
codes, their audit entries, and (on the dev server with a real worker and SMTP) that a switch
holds a send and its release sends it once.

The commands run in a thread (``asyncio.to_thread``): each runs its own event loop, as the
``kaeru`` process would, while the worker runs on the test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from typer.testing import Result

from activities.email.addresses import message_id_for
from kaeru.audit import cli_actor, entries
from kaeru.db import session
from kaeru.holds import KILL_SWITCH, PAUSED
from kaeru.kill_switch import switches
from kaeru.models import Customer
from kaeru.search_attributes import HELD, OUTCOME
from tests.conftest import make_settings
from tests.support.cli import (  # noqa: F401 - clean_environment is a fixture
    UNREACHABLE,
    assert_clear_failure,
    clean_environment,
    run_kaeru,
)
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import SETTINGS, SHOE, Shopper
from worker import build_worker


def kaeru(*args: str, **env: str) -> Result:
    return run_kaeru(list(args), env, columns=200)


async def kaeru_async(*args: str, **env: str) -> Result:
    return await asyncio.to_thread(kaeru, *args, **env)


def actions(url: str) -> list[tuple[str, str]]:
    """The audit log's (action, target) pairs, oldest first, all by the CLI's actor."""
    found = list(reversed(entries(url)))
    assert {e.actor for e in found} <= {cli_actor()}
    return [(e.action, e.target) for e in found]


def test_the_switch_goes_on_and_off_and_each_change_is_audited(sqlite_url: str) -> None:
    env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": UNREACHABLE}
    assert_clear_failure(
        kaeru("kill-switch", "on", "--kind", "nope", **env),
        "there is no journey kind 'nope'",
        "cart-abandonment",
    )
    assert_clear_failure(
        kaeru("kill-switch", "on", "--kind", "welcome", "--all", **env),
        "--all is for the global switch",
    )
    on = kaeru("kill-switch", "on", "--reason", "wrong prices", **env)
    assert on.exit_code == 0, on.output
    assert "The global kill switch is on: marketing journeys wait" in on.stdout
    assert "order confirmations) still go out" in on.stdout
    again = kaeru("kill-switch", "on", **env)
    assert again.exit_code == 0 and "was already on" in again.stdout
    [switch] = switches(sqlite_url)
    assert (switch.scope, switch.reason, switch.actor) == ("*", "wrong prices", cli_actor())

    status = kaeru("kill-switch", "status", **env)
    assert status.exit_code == 0, status.output
    assert "marketing journeys" in status.stdout and "wrong prices" in status.stdout
    assert "Held journeys not counted: Temporal could not be asked" in status.stdout

    assert_clear_failure(
        kaeru("kill-switch", "off", "--kind", "welcome", **env),
        "the welcome kill switch is not on: nothing was changed",
        "kaeru kill-switch status",
    )
    # Temporal down: the switch is off (held journeys try again on their own), and it says so.
    off = kaeru("kill-switch", "off", **env)
    assert_clear_failure(
        off, "the global kill switch is off, but the journeys it held could not be released"
    )
    assert switches(sqlite_url) == []
    assert actions(sqlite_url) == [("kill_switch.on", "*"), ("kill_switch.off", "*")]
    assert "No kill switch is on." in kaeru("kill-switch", "status", **env).stdout


def test_a_kinds_switch_is_its_own(sqlite_url: str) -> None:
    env = {"KAERU_DATABASE_URL": sqlite_url}
    on = kaeru("kill-switch", "on", "--kind", "cart-abandonment", **env)
    assert on.exit_code == 0, on.output
    assert "cart-abandonment journeys wait" in on.stdout
    assert "kaeru kill-switch off --kind cart-abandonment" in on.stdout
    assert [s.scope for s in switches(sqlite_url)] == ["cart-abandonment"]
    assert_clear_failure(kaeru("kill-switch", "off", **env), "the global kill switch is not on")
    assert actions(sqlite_url) == [("kill_switch.on", "cart-abandonment")]


def test_a_reason_is_shown_as_it_was_written_never_as_markup(sqlite_url: str) -> None:
    """Rich markup in a reason (``[/]`` closes a tag that never opened) raised MarkupError."""
    env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": UNREACHABLE}
    reason = "stop [/] now [bold]really[/bold]"
    on = kaeru("kill-switch", "on", "--kind", "[red]cart", **env)
    assert_clear_failure(on, "there is no journey kind '[red]cart'")
    on = kaeru("kill-switch", "on", "--reason", reason, **env)
    assert on.exit_code == 0, on.output
    status = kaeru("kill-switch", "status", **env)
    assert status.exit_code == 0, status.output
    assert reason in status.stdout


def test_steering_needs_a_journey_that_runs(sqlite_url: str) -> None:
    env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": UNREACHABLE}
    assert_clear_failure(
        kaeru("journeys", "pause", "cart-abandonment-c-1", **env), "cannot reach Temporal"
    )
    assert actions(sqlite_url) == []


@dataclasses.dataclass
class Stack:
    shopper: Shopper
    env: dict[str, str]


@pytest.fixture
async def stack(
    dev_server_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Stack]:
    """A real worker on the dev server (switches read at every outside step), and a cart
    shopper whose first email is due a second after the cart."""
    settings = make_settings(sqlite_url, smtp_port=smtp.port, kill_switch_cache=0.001)
    async with httpx.AsyncClient() as http, build_worker(dev_server_env.client, settings, http):
        shopper = Shopper(
            dev_server_env,
            sqlite_url,
            smtp,
            settings.task_queue,
            settings=dataclasses.replace(SETTINGS, email_delay=1.0),
        )
        with session(sqlite_url) as s:
            s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
        address = dev_server_env.client.service_client.config.target_host
        yield Stack(shopper, {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": address})
        with contextlib.suppress(RPCError):
            await shopper.handle.terminate("test over")


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


async def until(check: Any, what: str) -> Any:
    """Poll ``check()`` (async) until it is truthy, for up to 10 s."""
    for _ in range(200):
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def test_the_switch_holds_a_send_and_off_releases_it_exactly_once(stack: Stack) -> None:
    shopper, env = stack.shopper, stack.env
    on = await kaeru_async("kill-switch", "on", "--reason", "bad copy", **env)
    assert on.exit_code == 0, on.output
    await shopper.cart("Product Added", **SHOE)  # started while the switch is on

    async def held() -> bool:
        return bool((await shopper.status()).held == KILL_SWITCH)

    await until(held, "the journey is held by the kill switch")
    assert shopper.emails() == []

    async def counted() -> bool:  # visibility lags behind the journey's upsert
        status = await kaeru_async("kill-switch", "status", **env)
        assert status.exit_code == 0, status.output
        return any(
            line.split()[:1] == ["global"] and line.split()[-1] == "1"
            for line in status.stdout.splitlines()
        )

    await until(counted, "kill-switch status counts the held journey")
    assert shopper.emails() == []

    off = await kaeru_async("kill-switch", "off", **env)
    assert off.exit_code == 0, off.output
    assert "released 1 held journey(s)" in off.stdout
    await shopper.wait_for_emails(1)
    wanted = message_id_for(await shopper.message_key("cart_email"), make_settings("").mail_from)

    async def sent() -> bool:
        return (await shopper.status()).step == "cart_email" and any(
            "sent the cart email" in line for line in (await shopper.status()).story
        )

    await until(sent, "the journey goes on after the send")
    assert [m["Message-ID"] for m in shopper.emails()] == [wanted]
    description = await shopper.handle.describe()
    assert description.typed_search_attributes.get(HELD) is None
    assert actions(env["KAERU_DATABASE_URL"]) == [("kill_switch.on", "*"), ("kill_switch.off", "*")]


async def test_one_journey_is_paused_resumed_and_cancelled(stack: Stack) -> None:
    shopper, env = stack.shopper, stack.env
    url = env["KAERU_DATABASE_URL"]
    shopper.settings = SETTINGS  # its email is a day away: the pause is what this is about
    assert_clear_failure(
        await kaeru_async("journeys", "pause", "cart-abandonment-nobody", **env),
        "there is no journey with id 'cart-abandonment-nobody'",
    )
    await shopper.cart("Product Added", **SHOE)
    journey = shopper.journey_id
    await shopper.wait_for_step("cart_quiet")

    async def held_is(value: str | None) -> bool:
        attributes = (await shopper.handle.describe()).typed_search_attributes
        return attributes.get(HELD) == value

    paused = await kaeru_async("journeys", "pause", journey, "--reason", "checking", **env)
    assert paused.exit_code == 0, paused.output
    assert f"Paused {journey}: it waits before its next email" in paused.stdout
    await until(lambda: held_is(PAUSED), "KaeruHeld says paused")
    again = await kaeru_async("journeys", "pause", journey, **env)
    assert again.exit_code == 0 and "already is paused" in again.stdout

    resumed = await kaeru_async("journeys", "resume", journey, "--reason", "checked [ok]", **env)
    assert resumed.exit_code == 0, resumed.output
    await until(lambda: held_is(None), "KaeruHeld is unset")
    story = (await shopper.status()).story
    assert any(f"resumed by {cli_actor()}: checked [ok]" in line for line in story), story
    [audited] = [e for e in entries(url) if e.action == "journey.resume"]
    assert audited.detail == {"was": PAUSED, "reason": "checked [ok]"}
    assert_clear_failure(
        await kaeru_async("journeys", "resume", journey, **env), "is neither paused nor held"
    )

    cancelled = await kaeru_async("journeys", "cancel", journey, "--reason", "test", **env)
    assert cancelled.exit_code == 0, cancelled.output
    assert f"Cancelled {journey}: it ended cancelled" in cancelled.stdout
    description = await shopper.handle.describe()
    assert description.status == WorkflowExecutionStatus.CANCELED
    assert description.typed_search_attributes.get(OUTCOME) == "cancelled"
    assert_clear_failure(
        await kaeru_async("journeys", "cancel", journey, **env),
        "has already ended (canceled, outcome cancelled): nothing was changed",
    )
    assert actions(url) == [
        ("journey.pause", journey),
        ("journey.resume", journey),
        ("journey.cancel", journey),
    ]
    assert shopper.emails() == []
