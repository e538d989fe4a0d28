"""Pseudonymous journey ids end to end (kaeru/pseudonyms.py): the real API and router, the
production worker and Temporal's dev server (its visibility store answers list queries).

A customer whose id is an email address gets journeys that show only a keyed pseudonym in
Temporal; a journey started under the clear id before the change keeps getting its events;
erase ends journeys under either id and leaves nothing readable of the id in visibility.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.client import (
    Client,
    DescribeWorkflowInput,
    Interceptor,
    OutboundInterceptor,
    SignalWorkflowInput,
    StartWorkflowInput,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from kaeru.codec import ENCODING, ERASED_METADATA, codec_for
from kaeru.db import session
from kaeru.journeys import registry
from kaeru.models import CustomerKey
from kaeru.pseudonyms import pseudonym_key, visible_customer_id
from kaeru.settings import Settings
from kaeru.temporal import journey_kinds
from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, OPERATOR, asgi_client
from tests.support.codec import codec_client, history_payloads, new_master_key
from tests.support.smtp import SMTPTestServer
from worker import build_worker
from workflows.cart_abandonment import CartAbandonment
from workflows.kit import CUSTOMER_ID, JourneyResult, JourneyStatus

KIND = CartAbandonment.kind


def email_id() -> str:
    """A customer id that is an email address, as many shops send ``userId``."""
    return f"ann.{uuid.uuid4().hex[:8]}@example.com"


def added(customer_id: str, product: str = "mug") -> dict[str, Any]:
    return {
        "type": "track",
        "userId": customer_id,
        "event": "Product Added",
        "properties": {"product_id": product, "name": product.title(), "price": 12.5},
    }


def ordered(customer_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": customer_id,
        "event": "Order Completed",
        "properties": {"order_id": f"order-{uuid.uuid4().hex[:6]}", "total": 12.5},
    }


@dataclass
class Shop:
    settings: Settings
    #: The dev server's client with the codec (what the API and the worker use).
    client: Client
    #: The same server without the codec: what Temporal's visibility store holds.
    raw: Client

    def pseudonym(self, customer_id: str) -> str:
        with session(self.settings.resolved_database_url) as s:
            key = pseudonym_key(s)
        return visible_customer_id(customer_id, key, "auto")

    async def events(self, *batch: dict[str, Any], mode: str = "auto") -> None:
        """Post ``batch`` to an API whose router runs with ``KAERU_PSEUDONYMOUS_IDS=mode`` and
        wait until it is routed (``never``: as kaeru routed before pseudonymous ids)."""
        settings = self.settings.model_copy(update={"pseudonymous_ids": mode})
        app = create_app(settings, self.client)
        async with asgi_client(app) as api:
            answer = await api.post("/v1/batch", json={"batch": list(batch)}, auth=AUTH)
            assert answer.status_code == 200 and answer.json()["rejected"] == [], answer.text
            await app.state.router.drain(timeout=60)

    async def erase(self, customer_id: str) -> dict[str, Any]:
        app = create_app(self.settings, self.client, run_router=False)
        async with asgi_client(app) as api:
            answer = await api.delete(f"/v1/customers/{customer_id}", headers=OPERATOR)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def status(self, workflow_id: str) -> JourneyStatus:
        handle = self.client.get_workflow_handle(workflow_id)
        found: JourneyStatus = await handle.query("status", result_type=JourneyStatus)
        return found

    async def running(self, workflow_id: str) -> bool:
        try:
            described = await self.raw.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            assert exc.status == RPCStatusCode.NOT_FOUND
            return False
        return described.status == WorkflowExecutionStatus.RUNNING

    async def exists(self, workflow_id: str) -> bool:
        try:
            await self.raw.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            assert exc.status == RPCStatusCode.NOT_FOUND
            return False
        return True


def keys_of(shop: Shop, *customer_ids: str) -> list[str]:
    """Whose codec data keys are stored, of ``customer_ids``."""
    with session(shop.settings.resolved_database_url) as s:
        query = select(CustomerKey.customer_id).where(
            col(CustomerKey.customer_id).in_(customer_ids)
        )
        return list(s.exec(query))


@pytest.fixture
async def shop(dev_server_env: WorkflowEnvironment, database_url: str) -> AsyncIterator[Shop]:
    """The codec on, the production worker on the test's task queue."""
    settings = make_settings(database_url, codec_master_key=new_master_key())
    client = codec_client(dev_server_env.client, settings)
    async with httpx.AsyncClient() as http, build_worker(client, settings, http):
        yield Shop(settings, client, dev_server_env.client)


