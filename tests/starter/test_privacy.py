"""The shopper's rights: export and erase (starter/privacy.py), through the API and the CLI.

Real parts: the API over ASGI on SQLite and PostgreSQL, the cart journey on the time-skipping
Temporal server with the payload codec on, a Graph-shaped ad platform on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from sqlmodel import col, select
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.ads import AudienceActivities, email_sha256
from activities.types import SweepInput
from kaeru.cli import app
from kaeru.codec import ENCODING, ERASED_METADATA, ERASED_TEXT, codec_for
from kaeru.db import migrate, session
from kaeru.models import (
    AudienceChangeRow,
    AudienceJoin,
    AudienceMember,
    CartItem,
    Consent,
    ConsentChange,
    Coupon,
    Customer,
    CustomerKey,
    CustomerRouting,
    EmailMessage,
    Event,
    IdentityAlias,
    JourneyEntry,
    Order,
    Touchpoint,
    TrackingLink,
)
from kaeru.pseudonyms import pseudonym_key
from kaeru.settings import Settings
from kaeru.temporal import converter, journey_kinds
from kaeru.touchpoints import record_touchpoint
from starter.app import create_app
from starter.consent_changes import record_consent_change
from starter.privacy import erase_customer, pseudonym
from tests.conftest import make_settings
from tests.kaeru.test_cli import assert_clear_failure, clean_environment, kaeru, runner
from tests.starter.conftest import AUTH, OPERATOR, asgi_client
from tests.support.codec import CodecEnv, codec_client, history_payloads, new_master_key
from tests.support.graph_api import BAD_TOKEN, GraphAPIServer
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import SHOE, Shopper, flushing, reach_ad_audience
from worker import PASSTHROUGH, build_worker, workflows


class Customer42(Shopper):
    """A shopper whose address ingestion accepts (``.test`` is a reserved name)."""

    @property
    def email(self) -> str:
        return f"{self.customer_id}@example.com"


@dataclass
class Shop:
    """One shopper's journey with the codec on, the API beside it."""

    shopper: Shopper
    settings: Settings
    api: httpx.AsyncClient
    graph: GraphAPIServer
    raw: Client  # the same server without the codec: what Temporal stores

    @property
    def customer_id(self) -> str:
        return self.shopper.customer_id

    @property
    def anonymous_id(self) -> str:
        return f"anon-of-{self.customer_id}"

    async def send(self, path: str, **body: Any) -> None:
        answer = await self.api.post(
            f"/v1/{path}", json={"messageId": f"m-{uuid.uuid4()}", **body}, auth=AUTH
        )
        assert answer.status_code == 200, answer.text

    async def arrives(self) -> None:
        """A visit before signing in, the sign-up, a cart: as the shop's tracking sends them."""
        await self.send(
            "track", anonymousId=self.anonymous_id, event="Product Viewed", properties=SHOE
        )
        await self.send(
            "identify",
            userId=self.customer_id,
            anonymousId=self.anonymous_id,
            traits={"email": self.shopper.email, "first_name": "Ann", "marketing_consent": True},
        )
        await self.send("track", userId=self.customer_id, event="Product Added", properties=SHOE)
        # Ingestion does not read consent traits yet (stream C): the API's way.
        record_consent_change(self.settings, self.customer_id, "email", True, "api")
        assert self.rows(Consent) and self.rows(CartItem) and self.rows(Event)

    def rows(self, model: Any, customer_id: str | None = None) -> list[Any]:
        with session(self.settings.resolved_database_url) as s:
            query = select(model).where(model.customer_id == (customer_id or self.customer_id))
            return list(s.exec(query))


__all__ = ["clean_environment"]  # the CLI tests' fixture: no KAERU_ variable leaks in

#: Every table with a customer id: after an erase, none holds a row of theirs.
PERSONAL = (
    Customer,
    CartItem,
    Consent,
    Event,
    EmailMessage,
    Touchpoint,
    AudienceJoin,
    AudienceMember,
    ConsentChange,
    JourneyEntry,
    CustomerKey,
    Order,
    Coupon,
    CustomerRouting,
)


