"""``kaeru journeys list|show``, ``kaeru customers show``, ``kaeru audiences show`` and
``kaeru audit``: what they print from a real Temporal dev server (with a real worker and SMTP
where a journey must run) and a real database, and that a filter's value cannot change the
visibility query it goes into.

The commands run in a thread (``asyncio.to_thread``) where a worker runs on the test's loop:
each runs its own event loop, as the ``kaeru`` process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from typer.testing import Result

from kaeru.audit import cli_actor
from kaeru.cli_read import UnsearchableValue, journeys_query, literal
from kaeru.consent import EMAIL, SMS, set_consent
from kaeru.db import session
from kaeru.holds import PAUSED
from kaeru.models import (
    AudienceChangeRow,
    AudienceJoin,
    Customer,
    EmailMessage,
    Event,
    Touchpoint,
    utcnow,
)
from kaeru.pseudonyms import read_visible_ids
from kaeru.search_attributes import CUSTOMER_ID, HELD, OUTCOME, STEP
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
    return run_kaeru(list(args), env)


async def kaeru_async(*args: str, **env: str) -> Result:
    return await asyncio.to_thread(kaeru, *args, **env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.stdout


def rows(stdout: str) -> list[list[str]]:
    """The table's rows, split on whitespace."""
    return [line.split() for line in stdout.splitlines() if line.strip()]


