"""A withdrawal of consent reaches journeys: asleep, they end ``unsubscribed`` and leave their
ad audiences (Meta and Google, through loopback servers shaped like their APIs); the send gate
and the audience join refuse a customer without consent; the order confirmation is still sent.

Time-skipping server with the real activities; the end-to-end part (the consent API and an
identify, through the router) runs on the dev server with the whole API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.ads import email_sha256
from activities.google_ads import google_email_sha256
from kaeru.consent import CONSENT_WITHDRAWN, set_consent
from kaeru.db import session
from kaeru.journeys import deliveries
from kaeru.models import Customer, EmailMessage
from kaeru.settings import Settings
from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, asgi_client
from tests.support.google_ads_api import GoogleAdsServer
from tests.support.graph_api import GraphAPIServer
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import (
    DAY,
    SHOE,
    Shopper,
    flushing,
    reach_ad_audience,
    record_histories,
)
from tests.workflows.test_order_confirmation import ORDER, Buyer
from worker import build_worker
from workflows.cart_abandonment import CartAbandonment
from workflows.kit import JourneyResult


@pytest.fixture
def graph() -> Iterator[GraphAPIServer]:
    with GraphAPIServer() as server:
        yield server


@contextlib.asynccontextmanager
async def cart_shopper(
    env: WorkflowEnvironment, url: str, smtp: SMTPTestServer, **overrides: Any
) -> AsyncIterator[Shopper]:
    """A cart-abandonment shopper whose worker runs with ``overrides`` (Meta, consent)."""
    settings = make_settings(url, smtp_port=smtp.port, **overrides)
    async with httpx.AsyncClient() as http, build_worker(env.client, settings, http):
        shopper = Shopper(env, url, smtp, settings.task_queue)
        with session(url) as s:
            s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
        try:
            yield shopper
        finally:
            with contextlib.suppress(RPCError):
                await shopper.handle.terminate("test over")
            await record_histories(env.client, shopper.journey_id)


def consent(url: str, customer_id: str, subscribed: bool, kind: str | None = None) -> None:
    with session(url) as s:
        set_consent(s, customer_id, "email", subscribed, "api", kind=kind)


@pytest.mark.journeys("*")
def test_a_withdrawal_reaches_live_marketing_journeys_only_and_starts_none() -> None:
    targets = deliveries(CONSENT_WITHDRAWN, "u1", {"channel": "email", "kind": None})
    kinds = {target.route.kind for target in targets}
    assert "cart-abandonment" in kinds and "welcome" in kinds
    assert "order-confirmation" not in kinds  # transactional: consent is not its business
    assert not any(target.start for target in targets)


async def told(shopper: Shopper, words: str) -> None:
    """Wait (in real time) until the journey's story says ``words``."""
    for _ in range(200):
        if any(words in line for line in (await shopper.status()).story):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the story never said {words!r}")


async def eventually(check: Callable[[], bool]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.05)
    assert check()


async def test_a_withdrawal_while_asleep_ends_the_journey_and_it_leaves_its_audiences(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    graph: GraphAPIServer,
) -> None:
    """The journey's audience goes to Meta and Google Customer Match: the shopper joins both
    (the journey waits for the flush), and leaving at the end covers both."""
    with GoogleAdsServer() as google:
        both = {
            "meta_graph_url": graph.url,
            "meta_access_token": graph.token,
            "meta_audience_id": graph.audience_id,
            **google.settings(),
        }
        async with (
            flushing(make_settings(sqlite_url, **both)),
            cart_shopper(time_skipping_env, sqlite_url, smtp, **both) as shopper,
        ):
            await reach_ad_audience(shopper)
            await told(shopper, "added the shopper to the cart-retargeting audience (meta")
            assert graph.member_hashes() == {email_sha256(shopper.email)}
            assert google.members == {google_email_sha256(shopper.email)}

            await shopper.signal(CONSENT_WITHDRAWN, channel="email", kind=None, source="api")

            assert await shopper.outcome() == "unsubscribed"
            await eventually(lambda: not graph.member_hashes() and not google.members)
            assert graph.requests[-1].method == "DELETE"
            assert len(google.runs()) == 2  # one job to add, one to remove
            assert len(shopper.emails()) == 1  # only the cart email, sent before
            story = (await shopper.status()).story
    assert any("the shopper unsubscribed" in line for line in story)
    assert any("joins the cart-retargeting audience at the next flush" in line for line in story)
    assert any("leaves the cart-retargeting audience at the next flush" in line for line in story)