@pytest.fixture
async def shop(time_skipping_env: WorkflowEnvironment, database_url: str) -> AsyncIterator[Shop]:
    with GraphAPIServer() as graph:
        async with SMTPTestServer() as smtp:
            settings = make_settings(
                database_url,
                smtp_port=smtp.port,
                codec_master_key=new_master_key(),
                meta_graph_url=graph.url,
                meta_access_token=graph.token,
                meta_audience_id=graph.audience_id,
            )
            client = codec_client(time_skipping_env.client, settings)
            env = cast(WorkflowEnvironment, CodecEnv(time_skipping_env, client))
            app = create_app(settings, client, run_router=False)
            async with (
                httpx.AsyncClient() as http,
                build_worker(client, settings, http),
                flushing(settings),
                asgi_client(app) as api,
            ):
                shopper = Customer42(
                    env,
                    database_url,
                    smtp,
                    settings.task_queue,
                    customer_id=f"ann-{uuid.uuid4().hex[:6]}",
                )
                yield Shop(shopper, settings, api, graph, time_skipping_env.client)
                with contextlib.suppress(RPCError):
                    await shopper.handle.terminate("test over")


# ---- erase ------------------------------------------------------------------------------------


async def test_erase_while_a_journey_sleeps(shop: Shop) -> None:
    shopper, cid = shop.shopper, shop.customer_id
    await shop.arrives()
    await reach_ad_audience(shopper)  # emailed, opened, in the Meta audience, asleep
    hashed = email_sha256(shopper.email)
    assert hashed in shop.graph.member_hashes()
    raw = shop.raw.get_workflow_handle(shopper.journey_id)
    before = history_payloads(await raw.fetch_history())
    assert before and [path for path, p in before if p.metadata["encoding"] != ENCODING] == []
    with session(shop.settings.resolved_database_url) as s:
        alias = pseudonym(pseudonym_key(s), cid)

    answer = await shop.api.delete(f"/v1/customers/{cid}", headers=OPERATOR)

    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["journeys_ended"] == 1 and report["keys_shredded"] == 1
    assert report["audiences_left"] == 1 and report["audiences_parked"] == 0
    assert report["ids"] == 2  # the customer and the anonymous id merged into them
    # The journey ended, at once: it sends nothing more.
    description = await raw.describe()
    assert description.status == WorkflowExecutionStatus.TERMINATED
    # Out of the ad audience.
    assert hashed not in shop.graph.member_hashes()
    with session(shop.settings.resolved_database_url) as s:
        queued = list(s.exec(select(AudienceChangeRow)))
    assert all(row.customer_id != cid and row.applied_at is None for row in queued)
    # Personal data gone, for the customer and for their anonymous id.
    for who in (cid, shop.anonymous_id):
        for model in PERSONAL:
            assert shop.rows(model, who) == [], model
    with session(shop.settings.resolved_database_url) as s:
        assert s.exec(select(IdentityAlias)).all() == []
        dumped = json.dumps(
            [
                r.model_dump(mode="json")
                for m in (Event, EmailMessage, Touchpoint, AudienceJoin, JourneyEntry, TrackingLink)
                for r in s.exec(select(m))
            ]
        )
    assert cid not in dumped and shopper.email not in dumped and "Ann" not in dumped
    # Anonymous counts stay: the events by type, the messages by status, under the pseudonym.
    events = shop.rows(Event, alias)
    assert {e.name for e in events} == {"Product Added", None}  # the identify has no name
    assert all(e.payload == {} and e.routed_at is not None for e in events)
    [message] = shop.rows(EmailMessage, alias)
    assert (message.status, message.to_address, message.subject) == ("sent", "", "")
    assert message.journey_id == f"cart-abandonment-{alias}"
    kinds = {t.kind for t in shop.rows(Touchpoint, alias)}
    assert {"email_sent", "audience_joined", "audience_left"} <= kinds
    [join] = shop.rows(AudienceJoin, alias)
    assert join.left_at is not None and join.email_sha256 == ""
    # The history's payloads no longer decrypt: not here, not through the codec server.
    codec = codec_for(shop.settings, journey_kinds(shop.settings))
    assert codec is not None
    decoded = await codec.decode([p for _, p in before])
    assert all(ERASED_METADATA in p.metadata for p in decoded)
    body = MessageToDict(Payloads(payloads=[p for _, p in before]))
    served = await shop.api.post(
        "/codec/decode", json=body, headers={**OPERATOR, "X-Namespace": "default"}
    )
    assert served.status_code == 200
    texts = [json.loads(base64.b64decode(p["data"])) for p in served.json()["payloads"]]
    assert texts == [ERASED_TEXT] * len(before)
    assert b"Trail Shoe" not in served.content and shopper.email.encode() not in served.content
    # Nothing left to export.
    assert (await shop.api.get(f"/v1/customers/{cid}/export", headers=OPERATOR)).status_code == 404
    # A worker that had to replay the erased journey fails that task, and says why.
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
        data_converter=converter(shop.settings),
    )
    replayed = await replayer.replay_workflow(
        await raw.fetch_history(), raise_on_replay_failure=False
    )
    assert replayed.replay_failure is not None


