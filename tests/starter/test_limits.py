"""The API's front door, for real: uvicorn on loopback, as `kaeru api` serves it.

Rate limits are spent in events for ingestion and in requests for tracking, per write key and
per client address; a slow body is cut off; a full process answers 503; `/healthz` always
answers. No assertion depends on timing: refill rates are set so low that the seconds a test
takes cannot refill a bucket, and waits are bounded by generous timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError
from segment.analytics import Client as SegmentClient

from kaeru.db import session
from kaeru.models import EmailMessage, Touchpoint
from kaeru.serving import HEADER_TIMEOUT, AppServer, listening_socket
from kaeru.settings import Settings
from kaeru.tracking_tokens import TrackingToken, make_token
from starter.app import create_app
from starter.limits import Limits, Rate, RateLimit
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, WRITE_KEY, count, events

#: A refill so slow that no test lives long enough to see one token come back.
NEVER = 0.001


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, header_timeout: float = HEADER_TIMEOUT
) -> AsyncIterator[tuple[str, FastAPI]]:
    """The API (without a router) served by the same server `kaeru api` uses."""
    app = create_app(settings, run_router=False)
    sock = listening_socket("127.0.0.1", 0, what="test API", fix="-")
    server = AppServer(app, sock, what="test API", header_timeout=header_timeout)
    await server.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        await server.stop()


def limits(app: FastAPI) -> Limits:
    found: Limits = app.state.limits
    return found


def batch(n: int, user: str = "u1") -> dict[str, Any]:
    return {
        "batch": [
            {"type": "track", "event": "Product Viewed", "userId": user, "messageId": f"{user}-{i}"}
            for i in range(n)
        ]
    }


def from_address(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


async def test_a_batch_costs_its_events_and_over_the_key_limit_nothing_is_stored(
    database_url: str,
) -> None:
    settings = make_settings(
        database_url,
        rate_limit_key_burst=10,
        rate_limit_key_per_second=NEVER,
        rate_limit_client_burst=100_000,
    )
    async with serving(settings) as (url, _), httpx.AsyncClient(base_url=url, auth=AUTH) as http:
        assert (await http.post("/v1/batch", json=batch(8))).json()["accepted"] == 8
        refused = await http.post("/v1/batch", json=batch(5, "u2"))
        single = await http.post("/v1/track", json={"userId": "u3", "event": "Product Viewed"})

    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["code"] == "rate_limited"
    assert "KAERU_RATE_LIMIT_KEY_BURST" in refused.json()["message"]
    assert "10 events at once" in refused.json()["message"]
    assert single.status_code == 200  # 2 events were left: the refused batch took none
    assert [e.customer_id for e in events(settings)] == ["u1"] * 8 + ["u3"]


async def test_a_batch_with_more_events_than_the_burst_is_413_and_the_bucket_kept(
    sqlite_url: str,
) -> None:
    settings = make_settings(
        sqlite_url,
        rate_limit_client_burst=10,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=100_000,
    )
    async with (
        serving(settings) as (url, _),
        httpx.AsyncClient(base_url=url, auth=BROWSER_AUTH) as http,
    ):
        flood = await http.post("/v1/batch", json=batch(3000))
        honest = await http.post("/v1/batch", json=batch(10, "u2"))
    assert flood.status_code == 413  # no retry could ever let it through: Segment drops it
    assert flood.json()["code"] == "too_many_events"
    assert "3000 events" in flood.json()["message"]
    assert "KAERU_RATE_LIMIT_CLIENT_BURST" in flood.json()["message"]
    assert honest.status_code == 200  # the refused batch spent nothing
    assert {e.customer_id for e in events(settings)} == {"u2"}


async def test_each_client_address_behind_a_trusted_proxy_has_its_own_limit(
    sqlite_url: str,
) -> None:
    settings = make_settings(
        sqlite_url,
        trusted_proxies="127.0.0.0/8",
        rate_limit_client_burst=5,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=100_000,
    )
    async with (
        serving(settings) as (url, _),
        httpx.AsyncClient(base_url=url, auth=BROWSER_AUTH) as http,
    ):
        # The leftmost hop is written by the client itself: only the proxy's (rightmost)
        # one counts, so a forged first hop buys no fresh bucket.
        first = from_address("198.51.100.9, 203.0.113.7")
        assert (await http.post("/v1/batch", json=batch(5), headers=first)).status_code == 200
        forged = from_address("198.51.100.10, 203.0.113.7")
        over = await http.post("/v1/batch", json=batch(1, "u2"), headers=forged)
        other = await http.post(
            "/v1/batch", json=batch(5, "u3"), headers=from_address("203.0.113.8")
        )
    assert over.status_code == 429
    assert "KAERU_RATE_LIMIT_CLIENT_BURST" in over.json()["message"]
    assert other.status_code == 200


async def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url,
        rate_limit_client_burst=5,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=100_000,
    )
    async with (
        serving(settings) as (url, _),
        httpx.AsyncClient(base_url=url, auth=BROWSER_AUTH) as http,
    ):
        a = await http.post("/v1/batch", json=batch(5), headers=from_address("203.0.113.7"))
        b = await http.post("/v1/batch", json=batch(1, "u2"), headers=from_address("203.0.113.8"))
    assert a.status_code == 200
    assert b.status_code == 429  # one connection address, one bucket, whatever the header says


async def test_one_write_key_is_limited_across_all_its_clients(sqlite_url: str) -> None:
    settings = make_settings(
        sqlite_url,
        trusted_proxies="127.0.0.1",
        rate_limit_key_burst=5,
        rate_limit_key_per_second=NEVER,
        rate_limit_client_burst=100_000,
    )
    async with serving(settings) as (url, _), httpx.AsyncClient(base_url=url, auth=AUTH) as http:
        a = await http.post("/v1/batch", json=batch(5), headers=from_address("203.0.113.7"))
        b = await http.post("/v1/batch", json=batch(1, "u2"), headers=from_address("203.0.113.8"))
    assert a.status_code == 200
    assert b.status_code == 429
    assert "this write key" in b.json()["message"]


async def test_a_client_over_its_limit_is_refused_before_its_body_is_read(
    sqlite_url: str,
) -> None:
    settings = make_settings(
        sqlite_url,
        rate_limit_client_burst=3,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=100_000,
    )
    async with (
        serving(settings) as (url, _),
        httpx.AsyncClient(base_url=url, auth=BROWSER_AUTH) as http,
    ):
        assert (await http.post("/v1/batch", json=batch(3))).status_code == 200
        # A body that is not even JSON: a 400 if it were read, a 429 because it is not.
        refused = await http.post("/v1/batch", content=b"{not json")
    assert refused.status_code == 429


async def test_the_server_key_is_limited_per_key_not_per_client_address(
    sqlite_url: str,
) -> None:
    # A shop's backend sends every event from one or two addresses: the browser-sized
    # per-client limit must not throttle it, while its own key limit still does.
    settings = make_settings(
        sqlite_url,
        rate_limit_client_burst=3,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=10,
        rate_limit_key_per_second=NEVER,
    )
    async with serving(settings) as (url, _), httpx.AsyncClient(base_url=url) as http:
        server = [(await http.post("/v1/batch", json=batch(5), auth=AUTH)).status_code]
        server.append((await http.post("/v1/batch", json=batch(5, "u2"), auth=AUTH)).status_code)
        over_key = await http.post("/v1/batch", json=batch(1, "u3"), auth=AUTH)
        browser = await http.post("/v1/batch", json=batch(4, "u4"), auth=BROWSER_AUTH)
    assert server == [200, 200]  # 10 events from one address, over the client burst of 3
    assert over_key.status_code == 429
    assert "this write key" in over_key.json()["message"]
    assert browser.status_code == 413  # 4 events can never pass a client burst of 3


@pytest.fixture
def message(sqlite_url: str) -> str:
    with session(sqlite_url) as s:
        s.add(
            EmailMessage(
                key="cart-abandonment-u1/run-1/cart_email",
                message_id="<cart-email@kaeru>",
                customer_id="u1",
                journey_id="cart-abandonment-u1",
                step="cart_email",
                to_address="u1@example.com",
                subject="Your cart",
                status="sent",
                links=["https://shop.example/cart"],
            )
        )
    token = make_token(
        b"test-secret-0123456789abcdef-kaeru",
        TrackingToken("cart-abandonment-u1/run-1/cart_email", "o"),
    )
    return f"/t/o/{token}"


async def test_tracking_hits_over_the_client_limit_are_429_and_never_recorded(
    sqlite_url: str, message: str
) -> None:
    settings = make_settings(sqlite_url, tracking_limit_burst=2, tracking_limit_per_second=NEVER)
    async with serving(settings) as (url, _), httpx.AsyncClient(base_url=url) as http:
        answers = [await http.get(message) for _ in range(2)]
        recorded = count(settings, Touchpoint)
        over = await http.get(message)
        click = await http.get(message.replace("/t/o/", "/t/c/"))
        health = await http.get("/healthz")
    assert [a.status_code for a in answers] == [200, 200]
    assert recorded >= 1
    assert over.status_code == 429
    assert int(over.headers["Retry-After"]) >= 1
    assert "KAERU_TRACKING_LIMIT_BURST" in over.json()["message"]
    assert click.status_code == 429
    assert count(settings, Touchpoint) == recorded
    assert health.status_code == 200


async def test_the_official_client_waits_out_429s_and_every_event_arrives(
    sqlite_url: str,
) -> None:
    settings = make_settings(
        sqlite_url,
        rate_limit_key_burst=5,
        rate_limit_key_per_second=2,  # a 2-3 s wait per batch: no client is that slow
        rate_limit_client_burst=100_000,
    )
    errors: list[Exception] = []
    async with serving(settings) as (url, app):
        client = SegmentClient(
            WRITE_KEY,
            host=url,
            upload_size=5,
            upload_interval=0.05,
            on_error=lambda error, _batch: errors.append(error),
        )

        def send() -> None:
            for i in range(20):
                client.track(f"u{i}", "Product Viewed", message_id=f"m-{i}")
            client.flush()  # returns once every queued event was uploaded (or dropped)
            client.join()

        await asyncio.wait_for(asyncio.to_thread(send), timeout=120)
        refused = limits(app).refused["rate_limited"]
    assert errors == []
    assert sorted(e.message_id for e in events(settings)) == sorted(f"m-{i}" for i in range(20))
    assert refused >= 1  # it was limited, and retried after Retry-After


# ---- slow bodies and the concurrency limit -------------------------------------------------


async def _slow_request(url: str, length: int = 10_000) -> tuple[asyncio.StreamReader, Any]:
    """Open a connection and send the headers of a body that will arrive slowly (or never)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "POST /v1/batch HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Authorization: Basic dGVzdC13cml0ZS1rZXk6\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    return reader, writer


