"""The router against a real Temporal dev server and the real worker (journeys and activities).

Journey waits are the production defaults (a day), so no email is sent: what is checked is
that events reach the right journey, in order, once, and that the router survives failures.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, select, update
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    RetryConfig,
    StartWorkflowInput,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from kaeru.db import session, write_session
from kaeru.models import CustomerRouting, EmailMessage, Event, Lease, Order, Touchpoint
from kaeru.settings import Settings
from kaeru.tracking_tokens import TrackingToken, make_token
from starter.app import create_app
from starter.ingest import insert_events, outbox_row
from starter.router import (
    Fence,
    FencedOut,
    Mark,
    Router,
    acquire_lease,
    lease_holder,
    mark_routed,
    outbox_stats,
    release_lease,
    unrouted_count,
)
from tests.conftest import _binary, make_settings
from tests.starter.conftest import AUTH, OPERATOR, asgi_client, events
from tests.support.prometheus import Scrape
from worker import build_worker
from workflows.cart_abandonment import CartAbandonment
from workflows.kit import CUSTOMER_ID, SEARCH_ATTRIBUTES, STEP, JourneyResult, JourneyStatus


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


def removed(customer_id: str, product: str) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": customer_id,
        "event": "Product Removed",
        "properties": {"product_id": product},
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
    """Cart changes then an order, for 20 customers at once: carts in order, every one bought."""
    customers = [customer("order") for _ in range(20)]
    await asyncio.gather(
        *(post_batch(stack.api, [added(c, "a"), added(c, "b"), removed(c, "a")]) for c in customers)
    )
    await stack.router.drain(timeout=60)
    carts = await asyncio.gather(*(status(journey(stack.client, c)) for c in customers))
    assert [cart.details["cart"] for cart in carts] == ["1× B"] * 20
    await asyncio.gather(*(post_batch(stack.api, [ordered(c)]) for c in customers))
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
    await post_batch(stack.api, [added(c)])
    await stack.router.drain()
    await post_batch(stack.api, [ordered(c)])
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
    assert len([line for line in story if "opened the cart email" in line]) == 1
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
    await post_batch(api, [added(flaky), added(flaky, "tea"), added(steady)])
    router = Router(settings, client, retry_base=0.1, retry_max=0.5, poll_interval=0.1)
    await router.start()
    try:
        await wait_for(lambda: refuse.refused >= 3)
        stuck_cart, stuck_later = events(settings, customer_id=flaky)
        assert stuck_cart.routed_at is None and stuck_cart.route_attempts >= 2
        assert "injected: the start was refused" in (stuck_cart.route_error or "")
        # The later event waits behind the failing one: it was never even tried.
        assert stuck_later.routed_at is None and stuck_later.route_attempts == 0
        # Other customers are not held up.
        await wait_for(lambda: started(client, steady))
        stats = await asyncio.to_thread(outbox_stats, settings)
        assert (stats.unrouted, stats.failing) == (2, 1)
        assert stats.oldest_failure is not None and stats.oldest_failure["seq"] == stuck_cart.seq
        outbox = await api.get("/v1/admin/outbox", headers=OPERATOR)
        assert outbox.json()["unrouted"] == 2
        assert "injected" in str(outbox.json()["oldest_failure"])
        refuse.refusing = False
        await router.drain()
        assert (await status(journey(client, flaky))).details["cart"] == "1× Mug, 1× Tea"
        assert router.last_error is None
    finally:
        await router.stop()


async def test_a_second_router_waits_for_the_lease(
    dev_server_env: WorkflowEnvironment, settings: Settings, worker: None, api: httpx.AsyncClient
) -> None:
    loop = asyncio.get_running_loop()
    first = Router(settings, dev_server_env.client, lease_ttl=4.0)
    second = Router(settings, dev_server_env.client, lease_ttl=1.0, poll_interval=0.1)
    assert await first.acquire_lease()  # ...and never renews it: a router that died
    taken_at = loop.time()
    c = customer("lease")
    await post_batch(api, [added(c)])
    await second.start()
    try:
        # Look half way through the first lease, counted from when it was taken: a loaded CI
        # machine once spent most of a shorter lease on the post and the start above.
        await asyncio.sleep(max(0.0, taken_at + 2.0 - loop.time()))
        assert loop.time() - taken_at < 4.0, "too slow to look before the first lease expired"
        assert not second.holds_lease
        assert await asyncio.to_thread(unrouted_count, settings) == 1
        await second.drain(timeout=10)
        assert loop.time() - taken_at >= 3.9  # only once the first lease had expired
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


# ---- events Temporal refuses: backoff in SQL, parking, pauses (issue 13, item 1) --------------


def store_directly(settings: Settings, stored: list[dict[str, Any]]) -> None:
    """Store track events as ingestion does, bypassing the checks at the door (old rows)."""
    now = datetime.now(UTC)
    rows = [
        outbox_row(
            message_id=event.get("messageId") or f"direct-{uuid.uuid4().hex}",
            customer_id=event["userId"],
            event_type="track",
            name=event["event"],
            payload=event,
            timestamp=now,
            received_at=now,
        )
        for event in stored
    ]
    with write_session(settings.resolved_database_url) as s:
        insert_events(s, rows)


async def started(client: Client, customer_id: str) -> bool:
    try:
        await journey(client, customer_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def rounds_until(router: Router, condition: Callable[[], Awaitable[bool]], most: int) -> int:
    """Run routing rounds by hand until ``condition``; how many it took (fails past ``most``).

    Before each round the lease is renewed (as the router's lease task does), and a pause of
    all routing (a busy Temporal) is waited out, so no round is empty for those reasons.
    """
    for done in range(1, most + 1):
        assert await router.acquire_lease()
        await wait_for(lambda: not router.paused, timeout=router.retry_max + 5)
        await router.route_once()
        if await condition():
            return done
    left = await asyncio.to_thread(unrouted_count, router.settings)
    raise AssertionError(
        f"not met after {most} routing rounds; {left} unrouted; last error: {router.last_error}"
    )


GRINNING = "\U0001f600"  # 4 bytes in UTF-8, 12 (a JSON surrogate pair) in a search attribute


async def test_1600_customers_temporal_refuses_do_not_stall_a_healthy_one(
    dev_server_env: WorkflowEnvironment, settings: Settings
) -> None:
    """A userId of 171 emoji is 2,054 bytes as a search attribute: INVALID_ARGUMENT, for good."""
    refused = [f"{GRINNING * 171}{i}" for i in range(1600)]
    healthy = customer("healthy")
    store_directly(settings, [added(c) for c in refused] + [added(healthy)])
    router = Router(settings, dev_server_env.client, retry_base=60, retry_max=60)
    try:
        rounds = await rounds_until(router, lambda: started(dev_server_env.client, healthy), most=6)
    finally:
        await router.stop()
    assert rounds == 4  # 1,601 events in batches of 500: no round is spent on a waiting customer
    stats = await asyncio.to_thread(outbox_stats, settings)
    assert (stats.unrouted, stats.parked) == (0, 1600)
    parked = [e for e in events(settings) if e.parked_at is not None]
    assert {e.route_attempts for e in parked} == {1}  # parked at once: retrying cannot fix it
    assert all("exceeds size limit" in (e.park_reason or "") for e in parked)


class RefuseCustomers(Interceptor):
    """Makes every start for a customer id with ``prefix`` fail (a retryable, unknown error)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = f"cart-abandonment-{prefix}"
        self.refused = 0

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        owner = self

        class Refuse(OutboundInterceptor):
            async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
                if input.id.startswith(owner.prefix):
                    owner.refused += 1
                    raise RuntimeError("injected: the start failed")
                return await super().start_workflow(input)

        return Refuse(next)


def intercepted(env: WorkflowEnvironment, *interceptors: Interceptor) -> Client:
    return Client(
        env.client.service_client, namespace=env.client.namespace, interceptors=interceptors
    )


async def test_1600_customers_in_backoff_are_skipped_in_sql(
    dev_server_env: WorkflowEnvironment, settings: Settings
) -> None:
    sick = customer("sick")
    refuse = RefuseCustomers(sick)
    client = intercepted(dev_server_env, refuse)
    healthy = customer("healthy")
    store_directly(settings, [added(f"{sick}-{i}") for i in range(1600)] + [added(healthy)])
    router = Router(settings, client, retry_base=60, retry_max=60)
    try:
        rounds = await rounds_until(router, lambda: started(client, healthy), most=6)
        assert rounds == 4
        # Nobody waits long enough to be retried yet: another round reads nothing.
        assert not await router.route_once()
        assert refuse.refused == 1600
    finally:
        await router.stop()
    stats = await asyncio.to_thread(outbox_stats, settings)
    assert (stats.unrouted, stats.failing, stats.parked) == (1600, 1600, 0)
    with session(settings.resolved_database_url) as s:
        waiting = s.exec(select(CustomerRouting).where(col(CustomerRouting.failures) == 1)).all()
    assert len(waiting) == 1600


class RefuseMessage(Interceptor):
    """Makes Temporal refuse to start a journey on one event (by messageId) while ``refusing``."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.refusing = True
        self.refused = 0

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        owner = self

        class Refuse(OutboundInterceptor):
            async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
                first = input.start_signal_args[0] if input.start_signal_args else None
                if owner.refusing and getattr(first, "message_id", None) == owner.message_id:
                    owner.refused += 1
                    raise RuntimeError("injected: the start was refused")
                return await super().start_workflow(input)

        return Refuse(next)


async def test_an_event_failing_max_attempts_is_parked_and_an_operator_retries_it(
    dev_server_env: WorkflowEnvironment, settings: Settings, worker: None
) -> None:
    settings = settings.model_copy(update={"route_max_attempts": 3})
    c = customer("poisoned")
    refuse = RefuseMessage(f"poison-{c}")
    client = intercepted(dev_server_env, refuse)
    app = create_app(settings, client)
    app.state.router.retry_base = app.state.router.retry_max = 0.05
    async with asgi_client(app) as api:
        await post_batch(api, [added(c, "mug", messageId=f"poison-{c}"), added(c, "tea")])
        await app.state.router.drain(timeout=20)
        assert refuse.refused == 3
        # The customer's later event flowed past the parked one, and it carries the whole
        # stored cart: the mug was stored (only its routing failed), so the journey has it.
        assert (await status(journey(client, c))).details["cart"] == "1× Mug, 1× Tea"
        listed = (await api.get("/v1/admin/parked", headers=OPERATOR)).json()
        (parked,) = listed["parked"]
        assert (parked["customer_id"], parked["event"], parked["message_id"]) == (
            c,
            "Product Added",
            f"poison-{c}",
        )
        assert parked["attempts"] == 3 and "injected" in parked["reason"]
        # /metrics says so: three failed attempts (no Temporal status: ``error``), one parked.
        counted = Scrape((await api.get("/metrics")).text)
        assert counted.value("kaeru_router_failures_total", reason="error") == 3
        assert counted.value("kaeru_router_failures_total") == 3
        assert counted.value("kaeru_router_parked_total", reason="max_attempts") == 1
        assert counted.value("kaeru_router_parked_total") == 1
        assert counted.value("kaeru_router_deliveries_total") == 1  # the tea
        outbox = (await api.get("/v1/admin/outbox", headers=OPERATOR)).json()
        assert (outbox["unrouted"], outbox["parked"]) == (0, 1)
        refuse.refusing = False
        answer = await api.post(f"/v1/admin/parked/{parked['seq']}/retry", headers=OPERATOR)
        assert answer.status_code == 200, answer.text
        await app.state.router.drain(timeout=20)
        (cart, _) = events(settings, customer_id=c)
        assert cart.routed_at is not None and cart.parked_at is None
        assert (await api.get("/v1/admin/parked", headers=OPERATOR)).json()["parked"] == []
        retried = Scrape((await api.get("/metrics")).text)
        assert retried.value("kaeru_router_deliveries_total") == 2
        assert retried.value("kaeru_routing_lag_seconds_count") == 2
        assert retried.value("kaeru_router_parked_total") == 1


async def test_temporal_rate_limiting_pauses_routing_and_counts_against_no_event(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        search_attributes=list(SEARCH_ATTRIBUTES),
        dev_server_extra_args=[
            "--dynamic-config-value",
            "frontend.namespaceRPS=10",
            "--dynamic-config-value",
            "frontend.namespaceBurstRatio=1",
        ],
    )
    try:
        # 10 requests a second: each cart event costs two (the cart journey's start and a
        # signal to a browse journey that may be live), 8 customers' 16 exceed it at once.
        # One quick SDK retry (0 means the default, 5 slow ones): the router sees
        # RESOURCE_EXHAUSTED at once, as it does after the SDK's own retries in production.
        retry = RetryConfig(max_retries=1, initial_interval_millis=10, max_interval_millis=20)
        client = await Client.connect(
            env.client.service_client.config.target_host, retry_config=retry
        )
        customers = [customer("busy") for _ in range(8)]
        store_directly(settings, [added(c) for c in customers])
        router = Router(settings, client, retry_base=0.2, retry_max=1.0, poll_interval=0.1)
        await router.start()
        try:
            await router.drain(timeout=60)
        finally:
            await router.stop()
    finally:
        await env.shutdown()
    assert "routing paused" in caplog.text and "RESOURCE_EXHAUSTED" in caplog.text
    stored = events(settings)
    assert [e.route_attempts for e in stored] == [0] * 8
    assert all(e.routed_at is not None and e.parked_at is None for e in stored)


# ---- redelivery and the fenced lease (issue 13, item 5) -----------------------------------------


class HoldStart(Interceptor):
    """Records every start and signal; holds the start of one workflow id until released."""

    def __init__(self, held_id: str | None = None) -> None:
        self.held_id = held_id
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[str] = []

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        owner = self

        class Hold(OutboundInterceptor):
            async def start_workflow(self, input: StartWorkflowInput) -> WorkflowHandle[Any, Any]:
                if input.id == owner.held_id:
                    owner.reached.set()
                    await owner.release.wait()
                owner.sent.append(input.id)
                return await super().start_workflow(input)

        return Hold(next)


async def test_a_router_stopped_mid_round_never_has_its_deliveries_repeated(
    dev_server_env: WorkflowEnvironment, settings: Settings
) -> None:
    first, second, third = (customer("deploy") for _ in range(3))
    await asyncio.to_thread(store_directly, settings, [added(first), added(second), added(third)])
    hold = HoldStart(f"cart-abandonment-{third}")
    old = Router(settings, intercepted(dev_server_env, hold), concurrency=1)
    await old.start()
    await asyncio.wait_for(hold.reached.wait(), timeout=20)
    await old.stop()  # a deploy stops it mid-round
    assert hold.sent == [f"cart-abandonment-{first}", f"cart-abandonment-{second}"]
    watch = HoldStart()
    new = Router(settings, intercepted(dev_server_env, watch))
    try:
        await rounds_until(new, lambda: started(dev_server_env.client, third), most=2)
    finally:
        await new.stop()
    assert watch.sent == [f"cart-abandonment-{third}"]  # only the one that never went out
    assert all(e.routed_at is not None for e in events(settings))


async def test_an_event_whose_mark_was_lost_is_not_sent_again(
    stack: Stack, settings: Settings
) -> None:
    c = customer("lost-mark")
    await post_batch(stack.api, [added(c)])
    await stack.router.drain()
    with write_session(settings.resolved_database_url) as s:
        s.execute(update(Event).where(col(Event.customer_id) == c).values(routed_at=None))
    await stack.router.drain()
    assert await signals(journey(stack.client, c)) == 1
    (stored,) = events(settings, customer_id=c)
    assert "not sent again" in (stored.route_note or "")


async def test_a_router_whose_lease_was_taken_over_mid_round_stops_delivering(
    dev_server_env: WorkflowEnvironment, settings: Settings
) -> None:
    url = settings.resolved_database_url
    first, second, third = (customer("fenced") for _ in range(3))
    await asyncio.to_thread(store_directly, settings, [added(first), added(second), added(third)])
    hold = HoldStart(f"cart-abandonment-{second}")
    paused = Router(settings, intercepted(dev_server_env, hold), concurrency=1, lease_ttl=60)
    assert await paused.acquire_lease()
    round_ = asyncio.create_task(paused.route_once())
    await asyncio.wait_for(hold.reached.wait(), timeout=20)
    # The router stalls past its lease (a GC pause, a partition): its lease runs out and
    # another router takes over, while the stalled one still believes it holds the lease.
    with write_session(url) as s:
        s.execute(update(Lease).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    successor = Router(settings, dev_server_env.client)
    assert await successor.acquire_lease()
    hold.release.set()  # the stalled router wakes up with its signal in flight
    await asyncio.wait_for(round_, timeout=20)
    assert hold.sent == [f"cart-abandonment-{first}", f"cart-abandonment-{second}"]
    assert not paused.holds_lease
    assert "another router took over" in (paused.last_error or "")
    assert not await paused.route_once()
    with pytest.raises(FencedOut):
        await asyncio.to_thread(mark_routed, url, Fence(paused.holder, 1), [Mark(1, first)])
    try:
        await rounds_until(successor, lambda: started(dev_server_env.client, third), most=2)
    finally:
        await successor.stop()
        await paused.stop()
    assert hold.sent == [f"cart-abandonment-{first}", f"cart-abandonment-{second}"]
    assert all(e.routed_at is not None for e in events(settings))


# ---- what happened first (issue 13, item 7, the router's half) -----------------------------


async def test_a_cart_event_an_earlier_stored_order_overtook_starts_no_journey(
    stack: Stack,
) -> None:
    c = customer("overtaken")
    bought = datetime.now(UTC) - timedelta(minutes=1)
    await post_batch(stack.api, [ordered(c, timestamp=bought.isoformat())])
    await stack.router.drain()
    late = (bought - timedelta(seconds=30)).isoformat()  # the browser's event, sent late
    await post_batch(stack.api, [added(c, timestamp=late)])
    await stack.router.drain()
    assert not await started(stack.client, c)
    _, cart = events(stack.settings, customer_id=c)
    assert cart.routed_at is not None
    assert "no journey started" in (cart.route_note or "")
    assert "at or after this event" in (cart.route_note or "")


async def test_a_stale_cart_event_starts_no_journey_but_reaches_a_live_one(stack: Stack) -> None:
    settings = stack.settings
    old = (datetime.now(UTC) - settings.max_start_event_age - timedelta(hours=1)).isoformat()
    c, live = customer("stale"), customer("stale-live")
    await post_batch(stack.api, [added(c, timestamp=old), added(live)])
    await stack.router.drain()
    assert not await started(stack.client, c)
    (stale,) = events(settings, customer_id=c)
    assert "KAERU_MAX_START_EVENT_AGE" in (stale.route_note or "")
    await post_batch(stack.api, [added(live, "tea", timestamp=old)])
    await stack.router.drain()
    assert (await status(journey(stack.client, live))).details["cart"] == "1× Mug, 1× Tea"


def test_the_lease_token_increases_with_every_new_holder(settings: Settings) -> None:
    url = settings.resolved_database_url
    assert acquire_lease(url, "a", ttl=30) == 1
    assert acquire_lease(url, "a", ttl=30) == 1  # a renewal keeps the token
    assert acquire_lease(url, "b", ttl=30) is None
    release_lease(url, "a")
    assert acquire_lease(url, "b", ttl=30) == 2
    with pytest.raises(FencedOut):  # a's writes are refused from now on
        mark_routed(url, Fence("a", 1), [Mark(1, "c")])
    release_lease(url, "b")
    assert acquire_lease(url, "a", ttl=30) == 3
    with pytest.raises(FencedOut):  # even a's old token: it held the lease before b did
        mark_routed(url, Fence("a", 1), [Mark(1, "c")])


# ---- identity merge ------------------------------------------------------------------------


async def test_an_anonymous_cart_continues_in_the_identified_customers_journey(
    stack: Stack,
) -> None:
    anonymous, user = customer("anon"), customer("user")
    await post_batch(
        stack.api, [{**added(anonymous, "teapot"), "userId": None, "anonymousId": anonymous}]
    )
    await stack.router.drain()
    await post_batch(stack.api, [added(user, "cup")])
    await stack.router.drain()
    identify = {"type": "identify", "userId": user, "anonymousId": anonymous, "traits": {}}
    await post_batch(stack.api, [identify])
    await stack.router.drain()
    theirs = journey(stack.client, user)
    assert (await status(theirs)).details["cart"] == "1× Cup, 1× Teapot"
    # The order, sent before the shop knew the user's id, is the user's and ends the journey.
    order = ordered(anonymous)
    await post_batch(stack.api, [{**order, "userId": None, "anonymousId": anonymous}])
    await stack.router.drain()
    assert (await asyncio.wait_for(theirs.result(), timeout=30)).outcome == "purchased"
    assert [e.route_error for e in events(stack.settings, customer_id=user)] == [None] * 4