@pytest.mark.parametrize(
    "withdrawal",
    [
        {"channel": "sms", "kind": None},
        {"channel": "email", "kind": "welcome"},
    ],
)
async def test_a_withdrawal_for_another_channel_or_kind_does_not_end_it(
    shopper: Shopper, withdrawal: dict[str, Any]
) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.signal(CONSENT_WITHDRAWN, source="api", **withdrawal)
    await shopper.skip(DAY + 60)
    await shopper.wait_for_emails(1)
    assert (await shopper.status()).outcome is None


async def test_a_withdrawal_of_its_own_kind_ends_it(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    await shopper.signal(
        CONSENT_WITHDRAWN, channel="email", kind=CartAbandonment.kind, source="preference_page"
    )
    assert await shopper.outcome() == "unsubscribed"
    assert shopper.emails() == []


async def test_the_gate_refuses_a_customer_who_unsubscribed_before_the_event_came(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    """The unsubscribe is stored, its event not delivered (yet): the send gate reads consent
    at the email step and ends the journey (tests/activities/test_email.py has the last check,
    at the send itself)."""
    async with cart_shopper(
        time_skipping_env, sqlite_url, smtp, unknown_consent_is_yes=False
    ) as shopper:
        consent(sqlite_url, shopper.customer_id, True)
        await shopper.cart("Product Added", **SHOE)
        consent(sqlite_url, shopper.customer_id, False)
        await shopper.skip(DAY + 60)

        assert await shopper.outcome() == "unsubscribed"
        assert shopper.emails() == []
        with session(sqlite_url) as s:
            logged = s.exec(
                select(EmailMessage).where(EmailMessage.customer_id == shopper.customer_id)
            ).all()
        assert logged == []  # refused before the send: nothing to send was ever logged
        story = (await shopper.status()).story
        assert any("unsubscribed from email marketing (api" in line for line in story), story


async def test_unknown_consent_gets_no_marketing_by_default(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    async with cart_shopper(
        time_skipping_env, sqlite_url, smtp, unknown_consent_is_yes=False
    ) as shopper:
        await shopper.cart("Product Added", **SHOE)
        await shopper.skip(DAY + 60)
        assert await shopper.outcome() == "unsubscribed"
        assert shopper.emails() == []


async def test_an_unsubscribe_before_the_ad_step_keeps_the_shopper_out_of_the_audience(
    time_skipping_env: WorkflowEnvironment,
    sqlite_url: str,
    smtp: SMTPTestServer,
    graph: GraphAPIServer,
) -> None:
    meta = {
        "meta_graph_url": graph.url,
        "meta_access_token": graph.token,
        "meta_audience_id": graph.audience_id,
        "unknown_consent_is_yes": False,
    }
    async with cart_shopper(time_skipping_env, sqlite_url, smtp, **meta) as shopper:
        consent(sqlite_url, shopper.customer_id, True)
        await shopper.cart("Product Added", **SHOE)
        await shopper.skip(DAY + 60)
        await shopper.wait_for_step("cart_email")
        await shopper.opened()
        consent(sqlite_url, shopper.customer_id, False)  # its event not delivered
        await shopper.skip(DAY + 60)

        assert await shopper.outcome() == "unsubscribed"  # no wait for ad clicks
        assert graph.requests == []  # neither added nor "removed"
        story = (await shopper.status()).story
        assert any("not added to the" in line for line in story)


@pytest.mark.journeys("order-confirmation")
async def test_the_order_confirmation_still_goes_to_an_unsubscribed_customer(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    settings = make_settings(sqlite_url, smtp_port=smtp.port, unknown_consent_is_yes=False)
    buyer = Buyer(time_skipping_env, smtp, settings, f"c-{uuid.uuid4().hex[:8]}")
    with session(sqlite_url) as s:
        s.add(Customer(customer_id=buyer.customer_id, email=buyer.address))
    consent(sqlite_url, buyer.customer_id, False)
    try:
        async with buyer.working():
            await buyer.orders(**ORDER)
            # Not even routed to it, and the kit would ignore it if it were.
            assert await buyer.route(buyer.event(CONSENT_WITHDRAWN, channel="email")) == 0
            assert await buyer.outcome() == "confirmed"
        assert len(buyer.emails()) == 1
    finally:
        with contextlib.suppress(RPCError):
            await buyer.handle.terminate("test over")


# ---- end to end: the consent API and an identify, through the router --------------------------


@contextlib.asynccontextmanager
async def whole_stack(env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Any]:
    async with httpx.AsyncClient() as http, build_worker(env.client, settings, http):
        async with asgi_client(create_app(settings, env.client)) as api:
            yield api


def cart_of(env: WorkflowEnvironment, customer_id: str) -> WorkflowHandle[Any, JourneyResult]:
    return env.client.get_workflow_handle(
        f"cart-abandonment-{customer_id}", result_type=JourneyResult
    )


async def asleep(handle: WorkflowHandle[Any, JourneyResult]) -> None:
    for _ in range(200):
        with contextlib.suppress(RPCError):
            status: Any = await handle.query("status")
            if status["waiting_for"]:
                return
        await asyncio.sleep(0.05)
    raise AssertionError("the journey never went to sleep")


@pytest.mark.parametrize("how", ["api", "identify"])
async def test_an_unsubscribe_through_the_api_or_an_identify_ends_a_sleeping_journey(
    dev_server_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer, how: str
) -> None:
    settings = make_settings(sqlite_url, smtp_port=smtp.port, unknown_consent_is_yes=False)
    customer_id = f"u-{uuid.uuid4().hex[:8]}"
    async with whole_stack(dev_server_env, settings) as api:
        said = await api.post(
            "/v1/identify",
            json={
                "userId": customer_id,
                "traits": {"email": f"{customer_id}@example.com", "marketing_consent": True},
            },
            auth=AUTH,
        )
        assert said.status_code == 200
        added = {
            "userId": customer_id,
            "event": "Product Added",
            "properties": {"product_id": "mug", "name": "Mug", "price": 12.5},
        }
        assert (await api.post("/v1/track", json=added, auth=AUTH)).status_code == 200
        handle = cart_of(dev_server_env, customer_id)
        await asleep(handle)  # the cart email waits a day (the production default)

        if how == "api":
            answer = await api.put(
                f"/v1/customers/{customer_id}/consent", json={"subscribed": False}, auth=AUTH
            )
        else:
            answer = await api.post(
                "/v1/identify",
                json={"userId": customer_id, "traits": {"marketing_consent": False}},
                auth=AUTH,
            )
        assert answer.status_code == 200, answer.text

        result = await asyncio.wait_for(handle.result(), 30)
        assert result.outcome == "unsubscribed"
        assert smtp.messages == []


# ---- complaints and bounces while a journey sleeps ----------------------------------------------


def ses_notification(kind: str, address: str, detail: dict[str, Any]) -> dict[str, Any]:
    """An SES notification in its SNS envelope (tests/starter/test_feedback.py has the shapes)."""
    body = {
        "notificationType": kind,
        "mail": {"messageId": "ses-id", "destination": [address], "headers": []},
        kind.lower(): {"feedbackId": f"fb-{uuid.uuid4()}", **detail},
    }
    return {"Type": "Notification", "MessageId": str(uuid.uuid4()), "Message": json.dumps(body)}


async def test_a_hard_bounce_while_asleep_stops_the_next_email(shopper: Shopper) -> None:
    await shopper.cart("Product Added", **SHOE)
    bounce = ses_notification(
        "Bounce",
        shopper.email,
        {"bounceType": "Permanent", "bouncedRecipients": [{"emailAddress": shopper.email}]},
    )
    settings = make_settings(shopper.db)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await api.post("/v1/feedback/webhook", json=bounce, auth=AUTH)
        assert answer.status_code == 200, answer.text

    await shopper.skip(DAY + 60)

    assert await shopper.outcome() == "undeliverable"
    assert shopper.emails() == []
    story = (await shopper.status()).story
    assert any("suppression list (reason: hard_bounce)" in line for line in story)


async def test_a_complaint_after_the_cart_email_keeps_the_shopper_out_of_the_audience(
    shopper: Shopper,
) -> None:
    """The complaint's withdrawal is not routed here (no router): the next marketing step,
    the ad audience, is refused on its own."""
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    [cart_email] = await shopper.wait_for_emails(1)
    await shopper.opened()
    report = MIMEMultipart("report", report_type="feedback-report")
    report.attach(MIMEText("An abuse report"))
    fields = MIMEBase("message", "feedback-report")
    fields.set_payload("Feedback-Type: abuse\r\nUser-Agent: Mailbox/1\r\nVersion: 1\r\n")
    report.attach(fields)
    report.attach(MIMEMessage(cart_email))
    settings = make_settings(shopper.db)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await api.post(
            "/v1/feedback/arf",
            content=report.as_bytes(),
            headers={"Content-Type": "message/rfc822"},
            auth=AUTH,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["matched"] is True

    await shopper.skip(DAY + 60)

    assert await shopper.outcome() == "unsubscribed"
    assert shopper.audience() == []
    assert shopper.touchpoints("audience_joined") == []
    story = (await shopper.status()).story
    assert any("not added to the" in line for line in story)