async def _until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(30):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"waited 30 s for {what}") from None


async def _end_of(reader: asyncio.StreamReader) -> bytes | None:
    """Everything the server sends until it closes; None if it reset the connection.

    A server that closes a socket with unread bytes in it (a client still sending) resets
    the connection, and the client's kernel may then drop an answer it had not yet read.
    """
    try:
        async with asyncio.timeout(30):
            return await reader.read()
    except ConnectionResetError:
        return None


async def test_a_stalled_body_is_answered_408_and_frees_its_slot(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, body_timeout=0.5)
    async with serving(settings) as (url, app):
        reader, writer = await _slow_request(url)
        writer.write(json.dumps(batch(300)).encode()[:100])  # then nothing more, ever
        answer = await _end_of(reader)
        writer.close()
        await _until(lambda: limits(app).in_flight == 0, "the slot to be freed")
        refused = limits(app).refused["body_timeout"]
    assert answer is not None
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["code"] == "body_timeout"
    assert b"KAERU_BODY_TIMEOUT" in body
    assert refused == 1
    assert events(settings) == []


async def test_a_body_that_keeps_dribbling_in_is_cut_off(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, body_timeout=0.5)
    async with serving(settings) as (url, app):
        reader, writer = await _slow_request(url)
        sent = 0

        async def dribble() -> None:
            nonlocal sent
            body = json.dumps(batch(300)).encode().ljust(10_000)
            with contextlib.suppress(ConnectionError):
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    sent += 1
                    await asyncio.sleep(0.02)

        dribbling = asyncio.create_task(dribble())
        answer = await _end_of(reader)
        dribbling.cancel()
        writer.close()
        await _until(lambda: limits(app).in_flight == 0, "the slot to be freed")
        refused = limits(app).refused["body_timeout"]
    assert answer is None or answer.startswith(b"HTTP/1.1 408")
    assert sent < 10_000
    assert refused == 1
    assert events(settings) == []