async def test_a_new_journey_of_an_email_id_shows_only_its_pseudonym(shop: Shop) -> None:
    cid = email_id()
    await shop.events(added(cid))
    pseudo = shop.pseudonym(cid)
    assert pseudo.startswith("p_") and pseudo != cid
    workflow_id = f"{KIND}-{pseudo}"
    described = await shop.client.get_workflow_handle(workflow_id).describe()
    assert described.status == WorkflowExecutionStatus.RUNNING
    assert described.typed_search_attributes.get(CUSTOMER_ID) == pseudo
    assert await described.memo_value("customer_id") == pseudo
    assert cid not in (await described.static_summary() or "")
    assert cid not in (await described.static_details() or "")
    assert not await shop.exists(f"{KIND}-{cid}")  # nothing under the clear id
    # The journey itself still knows whose it is (its input, encrypted by the codec).
    status = await shop.status(workflow_id)
    assert status.customer_id == cid and status.details["cart"] == "1× Mug"
    # Found by its pseudonym, not by the address.
    found = [w.id async for w in shop.raw.list_workflows(f'{CUSTOMER_ID.name} = "{pseudo}"')]
    assert found == [workflow_id]
    assert [w async for w in shop.raw.list_workflows(f'{CUSTOMER_ID.name} = "{cid}"')] == []
    await shop.erase(cid)


async def test_an_ordinary_id_stays_clear(shop: Shop) -> None:
    cid = f"c-{uuid.uuid4().hex[:8]}"
    await shop.events(added(cid))
    described = await shop.raw.get_workflow_handle(f"{KIND}-{cid}").describe()
    assert described.typed_search_attributes.get(CUSTOMER_ID) == cid
    await shop.erase(cid)


async def test_a_journey_started_under_the_clear_id_before_still_gets_its_events(
    shop: Shop,
) -> None:
    """Started before pseudonymous ids (``never``, as kaeru routed until now), then the new
    router: a cart event and the order reach the running journey under its clear id, and no
    second journey starts under the pseudonym while it runs; after it ends, the next cart
    starts one under the pseudonym."""
    cid = email_id()
    clear_id = f"{KIND}-{cid}"
    await shop.events(added(cid, "mug"), mode="never")
    assert await shop.running(clear_id)
    pseudo_id = f"{KIND}-{shop.pseudonym(cid)}"

    await shop.events(added(cid, "sock"))

    assert (await shop.status(clear_id)).details["cart"] == "1× Mug, 1× Sock"
    assert not await shop.exists(pseudo_id)

    await shop.events(ordered(cid))

    handle = shop.client.get_workflow_handle(clear_id, result_type=JourneyResult)
    assert (await handle.result()).outcome == "purchased"
    assert not await shop.exists(pseudo_id)

    await shop.events(added(cid, "hat"))

    assert await shop.running(pseudo_id)
    assert (await shop.status(pseudo_id)).details["cart"] == "1× Hat"
    await shop.erase(cid)


async def test_erase_ends_a_journey_under_the_clear_id_too(shop: Shop) -> None:
    cid = email_id()
    await shop.events(added(cid), mode="never")
    assert await shop.running(f"{KIND}-{cid}")

    report = await shop.erase(cid)

    assert report["journeys_ended"] == 1
    assert not await shop.running(f"{KIND}-{cid}")


async def test_erase_leaves_nothing_readable_of_the_id_in_visibility(shop: Shop) -> None:
    cid = email_id()
    await shop.events(added(cid))
    pseudo = shop.pseudonym(cid)
    workflow_id = f"{KIND}-{pseudo}"
    history = await shop.raw.get_workflow_handle(workflow_id).fetch_history()
    payloads = [p for _, p in history_payloads(history)]
    assert payloads and all(p.metadata["encoding"] == ENCODING for p in payloads)
    # The codec keys the journey's payloads by the id it shows: no key of the clear id.
    assert keys_of(shop, cid, pseudo) == [pseudo]

    report = await shop.erase(cid)

    assert report["journeys_ended"] == 1 and report["keys_shredded"] == 1
    assert keys_of(shop, cid, pseudo) == []
    assert not await shop.running(workflow_id)
    # Every workflow the visibility store lists: ids, search attributes and memo, raw.
    listed = [w async for w in shop.raw.list_workflows()]
    assert workflow_id in {w.id for w in listed}
    shown = json.dumps(
        [[w.id, str(w.typed_search_attributes), str(w.raw_info.memo)] for w in listed]
    )
    assert cid not in shown and cid.split("@")[0] not in shown
    assert [w async for w in shop.raw.list_workflows(f'{CUSTOMER_ID.name} = "{cid}"')] == []
    described = await shop.raw.get_workflow_handle(workflow_id).describe()
    assert cid not in str(described.raw_description)
    # And the payloads, memo included, no longer decrypt.
    codec = codec_for(shop.settings, journey_kinds(shop.settings))
    assert codec is not None
    memo = list(described.raw_description.workflow_execution_info.memo.fields.values())
    decoded = await codec.decode([*payloads, *memo])
    assert all(ERASED_METADATA in p.metadata for p in decoded)