async def test_erase_parks_a_removal_the_ad_platform_refuses(shop: Shop) -> None:
    shopper = shop.shopper
    await shop.arrives()
    await reach_ad_audience(shopper)
    hashed = email_sha256(shopper.email)
    shop.graph.answer_next(BAD_TOKEN)

    answer = await shop.api.delete(f"/v1/customers/{shop.customer_id}", headers=OPERATOR)

    assert answer.status_code == 200, answer.text
    assert (answer.json()["audiences_left"], answer.json()["audiences_parked"]) == (0, 1)
    assert hashed in shop.graph.member_hashes()  # still there: Meta refused
    with session(shop.settings.resolved_database_url) as s:
        [join] = s.exec(select(AudienceJoin)).all()
    # Parked under the pseudonym, with the hash the sweeper removes it by.
    assert join.customer_id.startswith("anon-") and join.email_sha256 == hashed
    assert join.left_at is None and join.retry_at is not None
    assert "erase" in (join.removal_error or "")

    # The audience sweeper's next run takes them out.
    async with httpx.AsyncClient() as http:
        ads = AudienceActivities(shop.settings, http)
        result = await ActivityEnvironment().run(ads.retry_audience_removals, SweepInput())
    assert result.removed == 1
    assert hashed not in shop.graph.member_hashes()


async def test_erase_again_finds_nothing_more(shop: Shop) -> None:
    await shop.arrives()
    url = f"/v1/customers/{shop.customer_id}"
    assert (await shop.api.delete(url, headers=OPERATOR)).status_code == 200

    again = await shop.api.delete(url, headers=OPERATOR)

    assert again.status_code == 200
    body = again.json()
    assert (body["journeys_ended"], body["keys_shredded"], body["rows"]) == (0, 0, {})


async def test_erase_records_that_consent_ended_without_the_customer(shop: Shop) -> None:
    await shop.arrives()
    await shop.api.delete(f"/v1/customers/{shop.customer_id}", headers=OPERATOR)
    with session(shop.settings.resolved_database_url) as s:
        changes = s.exec(select(ConsentChange).order_by(col(ConsentChange.changed_at))).all()
    assert [(c.state, c.source) for c in changes][-1] == ("unsubscribed", "erase")
    assert {c.customer_id for c in changes} == {changes[0].customer_id}
    assert changes[0].customer_id.startswith("anon-")