async def test_headers_that_dribble_in_lose_the_connection_and_keep_alive_still_works(
    sqlite_url: str,
) -> None:
    async with serving(make_settings(sqlite_url), header_timeout=0.5) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        sent = 0

        async def dribble() -> None:
            nonlocal sent
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode())
            with contextlib.suppress(ConnectionError):
                for _ in range(1000):
                    writer.write(b"X-Slow: y\r\n")
                    await writer.drain()
                    sent += 1
                    await asyncio.sleep(0.05)

        dribbling = asyncio.create_task(dribble())
        closed = await _end_of(reader)
        dribbling.cancel()
        writer.close()
        # A well-behaved client keeps its connection across requests and idle moments.
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(3):
                assert (await http.get("/healthz")).status_code == 200
    assert closed in (b"", None)  # no request ever started: nothing to answer, it is closed
    assert sent < 1000


async def test_over_the_concurrency_limit_is_503_and_healthz_still_answers(
    sqlite_url: str,
) -> None:
    settings = make_settings(sqlite_url, max_concurrent_requests=2, body_timeout=600)
    async with serving(settings) as (url, app):
        held = [await _slow_request(url), await _slow_request(url)]
        await _until(lambda: limits(app).in_flight == 2, "both slow requests to hold a slot")
        async with httpx.AsyncClient(base_url=url, auth=AUTH) as http:
            busy = await http.post("/v1/batch", json=batch(1))
            pixel = await http.get("/t/o/not-a-token")
            health = await http.get("/healthz")
            for _, writer in held:
                writer.close()
            await _until(lambda: limits(app).in_flight == 0, "the slots to be freed")
            after = await http.post("/v1/batch", json=batch(1))
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "1"
    assert busy.json()["code"] == "too_busy"
    assert "KAERU_MAX_CONCURRENT_REQUESTS" in busy.json()["message"]
    assert pixel.status_code == 503
    assert health.status_code == 200
    assert after.status_code == 200