async def until(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check()`` (async) until it is truthy, for up to 10 s (visibility lags)."""
    for _ in range(100):
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


# ---- the query builder -----------------------------------------------------------------------


def test_a_value_stays_inside_its_literal() -> None:
    assert literal("cart_email") == "'cart_email'"
    assert literal("x' OR KaeruStep != 'y") == "'x'' OR KaeruStep != ''y'"
    for unsearchable in ('a"b', "a\\", "a\nb"):
        with pytest.raises(UnsearchableValue):
            literal(unsearchable)
    assert journeys_query(["CartAbandonment"], step="s", customers=["c-1", "p_ab"]) == (
        "WorkflowType IN ('CartAbandonment') AND KaeruStep = 's' AND "
        "KaeruCustomerId IN ('c-1', 'p_ab')"
    )


# ---- journeys list: filters on the dev server's visibility (journeys without a worker) -------


@dataclasses.dataclass
class Listed:
    client: Client
    env: dict[str, str]
    tag: str
    started: list[str]

    async def start(
        self,
        workflow_type: str,
        customer: str,
        step: str,
        kind: str,
        outcome: str = "",
        held: str = "",
    ) -> str:
        """Start a journey's workflow as the router does, on a queue no worker polls: it stays
        running at ``step`` (with ``outcome`` already set, if given) until the test's end."""
        workflow_id = f"{kind}-{customer}"
        attributes = [SearchAttributePair(CUSTOMER_ID, customer), SearchAttributePair(STEP, step)]
        if outcome:
            attributes.append(SearchAttributePair(OUTCOME, outcome))
        if held:
            attributes.append(SearchAttributePair(HELD, held))
        await self.client.start_workflow(
            workflow_type,
            id=workflow_id,
            task_queue=f"no-worker-{self.tag}",
            search_attributes=TypedSearchAttributes(attributes),
        )
        self.started.append(workflow_id)
        return workflow_id


@pytest.fixture
async def listed(dev_server_env: WorkflowEnvironment, sqlite_url: str) -> AsyncIterator[Listed]:
    address = dev_server_env.client.service_client.config.target_host
    env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": address}
    found = Listed(dev_server_env.client, env, uuid.uuid4().hex[:8], [])
    yield found
    for workflow_id in found.started:
        with contextlib.suppress(RPCError):
            await found.client.get_workflow_handle(workflow_id).terminate("test over")


@pytest.mark.journeys("*")
async def test_journeys_list_filters_by_kind_step_customer_and_status(listed: Listed) -> None:
    tag, env = listed.tag, listed.env
    quiet, email = f"cart_quiet_{tag}", f"cart_email_{tag}"
    first = await listed.start("CartAbandonment", f"c-{tag}-1", quiet, "cart-abandonment")
    second = await listed.start(
        "CartAbandonment", f"c-{tag}-2", email, "cart-abandonment", outcome=f"purchased_{tag}"
    )
    welcome = await listed.start("Welcome", f"c-{tag}-1", quiet, "welcome", held=PAUSED)

    async def both_listed() -> str | None:
        out = ok(await kaeru_async("journeys", "list", "--step", quiet, **env))
        return out if first in out and welcome in out else None

    out = await until(both_listed, "the journeys at the step are visible")
    assert second not in out
    [row] = [r for r in rows(out) if r[0] == first]
    assert row[1:4] == ["cart-abandonment", quiet, "running"]
    assert row[-1] == "-"  # not held

    out = ok(await kaeru_async("journeys", "list", "--step", quiet, "--kind", "welcome", **env))
    assert welcome in out and first not in out
    [row] = [r for r in rows(out) if r[0] == welcome]
    assert row[1:4] == ["welcome", quiet, "running"] and row[-1] == "paused"

    out = ok(await kaeru_async("journeys", "list", "--customer", f"c-{tag}-2", **env))
    assert second in out and first not in out and welcome not in out

    out = ok(
        await kaeru_async("journeys", "list", "--customer", f"c-{tag}-1", "--limit", "1", **env)
    )
    assert (first in out) != (welcome in out)
    assert "Showing the first 1" in out

    out = ok(await kaeru_async("journeys", "list", "--outcome", f"purchased_{tag}", **env))
    [row] = [r for r in rows(out) if r[0] == second]
    assert row[3:6] == ["running", "/", f"purchased_{tag}"]
    assert first not in out

    running = ok(
        await kaeru_async("journeys", "list", "--step", email, "--status", "running", **env)
    )
    assert second in running
    done = ok(
        await kaeru_async("journeys", "list", "--step", email, "--status", "completed", **env)
    )
    assert second not in done and "No journey matches" in done

    assert_clear_failure(
        await kaeru_async("journeys", "list", "--kind", "nope", **env),
        "there is no journey kind 'nope'",
        "cart-abandonment",
    )
    assert_clear_failure(
        await kaeru_async("journeys", "list", "--status", "asleep", **env),
        "--status 'asleep' is not a status",
        "running",
    )


@pytest.mark.journeys("*")
async def test_a_quote_in_a_filter_neither_breaks_nor_widens_the_query(listed: Listed) -> None:
    tag, env = listed.tag, listed.env
    step = f"cart_quiet_{tag}"
    plain = await listed.start("CartAbandonment", f"c-{tag}", step, "cart-abandonment")
    quoted = await listed.start("CartAbandonment", f"o'brien-{tag}", step, "cart-abandonment")

    async def visible() -> str | None:
        out = ok(await kaeru_async("journeys", "list", "--step", step, **env))
        return out if plain in out and quoted in out else None

    await until(visible, "both journeys are visible")
    # A customer id with a quote is found, and only its journey.
    out = ok(
        await kaeru_async(
            "journeys",
            "list",
            "--customer",
            f"o'brien-{tag}",
            **env,
            KAERU_PSEUDONYMOUS_IDS="never",
        )
    )
    assert quoted in out and plain not in out

    injection = f"nobody' OR KaeruStep = '{step}"
    # Pasted into the query as it is, the value would widen it to every journey at the step:
    naive = f"KaeruCustomerId = '{injection}'"
    widened = [w.id async for w in listed.client.list_workflows(naive)]
    assert plain in widened
    out = ok(await kaeru_async("journeys", "list", "--customer", injection, **env))
    assert plain not in out and quoted not in out and "No journey matches" in out
    out = ok(await kaeru_async("journeys", "list", "--step", injection, **env))
    assert plain not in out and "No journey matches" in out

    assert_clear_failure(
        await kaeru_async("journeys", "list", "--step", 'cart"email', **env),
        "--step 'cart\"email' cannot be searched",
    )


@pytest.mark.journeys("*")
async def test_a_personal_customer_id_is_searched_by_its_pseudonym(listed: Listed) -> None:
    env = listed.env
    address = f"ann-{listed.tag}@shop.test"
    visible = read_visible_ids(make_settings(env["KAERU_DATABASE_URL"]))
    shown = visible.visible(address)
    assert shown.startswith("p_")
    journey = await listed.start("CartAbandonment", shown, "cart_quiet", "cart-abandonment")

    async def found() -> str | None:
        out = ok(await kaeru_async("journeys", "list", "--customer", address, **env))
        return out if journey in out else None

    out = await until(found, "the journey is found by the clear id")
    assert address not in out


@pytest.mark.journeys("*")
async def test_show_says_when_no_worker_answers_the_status_query(listed: Listed) -> None:
    journey = await listed.start(
        "CartAbandonment", f"c-{listed.tag}", "started", "cart-abandonment"
    )
    out = ok(await kaeru_async("journeys", "show", journey, **listed.env))
    assert "temporal status: running" in out
    assert "status: not available:" in out and "is `kaeru worker` running" in out
    assert "events: 2" in out and "timers waiting: 0" in out and "last activity: none yet" in out
    assert f"/namespaces/default/workflows/{journey}" in out
    assert_clear_failure(
        await kaeru_async(
            "journeys", "show", journey, **listed.env, KAERU_TEMPORAL_NAMESPACE="nope"
        ),
        "Temporal refused",
        "KAERU_TEMPORAL_NAMESPACE",
    )
    assert_clear_failure(
        await kaeru_async("journeys", "list", **listed.env, KAERU_TEMPORAL_NAMESPACE="nope"),
        "KAERU_TEMPORAL_NAMESPACE",
    )


def test_journeys_list_says_which_setting_when_temporal_is_down(sqlite_url: str) -> None:
    env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": UNREACHABLE}
    assert_clear_failure(
        kaeru("journeys", "list", **env),
        "cannot reach Temporal at 127.0.0.1:1",
        "KAERU_TEMPORAL_ADDRESS",
    )
    assert_clear_failure(
        kaeru("journeys", "show", "cart-abandonment-c-1", **env), "KAERU_TEMPORAL_ADDRESS"
    )


# ---- journeys show and customers show: a real journey with its worker and SMTP ---------------


@dataclasses.dataclass
class Stack:
    shopper: Shopper
    env: dict[str, str]


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


@pytest.fixture
async def stack(
    dev_server_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Stack]:
    """A real worker on the dev server and a cart shopper whose first email is due a second
    after the cart; the shopper said yes to email."""
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    async with httpx.AsyncClient() as http, build_worker(dev_server_env.client, settings, http):
        shopper = Shopper(
            dev_server_env,
            sqlite_url,
            smtp,
            settings.task_queue,
            settings=dataclasses.replace(SETTINGS, email_delay=1.0),
        )
        with session(sqlite_url) as s:
            s.add(
                Customer(
                    customer_id=shopper.customer_id, email=shopper.email, timezone="Europe/Berlin"
                )
            )
            set_consent(s, shopper.customer_id, EMAIL, True, "identify")
        address = dev_server_env.client.service_client.config.target_host
        yield Stack(shopper, {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": address})
        with contextlib.suppress(RPCError):
            await shopper.handle.terminate("test over")


async def test_show_prints_a_journeys_status_story_history_and_ui_link(stack: Stack) -> None:
    shopper, env = stack.shopper, stack.env
    await shopper.cart("Product Added", **SHOE)
    await shopper.wait_for_emails(1)

    async def sent() -> bool:
        return any("sent the cart email" in line for line in (await shopper.status()).story)

    await until(sent, "the journey tells it sent the cart email")
    journey = shopper.journey_id

    async def listed() -> str | None:
        out = ok(await kaeru_async("journeys", "list", "--customer", shopper.customer_id, **env))
        return out if "cart_email" in out else None

    out = await until(listed, "the journey is listed at its step")
    [row] = [r for r in rows(out) if r[0] == journey]
    assert row[1:4] == ["cart-abandonment", "cart_email", "running"]

    out = ok(await kaeru_async("journeys", "show", journey, **env))
    assert f"{journey}  CartAbandonment (cart-abandonment)" in out
    assert "temporal status: running" in out
    assert "step: cart_email" in out
    assert "waiting for " in out
    assert "sent the cart email" in out  # a line of its story
    assert "timers waiting: 1" in out
    assert "last activity: " in out
    assert "KaeruStep: cart_email" in out
    assert f"KaeruCustomerId: {shopper.customer_id}" in out
    assert f"Temporal UI: http://localhost:8233/namespaces/default/workflows/{journey}" in out

    assert_clear_failure(
        await kaeru_async("journeys", "show", f"cart-abandonment-nobody-{uuid.uuid4().hex}", **env),
        "there is no journey with id",
        "kaeru journeys list --customer",
    )

    out = ok(await kaeru_async("customers", "show", shopper.customer_id, **env))
    assert f"Customer {shopper.customer_id}" in out
    assert shopper.email not in out  # masked
    assert f"{shopper.email[0]}***@shoppers.test" in out
    assert "timezone: Europe/Berlin" in out
    consent = {r[0]: r[1:3] for r in rows(out) if r[0] in ("email", "sms", "push")}
    assert consent == {
        "email": ["subscribed", "identify"],
        "sms": ["unknown", "-"],
        "push": ["unknown", "-"],
    }
    [journey_row] = [r for r in rows(out) if r[0] == journey]
    assert journey_row[1:4] == ["cart-abandonment", "cart_email", "running"]
    [message] = [r for r in rows(out) if len(r) > 3 and r[2] == journey]
    assert message[3] == "cart_email" and "sent" in message
    [touch] = [r for r in rows(out) if "email_sent" in r]
    assert touch[3:] == ["cart-abandonment", "cart_email", "email"]


async def test_show_lists_a_failing_activity_with_its_attempts_and_failure(
    dev_server_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    """The mail server refuses connections (a port bound, never listening): the send retries,
    and ``show`` says which activity, on which attempt, failed how."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        settings = make_settings(sqlite_url, smtp_port=closed.getsockname()[1])
        async with httpx.AsyncClient() as http, build_worker(dev_server_env.client, settings, http):
            shopper = Shopper(
                dev_server_env,
                sqlite_url,
                smtp,
                settings.task_queue,
                settings=dataclasses.replace(SETTINGS, email_delay=0.1),
            )
            with session(sqlite_url) as s:
                s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
            address = dev_server_env.client.service_client.config.target_host
            env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": address}
            try:
                await shopper.cart("Product Added", **SHOE)

                async def retried() -> bool:
                    pending = (await shopper.handle.describe()).raw_description.pending_activities
                    return any(p.attempt >= 2 and p.HasField("last_failure") for p in pending)

                await until(retried, "the send failed once and is retried")
                out = ok(await kaeru_async("journeys", "show", shopper.journey_id, **env))
            finally:
                with contextlib.suppress(RPCError):
                    await shopper.handle.terminate("test over")
    [row] = [r for r in rows(out) if r[0] == "send_email"]
    assert row[1] in ("scheduled", "started") and int(row[2]) >= 2
    assert "cannot talk to the SMTP server" in " ".join(row[3:])
    assert "pending activity" in out


# ---- customers show, audiences show and audit from the database alone (both databases) -------


def _message(customer_id: str, step: str, subject: str) -> EmailMessage:
    key = f"cart-abandonment-{customer_id}/run/{step}"
    return EmailMessage(
        key=key,
        message_id=f"<{uuid.uuid4().hex}@kaeru.test>",
        customer_id=customer_id,
        journey_id=f"cart-abandonment-{customer_id}",
        step=step,
        to_address=f"{customer_id}@shoppers.test",
        subject=subject,
        status="sent",
    )


def test_customers_show_reads_the_database_when_temporal_is_down(database_url: str) -> None:
    env = {"KAERU_DATABASE_URL": database_url, "KAERU_TEMPORAL_ADDRESS": UNREACHABLE}
    with session(database_url) as s:
        s.add(Customer(customer_id="c-7", email="bea@shop.test", traits={"first_name": "Bea"}))
        set_consent(s, "c-7", EMAIL, False, "one_click")
        set_consent(s, "c-7", SMS, True, "api")
        s.add(_message("c-7", "cart_email", "[Your cart] is waiting"))
        s.add(
            Touchpoint(
                customer_id="c-7",
                kind="email_open",
                journey_kind="cart-abandonment",
                step="cart_email",
            )
        )
    out = ok(kaeru("customers", "show", "c-7", **env))
    assert "bea@shop.test" not in out and "Bea" not in out
    assert "traits: first_name" in out
    consent = {r[0]: r[1:3] for r in rows(out) if r[0] in ("email", "sms", "push")}
    assert consent == {
        "email": ["unsubscribed", "one_click"],
        "sms": ["subscribed", "api"],
        "push": ["unknown", "-"],
    }
    assert "[Your cart] is waiting" in out  # the shop's text, not rich markup
    assert "email_open" in out
    assert "Journeys not listed: cannot reach Temporal" in " ".join(out.split())
    assert "KAERU_TEMPORAL_ADDRESS" in out
    assert "In no ad audience." in out

    assert_clear_failure(
        kaeru("customers", "show", "c-unknown", **env),
        "nothing is stored about customer 'c-unknown'",
    )
    with session(database_url) as s:  # an anonymous visitor: events, no profile
        s.add(Event(message_id="m-1", customer_id="anon-1", type="track", name="Product Viewed"))
    out = ok(kaeru("customers", "show", "anon-1", **env))
    assert "no profile (no identify yet)" in out and "events: 1, orders: 0" in out


def test_audiences_show_counts_per_platform_and_never_prints_an_address(database_url: str) -> None:
    env = {"KAERU_DATABASE_URL": database_url}
    member = "ann@shop.test"  # a shop whose ids are addresses
    with session(database_url) as s:
        for n, (customer, provider) in enumerate(
            [(member, "meta"), ("c-2", "meta"), ("c-2", "google"), ("c-3", "meta")]
        ):
            s.add(
                AudienceJoin(
                    key=f"k{n}",
                    journey_id=f"cart-abandonment-{customer}",
                    customer_id=customer,
                    audience="cart-retargeting",
                    provider=provider,
                    audience_id="123",
                    email_sha256="f" * 64,
                )
            )
        s.add(
            AudienceJoin(
                key="k-other",
                journey_id="win-back-c-9",
                customer_id="c-9",
                audience="win-back",
                provider="local",
                audience_id="win-back",
                email_sha256="e" * 64,
                left_at=utcnow(),
            )
        )
        s.add(
            AudienceChangeRow(
                key="q1",
                change_key="q1",
                journey_id="cart-abandonment-c-3",
                step="ad_leave",
                customer_id="c-3",
                audience="cart-retargeting",
                provider="meta",
                audience_id="123",
                email_sha256="f" * 64,
                joining=False,
            )
        )
    out = ok(kaeru("audiences", "show", **env))
    table = {(r[0], r[1]): r[2:] for r in rows(out)[1:]}
    assert table == {
        ("cart-retargeting", "google"): ["1", "0", "0", "0", "0"],
        ("cart-retargeting", "meta"): ["3", "0", "0", "0", "1"],
        ("win-back", "local"): ["0", "1", "0", "0", "0"],
    }
    out = ok(kaeru("audiences", "show", "cart-retargeting", **env))
    assert "cart-retargeting: 4 member(s) on 2 platform(s)." in out
    pseudonym = read_visible_ids(make_settings(database_url)).visible(member)
    assert pseudonym in out and member not in out and "f" * 64 not in out
    assert [r[-1] for r in rows(out) if r[0] == pseudonym] == ["cart-abandonment"]
    assert "leave" in out and "win-back" not in out
    assert "No one is or was in 'nope'." in ok(kaeru("audiences", "show", "nope", **env))


def test_audit_lists_what_operators_did(database_url: str) -> None:
    env = {"KAERU_DATABASE_URL": database_url, "KAERU_TEMPORAL_ADDRESS": UNREACHABLE}
    assert "No audit entries yet." in ok(kaeru("audit", **env))
    ok(kaeru("kill-switch", "on", "--reason", "wrong prices", **env))
    ok(kaeru("kill-switch", "on", "--kind", "cart-abandonment", **env))
    out = ok(kaeru("audit", **env))
    newest, oldest = rows(out)[1:]
    assert newest[2:5] == [cli_actor(), "kill_switch.on", "cart-abandonment"]
    assert oldest[2:5] == [cli_actor(), "kill_switch.on", "*"]
    assert '"reason": "wrong prices"' in out
    only = ok(kaeru("audit", "--limit", "1", **env))
    assert "cart-abandonment" in only and "wrong prices" not in only
    assert "No audit entries match." in ok(kaeru("audit", "--action", "journey.", **env))
    assert "No audit entries match." in ok(kaeru("audit", "--actor", "cli:nobody", **env))
    assert "wrong prices" in ok(kaeru("audit", "--action", "kill_switch.", **env))