async def test_erase_without_temporal_deletes_nothing(database_url: str) -> None:
    settings = make_settings(database_url, temporal_address="127.0.0.1:1")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        stored = await api.post(
            "/v1/identify",
            json={"messageId": "m-1", "userId": "bo", "traits": {"email": "bo@example.com"}},
            auth=AUTH,
        )
        assert stored.status_code == 200

        answer = await api.delete("/v1/customers/bo", headers=OPERATOR)

        assert answer.status_code == 503
        assert answer.json()["code"] == "temporal_unavailable"
        assert "nothing was deleted" in answer.json()["message"]
        assert (await api.get("/v1/customers/bo", headers=OPERATOR)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"), [("DELETE", "/v1/customers/bo"), ("GET", "/v1/customers/bo/export")]
)
async def test_export_and_erase_need_the_operator_token(
    database_url: str, method: str, path: str
) -> None:
    async with asgi_client(create_app(make_settings(database_url), run_router=False)) as api:
        for headers in ({}, {"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"}):
            answer = await api.request(method, path, headers=headers)
            assert answer.status_code == 401
            assert answer.json()["code"] == "unauthorized"


# ---- export -----------------------------------------------------------------------------------


async def test_export_contains_every_part(database_url: str) -> None:
    settings = make_settings(database_url)
    async with asgi_client(create_app(settings, run_router=False)) as api:

        async def send(path: str, **body: Any) -> None:
            body = {"messageId": f"m-{uuid.uuid4()}", **body}
            assert (await api.post(f"/v1/{path}", json=body, auth=AUTH)).status_code == 200

        await send("track", anonymousId="a-1", event="Product Viewed", properties=SHOE)
        await send(
            "identify",
            userId="cy",
            anonymousId="a-1",
            traits={"email": "cy@example.com", "marketing_consent": True},
        )
        await send("track", userId="cy", event="Product Added", properties=SHOE)
        await send(
            "track",
            userId="cy",
            event="Order Completed",
            properties={"order_id": "o-5", "total": 89.5, "currency": "USD", "products": [SHOE]},
        )
        record_consent_change(settings, "cy", "email", True, "api")
        record_consent_change(settings, "cy", "email", False, "preference_page", kind="welcome")
        with session(settings.resolved_database_url) as s:
            s.add(
                EmailMessage(
                    key="cart-abandonment-cy/r1/cart_email",
                    message_id="<x@kaeru>",
                    customer_id="cy",
                    journey_id="cart-abandonment-cy",
                    step="cart_email",
                    to_address="cy@example.com",
                    subject="Your cart",
                    status="sent",
                )
            )
            s.add(Touchpoint(customer_id="cy", kind="email_sent", journey_id="cart-abandonment-cy"))
            s.add(
                AudienceMember(
                    audience="cart",
                    customer_id="cy",
                    email_sha256=email_sha256("cy@example.com"),
                    journey_id="cart-abandonment-cy",
                )
            )

        answer = await api.get("/v1/customers/cy/export", headers=OPERATOR)

    assert answer.status_code == 200
    export = answer.json()
    assert export["profile"]["email"] == "cy@example.com"
    assert [a["anonymous_id"] for a in export["aliases"]] == ["a-1"]
    assert {(c["channel"], c["state"]) for c in export["consent"]} >= {("email", "subscribed")}
    assert [c["source"] for c in export["consent_history"]][-1] == "preference_page"
    events = {(e["customer_id"], e["name"]) for e in export["events"]}
    assert {("a-1", "Product Viewed"), ("cy", "Product Added"), ("cy", "Order Completed")} <= events
    assert [(m["subject"], m["to_address"]) for m in export["messages"]] == [
        ("Your cart", "cy@example.com")
    ]
    # The order is a purchase touch too (stored at ingestion, before the test's email row).
    assert [t["kind"] for t in export["touchpoints"]] == ["purchase", "email_sent"]
    assert [a["audience"] for a in export["audiences"]] == ["cart"]
    [order] = export["orders"]
    assert (order["order_id"], order["total_minor"], order["lines"][0]["product_id"]) == (
        "o-5",
        8950,
        "shoe",
    )
    assert export["cart"] == []  # the order emptied it
    json.dumps(export)  # all of it is JSON


async def test_export_of_an_unknown_customer_is_a_clear_404(database_url: str) -> None:
    async with asgi_client(create_app(make_settings(database_url), run_router=False)) as api:
        answer = await api.get("/v1/customers/nobody/export", headers=OPERATOR)
    assert answer.status_code == 404
    assert answer.json() == {
        "code": "not_found",
        "message": "nothing is stored about customer 'nobody'",
    }