def test_a_trusted_proxy_that_is_not_an_address_is_refused_at_start(sqlite_url: str) -> None:
    with pytest.raises(ValidationError, match=r"'proxy\.internal' is not an IP address or network"):
        make_settings(sqlite_url, trusted_proxies="10.0.0.0/8, proxy.internal")


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    limit = RateLimit(Rate(10, 2.0, "this write key", "events", "-"), clock=lambda: now[0])
    assert limit.wait("k", 10) == 0
    limit.take("k", 8)
    assert limit.wait("k", 2) == 0
    assert limit.wait("k", 5) == pytest.approx(1.5)  # 2 left, 3 more needed, at 2/s
    limit.take("k", 2)
    now[0] = 2.0
    assert limit.wait("k", 4) == 0  # refilled by 2 s × 2/s
    assert limit.wait("k", 5) == pytest.approx(0.5)
    now[0] = 100.0
    assert limit.wait("k", 10) == 0  # refilled to the burst, never past it
    limit.take("k", 10)
    assert limit.wait("k", 1) == pytest.approx(0.5)
    assert limit.wait("other", 10) == 0  # one bucket per caller


async def test_refusals_are_logged_once_a_minute_without_the_caller(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(
        sqlite_url,
        trusted_proxies="127.0.0.1",
        rate_limit_client_burst=1,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=100_000,
    )
    caplog.set_level("WARNING", logger="kaeru.api.limits")
    async with (
        serving(settings) as (url, app),
        httpx.AsyncClient(base_url=url, auth=BROWSER_AUTH) as http,
    ):
        client = from_address("203.0.113.7")
        answers = [await http.post("/v1/batch", json=batch(1), headers=client) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 429, 429, 429]
    assert limits(app).refused["rate_limited"] == 3
    [line] = [r.getMessage() for r in caplog.records if r.name == "kaeru.api.limits"]
    assert "rate_limited" in line and "KAERU_RATE_LIMIT_CLIENT_BURST" in line
    assert "203.0.113" not in line and WRITE_KEY not in line