async def test_the_open_of_a_pseudonymous_journeys_email_reaches_it(
    dev_server_env: WorkflowEnvironment, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cart email's pixel, loaded as a mail client does: ingestion keeps the open, the
    router delivers it to the journey under the pseudonym, and the shopper joins the ad
    audience (the step an open leads to)."""
    for name, seconds in {"EMAIL_DELAY": 1, "OPEN_WAIT": 60, "AD_DELAY": 1}.items():
        monkeypatch.setenv(f"KAERU_CART_{name}", str(seconds))
    registry.cache_clear()
    cid = email_id()
    async with SMTPTestServer() as smtp:
        settings = make_settings(database_url, smtp_port=smtp.port)
        client = dev_server_env.client
        app = create_app(settings, client)
        async with (
            httpx.AsyncClient() as http,
            build_worker(client, settings, http),
            asgi_client(app) as api,
        ):
            identify = {"type": "identify", "userId": cid, "traits": {"email": cid}}
            answer = await api.post("/v1/batch", json={"batch": [identify, added(cid)]}, auth=AUTH)
            assert answer.status_code == 200 and answer.json()["rejected"] == []
            for _ in range(300):
                if smtp.messages:
                    break
                await asyncio.sleep(0.1)
            [email] = smtp.messages
            assert email.rcpt_tos == [cid]
            assert cid not in str(email.message["X-Kaeru-Journey"])
            html = email.message.get_body(("html",))
            assert html is not None
            pixel = re.search(r'src="http://kaeru.test(/t/o/[^"]+)"', str(html.get_content()))
            assert pixel is not None
            assert (await api.get(pixel.group(1).replace("&amp;", "&"))).status_code == 200
            await app.state.router.drain(timeout=30)

            async def members() -> list[str]:
                listed = await api.get("/v1/audiences/cart-retargeting", headers=OPERATOR)
                return [m["customer_id"] for m in listed.json()["members"]]

            for _ in range(300):
                if await members():
                    break
                await asyncio.sleep(0.1)
            assert await members() == [cid]
            with session(settings.resolved_database_url) as s:
                key = pseudonym_key(s)
            workflow_id = f"{KIND}-{visible_customer_id(cid, key, 'auto')}"
            listed = await api.get("/v1/audiences/cart-retargeting", headers=OPERATOR)
            [joined] = listed.json()["members"]
            assert joined["journey_id"] == workflow_id
            await client.get_workflow_handle(workflow_id).terminate("test over")


async def test_export_and_the_admin_api_find_journeys_under_both_ids(shop: Shop) -> None:
    """One journey under the clear id (before the change, ended by the order) and the next
    under the pseudonym: the export and the customer's admin page list both."""
    cid = email_id()
    await shop.events(
        {"type": "identify", "userId": cid, "traits": {"email": cid}}, added(cid), mode="never"
    )
    await shop.events(ordered(cid))
    clear_id = f"{KIND}-{cid}"
    handle = shop.client.get_workflow_handle(clear_id, result_type=JourneyResult)
    assert (await handle.result()).outcome == "purchased"
    await shop.events(added(cid, "hat"))
    pseudo_id = f"{KIND}-{shop.pseudonym(cid)}"
    assert await shop.running(pseudo_id)

    app = create_app(shop.settings, shop.client, run_router=False)
    async with asgi_client(app) as api:
        exported = await api.get(f"/v1/customers/{cid}/export", headers=OPERATOR)
        profile = await api.get(f"/v1/customers/{cid}", headers=OPERATOR)

    assert exported.status_code == 200 and profile.status_code == 200
    for found in (exported.json()["workflows"], profile.json()["workflows"]):
        assert {(w["workflow_id"], w["status"]) for w in found} == {
            (clear_id, "COMPLETED"),
            (pseudo_id, "RUNNING"),
        }
    await shop.erase(cid)


class CountCalls(Interceptor):
    """Counts the router's Temporal calls, by kind."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _Counting(next, self.calls)


class _Counting(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, calls: list[str]) -> None:
        super().__init__(next)
        self.calls = calls

    async def describe_workflow(self, input: DescribeWorkflowInput) -> WorkflowExecutionDescription:
        self.calls.append("describe")
        return await super().describe_workflow(input)

    async def signal_workflow(self, input: SignalWorkflowInput) -> None:
        self.calls.append("signal")
        await super().signal_workflow(input)

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        self.calls.append("start")
        return await super().start_workflow(input)


async def test_only_pseudonymised_ids_cost_a_describe(shop: Shop) -> None:
    """Routing an ordinary id costs what it always did; a pseudonymised one the same calls
    and at most one describe per journey it goes to (for a journey started before)."""
    counter = CountCalls()
    config = shop.client.config()
    config["interceptors"] = [counter]
    shop.client = Client(**config)

    async def calls_of(customer_id: str) -> list[list[str]]:
        seen = []
        for event in (added(customer_id), ordered(customer_id)):
            counter.calls.clear()
            await shop.events(event)
            seen.append(list(counter.calls))
        return seen

    clear = await calls_of(f"c-{uuid.uuid4().hex[:8]}")
    pseudonymised = await calls_of(email_id())

    assert "describe" not in str(clear)
    for plain, more in zip(clear, pseudonymised, strict=True):
        assert [c for c in more if c != "describe"] == plain
        assert 1 <= more.count("describe") <= len(plain)