async def test_erase_in_process_reports_counts_only(shop: Shop) -> None:
    await shop.arrives()
    report = await erase_customer(shop.settings, shop.raw, shop.customer_id)
    text = json.dumps(report.__dict__)
    assert shop.customer_id not in text and "anon" not in text
    # The customer and their anonymous id (a profile each); the view, the identify, the
    # identity merge it stored and the cart.
    assert report.rows["customers"] == 2 and report.rows["events"] == 4
    assert shop.rows(Order) == []


async def test_erase_keeps_what_an_entry_says_of_the_experiment(shop: Shop) -> None:
    """The experiment results still count an erased customer in their arm (as a pseudonym)."""
    await shop.arrives()
    arms = {"cart_subject": "asks_a_question"}
    with session(shop.settings.resolved_database_url) as s:
        record_touchpoint(
            s,
            customer_id=shop.customer_id,
            kind="journey_entered",
            journey_kind="cart-abandonment",
            variant="asks_a_question",
            detail={"version": "1", "arms": arms, "note": f"about {shop.customer_id}"},
        )
    await erase_customer(shop.settings, shop.raw, shop.customer_id)
    with session(shop.settings.resolved_database_url) as s:
        [row] = s.exec(select(Touchpoint).where(Touchpoint.kind == "journey_entered")).all()
    assert row.customer_id != shop.customer_id
    assert (row.variant, row.detail) == ("asks_a_question", {"version": "1", "arms": arms})


# ---- the CLI ----------------------------------------------------------------------------------


def cli_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    with session(url) as s:
        s.add(Customer(customer_id="dee", email="dee@example.com", traits={"first_name": "Dee"}))
    record_consent_change(make_settings(url), "dee", "email", True, "api")
    return url


def test_cli_export_prints_json(tmp_path: Path, clean_environment: None) -> None:
    url = cli_database(tmp_path)
    result = kaeru("customers", "export", "dee", KAERU_DATABASE_URL=url)
    assert result.exit_code == 0, result.output
    export = json.loads(result.stdout)
    assert export["profile"]["traits"] == {"first_name": "Dee"}
    assert [c["state"] for c in export["consent"]] == ["subscribed"]

    unknown = kaeru("customers", "export", "nobody", KAERU_DATABASE_URL=url)
    assert_clear_failure(unknown, "nothing is stored about customer 'nobody'")


def test_cli_erase_asks_first_then_erases(
    tmp_path: Path, clean_environment: None, time_skipping_env: WorkflowEnvironment
) -> None:
    url = cli_database(tmp_path)
    env = {
        "KAERU_DATABASE_URL": url,
        "KAERU_TEMPORAL_ADDRESS": time_skipping_env.client.service_client.config.target_host,
    }
    declined = runner.invoke(app, ["customers", "erase", "dee"], env=env, input="n\n")
    assert_clear_failure(declined, "nothing was erased", "--yes")
    with session(url) as s:
        assert s.get(Customer, "dee") is not None

    result = kaeru("customers", "erase", "dee", "--yes", **env)

    assert result.exit_code == 0, result.output
    assert "Erased: 0 journey(s) ended" in result.stdout and "customers 1" in result.stdout
    assert "dee" not in result.stdout
    with session(url) as s:
        assert s.get(Customer, "dee") is None


def test_cli_erase_without_temporal_is_one_clear_line(
    tmp_path: Path, clean_environment: None
) -> None:
    url = cli_database(tmp_path)
    result = kaeru(
        "customers",
        "erase",
        "dee",
        "--yes",
        KAERU_DATABASE_URL=url,
        KAERU_TEMPORAL_ADDRESS="127.0.0.1:1",
    )
    assert_clear_failure(result, "cannot reach Temporal at 127.0.0.1:1")
    with session(url) as s:
        assert s.get(Customer, "dee") is not None
