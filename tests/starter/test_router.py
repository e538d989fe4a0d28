"""The router against a real Temporal dev server and the real worker (journeys and activities).

Journey waits are the production defaults (a day), so no email is sent: what is checked is
that events reach the right journey, in order, once, and that the router survives failures.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    StartWorkflowInput,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session
from kaeru.models import EmailMessage, Event, Order, Touchpoint
from kaeru.settings import Settings
from kaeru.tracking import TrackingToken, make_token
from starter.app import create_app
from starter.router import Router, lease_holder, outbox_stats, unrouted_count
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, OPERATOR, asgi_client, events
from worker import build_worker
from workflows.cart_abandonment import CartAbandonment
from workflows.kit import CUSTOMER_ID, STEP, JourneyResult, JourneyStatus


def customer(label: str) -> str:
    """A customer id no other test (or earlier run on the shared dev server) used."""
    return f"{label}-{uuid.uuid4().hex[:8]}"


def added(customer_id: str, product: str = "mug", **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": customer_id,
        "event": "Product Added",
        "properties": {"product_id": product, "name": product.title(), "price": 12.5},
        **extra,
    }


def ordered(customer_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": customer_id,
        "event": "Order Completed",
        "properties": {"order_id": f"order-{customer_id}", "total": 12.5},
        **extra,
    }


def journey(client: Client, customer_id: str) -> WorkflowHandle[Any, JourneyResult]:
    return client.get_workflow_handle_for(CartAbandonment.run, f"cart-abandonment-{customer_id}")


async def signals(handle: WorkflowHandle[Any, Any]) -> int:
    return len(
        [
            event
            async for event in handle.fetch_history_events()
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
        ]
    )


async def status(handle: WorkflowHandle[Any, Any]) -> JourneyStatus:
    result: JourneyStatus = await handle.query("status", result_type=JourneyStatus)
    return result


@dataclass
class Stack:
    api: httpx.AsyncClient
    settings: Settings
    router: Router
    client: Client


@pytest.fixture
async def worker(dev_server_env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[None]:
    """The production worker (every journey and activity) on the test's task queue."""
    async with httpx.AsyncClient() as http:
        async with build_worker(dev_server_env.client, settings, http):
            yield


@pytest.fixture
async def stack(
    dev_server_env: WorkflowEnvironment, settings: Settings, worker: None
) -> AsyncIterator[Stack]:
    app = create_app(settings, dev_server_env.client)
    async with asgi_client(app) as api:
        yield Stack(api, settings, app.state.router, dev_server_env.client)


async def post_batch(api: httpx.AsyncClient, batch: list[dict[str, Any]]) -> None:
    answer = await api.post("/v1/batch", json={"batch": batch}, auth=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["rejected"] == []


# ---- order, once, to the right journey -------------------------------------------------


async def test_each_customer_is_routed_in_order(stack: Stack) -> None:
    """Product Added then Order Completed, for 20 customers at once: every journey purchases."""
    customers = [customer("order") for _ in range(20)]
    await asyncio.gather(*(post_batch(stack.api, [added(c), ordered(c)]) for c in customers))
    await stack.router.drain(timeout=60)
    results = await asyncio.wait_for(
        asyncio.gather(*(journey(stack.client, c).result() for c in customers)), timeout=60
    )
    assert [r.outcome for r in results] == ["purchased"] * 20
    assert {r.order_id for r in results} == {f"order-{c}" for c in customers}
    with session(stack.settings.resolved_database_url) as s:
        conversions = s.exec(select(Touchpoint).where(Touchpoint.kind == "conversion")).all()
        orders = s.exec(select(Order)).all()
    assert {t.customer_id for t in conversions} == set(customers)
    assert len(orders) == 20


async def test_journey_is_started_with_search_attributes_and_memo(stack: Stack) -> None:
    c = customer("meta")
    await post_batch(stack.api, [added(c)])
    await stack.router.drain()
    handle = journey(stack.client, c)
    described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.RUNNING
    assert described.typed_search_attributes.get(CUSTOMER_ID) == c
    assert described.typed_search_attributes.get(STEP) in ("started", "cart_quiet")
    assert await described.memo_value("customer_id") == c
    assert await described.memo_value("journey") == "Cart abandonment"
    assert await described.static_summary() == f"Cart abandonment for {c}"
    assert (await status(handle)).details["cart"] == "1× Mug"


async def test_a_repeated_message_id_reaches_the_journey_once(stack: Stack) -> None:
    c = customer("dedupe")
    event = added(c, messageId=f"msg-{c}")
    await post_batch(stack.api, [event])
    await stack.router.drain()
    await post_batch(stack.api, [event, event])
    await stack.router.drain()
    handle = journey(stack.client, c)
    assert await signals(handle) == 1
    assert (await status(handle)).details["cart"] == "1× Mug"


async def test_events_of_one_customer_keep_their_order_across_requests(stack: Stack) -> None:
    c = customer("seq")
    for product in ("a", "b", "c"):
        await post_batch(stack.api, [added(c, product)])
    await post_batch(
        stack.api,
        [
            {
                "type": "track",
                "userId": c,
                "event": "Product Removed",
                "properties": {"product_id": "b"},
            }
        ],
    )
    await stack.router.drain()
    handle = journey(stack.client, c)
    assert (await status(handle)).details["cart"] == "1× A, 1× C"
    assert await signals(handle) == 4


async def test_an_order_without_a_journey_is_routed_and_kept(stack: Stack) -> None:
    c = customer("walk-in")
    await post_batch(stack.api, [ordered(c)])
    await stack.router.drain()
    with pytest.raises(RPCError) as missing:
        await journey(stack.client, c).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND
    with session(stack.settings.resolved_database_url) as s:
        assert s.get(Order, f"order-{c}") is not None
    (stored,) = events(stack.settings, customer_id=c)
    assert stored.routed_at is not None and stored.route_error is None


async def test_a_new_cart_after_a_purchase_starts_a_new_journey(stack: Stack) -> None:
    c = customer("again")
    await post_batch(stack.api, [added(c), ordered(c)])
    await stack.router.drain()
    first = journey(stack.client, c)
    assert (await asyncio.wait_for(first.result(), timeout=30)).outcome == "purchased"
    first_run = (await first.describe()).run_id
    await post_batch(stack.api, [added(c, "tea")])
    await stack.router.drain()
    second = await journey(stack.client, c).describe()
    assert second.run_id != first_run
    assert second.status == WorkflowExecutionStatus.RUNNING


async def test_email_open_and_ad_click_reach_the_journey(stack: Stack) -> None:
    c = customer("engaged")
    await post_batch(stack.api, [added(c)])
    await stack.router.drain()
    handle = journey(stack.client, c)
    # The key names the journey's first run, as the email activity's idempotency key does.
    first_run = (await handle.describe()).run_id
    message_key = f"cart-abandonment-{c}/{first_run}/cart_email"
    with session(stack.settings.resolved_database_url) as s:
        s.add(
            EmailMessage(
                key=message_key,
                message_id=f"<{c}@kaeru>",
                customer_id=c,
                journey_id=f"cart-abandonment-{c}",
                step="cart_email",
                to_address="x@example.com",
                subject="Your cart",
                status="sent",
                links=["https://shop.example/cart"],
            )
        )
    pixel = (
        f"/t/o/{make_token(b'test-secret-0123456789abcdef-kaeru', TrackingToken(message_key, 'o'))}"
    )
    for _ in range(3):
        assert (await stack.api.get(pixel)).status_code == 200
    await stack.router.drain()
    story = (await status(handle)).story
    assert len([line for line in story if "opened the cart_email email" in line]) == 1
    assert await signals(handle) == 2
    # An ad click (UTM page view) is routed as a plain signal to the live journey.
    page = {
        "type": "page",
        "userId": c,
        "context": {"campaign": {"name": stack.settings.ad_campaign}},
    }
    await post_batch(stack.api, [page])
    await stack.router.drain()
    assert await signals(handle) == 3


# ---- failures, retries, the lease ----------------------------------------------------------------


class RefuseStarts(Interceptor):
    """Makes Temporal refuse to start one workflow id while ``refusing`` (a failing route)."""

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        self.refusing = True
        self.refused = 0

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _Refuse(next, self)


class _Refuse(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, owner: RefuseStarts) -> None:
        super().__init__(next)
        self.owner = owner

    async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
        if self.owner.refusing and input.id == self.owner.workflow_id:
            self.owner.refused += 1
            raise RuntimeError("injected: the start was refused")
        return await super().start_workflow(input)


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        met = condition()
        if met if isinstance(met, bool) else await met:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_a_failing_route_is_retried_and_later_events_wait(
    dev_server_env: WorkflowEnvironment, settings: Settings, worker: None, api: httpx.AsyncClient
) -> None:
    flaky, steady = customer("flaky"), customer("steady")
    refuse = RefuseStarts(f"cart-abandonment-{flaky}")
    client = Client(
        dev_server_env.client.service_client,
        namespace=dev_server_env.client.namespace,
        interceptors=[refuse],
    )
    await post_batch(api, [added(flaky), ordered(flaky), added(steady), ordered(steady)])
    router = Router(settings, client, retry_base=0.1, retry_max=0.5, poll_interval=0.1)
    await router.start()
    try:
        await wait_for(lambda: refuse.refused >= 3)
        stuck_cart, stuck_order = events(settings, customer_id=flaky)
        assert stuck_cart.routed_at is None and stuck_cart.route_attempts >= 2
        assert "injected: the start was refused" in (stuck_cart.route_error or "")
        # The order waits behind the failing cart event: it was never even tried.
        assert stuck_order.routed_at is None and stuck_order.route_attempts == 0
        # Other customers are not held up.
        steady_result = await asyncio.wait_for(journey(client, steady).result(), timeout=30)
        assert steady_result.outcome == "purchased"
        stats = await asyncio.to_thread(outbox_stats, settings)
        assert (stats.unrouted, stats.failing) == (2, 1)
        assert stats.oldest_failure is not None and stats.oldest_failure["seq"] == stuck_cart.seq
        outbox = await api.get("/v1/admin/outbox", headers=OPERATOR)
        assert outbox.json()["unrouted"] == 2
        assert "injected" in str(outbox.json()["oldest_failure"])
        refuse.refusing = False
        await router.drain()
        result = await asyncio.wait_for(journey(client, flaky).result(), timeout=30)
        assert result.outcome == "purchased"
        assert router.last_error is None
    finally:
        await router.stop()


async def test_a_second_router_waits_for_the_lease(
    dev_server_env: WorkflowEnvironment, settings: Settings, worker: None, api: httpx.AsyncClient
) -> None:
    loop = asyncio.get_running_loop()
    first = Router(settings, dev_server_env.client, lease_ttl=2.0)
    second = Router(settings, dev_server_env.client, lease_ttl=1.0, poll_interval=0.1)
    assert await first.acquire_lease()  # ...and never renews it: a router that died
    taken_at = loop.time()
    c = customer("lease")
    await post_batch(api, [added(c)])
    await second.start()
    try:
        await asyncio.sleep(1.2)
        assert not second.holds_lease
        assert await asyncio.to_thread(unrouted_count, settings) == 1
        await second.drain(timeout=10)
        assert loop.time() - taken_at >= 1.9  # only once the first lease had expired
        assert (await status(journey(dev_server_env.client, c))).details["cart"] == "1× Mug"
        holder = await asyncio.to_thread(lease_holder, settings.resolved_database_url)
        assert holder is not None and holder[0] == second.holder
    finally:
        await second.stop()


async def test_a_stopping_router_hands_the_lease_over_at_once(
    dev_server_env: WorkflowEnvironment, settings: Settings, worker: None, api: httpx.AsyncClient
) -> None:
    loop = asyncio.get_running_loop()
    first = Router(settings, dev_server_env.client, lease_ttl=3.0)
    second = Router(settings, dev_server_env.client, lease_ttl=3.0, poll_interval=0.1)
    await first.start()
    await wait_for(lambda: first.holds_lease)
    await second.start()
    try:
        c = customer("handover")
        await post_batch(api, [added(c)])
        await first.drain()
        assert not second.holds_lease
        stopped_at = loop.time()
        await first.stop()
        await wait_for(lambda: second.holds_lease, timeout=5)
        # A lease that merely expired would take 2-3 s here (it was renewed every second).
        assert loop.time() - stopped_at < 1.8
        await post_batch(api, [added(c, "tea")])
        await second.drain()
        assert (await status(journey(dev_server_env.client, c))).details["cart"] == "1× Mug, 1× Tea"
    finally:
        await first.stop()
        await second.stop()


# ---- connecting --------------------------------------------------------------------------------


async def test_the_app_connects_to_temporal_from_settings(
    dev_server_env: WorkflowEnvironment, database_url: str
) -> None:
    address = dev_server_env.client.service_client.config.target_host
    settings = make_settings(database_url, temporal_address=address)
    c = customer("connect")
    app = create_app(settings)
    async with httpx.AsyncClient() as http, build_worker(dev_server_env.client, settings, http):
        async with asgi_client(app) as api:
            await post_batch(api, [added(c)])
            await app.state.router.drain()
    described = await journey(dev_server_env.client, c).describe()
    assert described.status == WorkflowExecutionStatus.RUNNING


async def test_ingestion_keeps_storing_while_temporal_is_unreachable(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, temporal_address="127.0.0.1:1")
    app = create_app(settings)
    async with asgi_client(app) as api:
        await post_batch(api, [added("offline")])

        async def reported() -> bool:
            body = (await api.get("/v1/admin/outbox", headers=OPERATOR)).json()
            return "cannot reach Temporal" in (body["last_error"] or "")

        await wait_for(reported, timeout=10)
        body = (await api.get("/v1/admin/outbox", headers=OPERATOR)).json()
        assert body["unrouted"] == 1 and body["holds_lease"] is True
        assert "KAERU_TEMPORAL_ADDRESS" in body["last_error"]
        with pytest.raises(TimeoutError, match="1 event"):
            await app.state.router.drain(timeout=0.5)
    with session(sqlite_url) as s:
        stored = s.exec(select(Event).order_by(col(Event.seq))).all()
    assert [e.routed_at for e in stored] == [None]


async def test_stop_is_not_lost_when_it_meets_a_wake_up(sqlite_url: str) -> None:
    """A wake-up and a stop in the same instant: the router still stops (and frees the lease)."""
    settings = make_settings(sqlite_url, temporal_address="127.0.0.1:1")
    for _ in range(3):
        router = Router(settings)
        await router.start()
        await asyncio.sleep(0.02)
        router.wake()
        await asyncio.wait_for(router.stop(), timeout=5)
        assert not router.running
