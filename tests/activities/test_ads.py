"""Ad audiences: the local store on SQLite and PostgreSQL, Meta through a real loopback server."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlmodel import select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.ads import AUDIENCE_UNAVAILABLE, AudienceActivities, email_sha256
from activities.types import (
    AUDIENCE_REJECTED,
    NO_EMAIL_ADDRESS,
    NOT_CONSENTED,
    AudienceChange,
    AudienceResult,
    ParkRemoval,
    SweepInput,
    SweepResult,
)
from kaeru.consent import set_consent
from kaeru.db import session
from kaeru.models import AudienceJoin, AudienceMember, Customer, Suppression, utcnow
from kaeru.settings import Settings
from tests.activities.factories import add_customer, touchpoints
from tests.conftest import make_settings
from tests.support.graph_api import (
    AUDIENCE_THROTTLED,
    BAD_TOKEN,
    INVALID_PARAMETER,
    RATE_LIMITED,
    SERVER_ERROR,
    Answer,
    GraphAPIServer,
    graph_error,
)

JOURNEY = "cart-abandonment-c1"
ALICE_HASH = hashlib.sha256(b"alice@example.com").hexdigest()


def change(step: str = "ad_audience", customer_id: str = "c1") -> AudienceChange:
    return AudienceChange(
        key=f"{JOURNEY}/run-1/{step}",
        journey_id=JOURNEY,
        step=step,
        customer_id=customer_id,
        audience="cart-retargeting",
    )


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def meta_settings(url: str, graph: GraphAPIServer, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "meta_graph_url": graph.url,
        "meta_access_token": graph.token,
        "meta_audience_id": graph.audience_id,
    }
    values.update(overrides)
    return make_settings(url, **values)


async def add(settings: Settings, http: httpx.AsyncClient, what: AudienceChange) -> AudienceResult:
    result: AudienceResult = await ActivityEnvironment().run(
        AudienceActivities(settings, http).add_to_audience, what
    )
    return result


async def remove(
    settings: Settings, http: httpx.AsyncClient, what: AudienceChange
) -> AudienceResult:
    result: AudienceResult = await ActivityEnvironment().run(
        AudienceActivities(settings, http).remove_from_audience, what
    )
    return result


async def failure(settings: Settings, http: httpx.AsyncClient) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await add(settings, http, change())
    return caught.value


def members(url: str) -> list[AudienceMember]:
    with session(url) as s:
        return list(s.exec(select(AudienceMember)))


def test_hash_is_of_the_trimmed_lower_cased_address() -> None:
    assert email_sha256("  Alice@Example.COM\n") == ALICE_HASH
    assert len(ALICE_HASH) == 64


# ---- the local audience store ----------------------------------------------------------------


async def test_local_store_add_and_remove_are_idempotent(
    database_url: str, http: httpx.AsyncClient
) -> None:
    add_customer(database_url, "c1", " Alice@Example.com ")
    settings = make_settings(database_url)
    joined = change()

    assert await add(settings, http, joined) == AudienceResult("local", "cart-retargeting")
    await add(settings, http, joined)  # a retry

    [member] = members(database_url)
    assert (member.audience, member.customer_id, member.email_sha256, member.journey_id) == (
        "cart-retargeting",
        "c1",
        ALICE_HASH,
        JOURNEY,
    )
    [tp] = touchpoints(database_url)
    assert (tp.kind, tp.key, tp.step) == ("audience_joined", joined.key, "ad_audience")
    assert tp.detail == {
        "audience": "cart-retargeting",
        "provider": "local",
        "audience_id": "cart-retargeting",
    }

    left = change("leave-cart-retargeting")
    assert await remove(settings, http, left) == AudienceResult("local", "cart-retargeting")
    await remove(settings, http, left)

    assert members(database_url) == []
    assert [(t.kind, t.key) for t in touchpoints(database_url)] == [
        ("audience_joined", joined.key),
        ("audience_left", left.key),
    ]


async def test_customer_without_email_cannot_join(
    database_url: str, http: httpx.AsyncClient
) -> None:
    add_customer(database_url, "c1", None)
    settings = make_settings(database_url)

    for customer in ("c1", "nobody"):
        with pytest.raises(ApplicationError) as caught:
            await add(settings, http, change(customer_id=customer))
        assert (caught.value.type, caught.value.non_retryable) == (NO_EMAIL_ADDRESS, True)
        assert "identify" in caught.value.message
    assert members(database_url) == [] and touchpoints(database_url) == []


# ---- consent ---------------------------------------------------------------------------------


def consent_to(url: str, customer_id: str, subscribed: bool, kind: str | None = None) -> None:
    with session(url) as s:
        set_consent(s, customer_id, "email", subscribed, "api", kind=kind)


@pytest.mark.parametrize(
    ("said", "why"),
    [
        (None, "never consented"),
        (False, "unsubscribed from email marketing"),
        ("kind", "opted out of cart-abandonment"),
        ("suppressed", "suppression list (complaint)"),
    ],
)
async def test_a_customer_without_consent_never_joins_an_audience(
    database_url: str,
    http: httpx.AsyncClient,
    graph_api: GraphAPIServer,
    said: object,
    why: str,
) -> None:
    add_customer(database_url, "c1", "alice@example.com")
    if said is False:
        consent_to(database_url, "c1", False)
    elif said == "kind":
        consent_to(database_url, "c1", True)
        consent_to(database_url, "c1", False, kind="cart-abandonment")
    elif said == "suppressed":
        consent_to(database_url, "c1", True)
        with session(database_url) as s:
            s.add(Suppression(email="alice@example.com", reason="complaint"))
    settings = meta_settings(database_url, graph_api, unknown_consent_is_yes=False)

    with pytest.raises(ApplicationError) as caught:
        await add(settings, http, change())

    assert (caught.value.type, caught.value.non_retryable) == (NOT_CONSENTED, True)
    assert why in caught.value.message
    assert "alice@" not in caught.value.message  # masked: the error lands in the history
    assert graph_api.requests == [] and graph_api.member_hashes() == set()
    assert touchpoints(database_url) == []


async def test_a_subscribed_customer_joins_and_unknown_joins_only_when_it_counts_as_yes(
    sqlite_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    add_customer(sqlite_url, "c1", "alice@example.com")
    add_customer(sqlite_url, "c2", "bob@example.com")
    consent_to(sqlite_url, "c1", True)
    strict = meta_settings(sqlite_url, graph_api, unknown_consent_is_yes=False)
    await add(strict, http, change())
    assert graph_api.member_hashes() == {ALICE_HASH}
    lenient = meta_settings(sqlite_url, graph_api, unknown_consent_is_yes=True)
    await add(lenient, http, change(customer_id="c2"))
    assert len(graph_api.member_hashes()) == 2


# ---- Meta Custom Audiences -------------------------------------------------------------------


async def test_meta_add_and_remove(
    database_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    add_customer(database_url, "c1", "ALICE@example.com ")
    settings = meta_settings(database_url, graph_api)

    result = await add(settings, http, change())

    assert result == AudienceResult("meta", graph_api.audience_id)
    assert graph_api.member_hashes() == {ALICE_HASH}
    [request] = graph_api.requests
    assert request.method == "POST"
    assert request.path == f"/v21.0/{graph_api.audience_id}/users"
    assert request.body["payload"] == {"schema": "EMAIL_SHA256", "data": [ALICE_HASH]}
    assert "access_token" not in request.query  # secrets stay out of logged URLs
    assert members(database_url) == []  # Meta holds the audience, not the local store

    left = change("leave-cart-retargeting")
    assert await remove(settings, http, left) == AudienceResult("meta", graph_api.audience_id)

    assert graph_api.member_hashes() == set()
    assert graph_api.requests[-1].method == "DELETE"
    assert [(t.kind, t.detail["provider"]) for t in touchpoints(database_url)] == [
        ("audience_joined", "meta"),
        ("audience_left", "meta"),
    ]


@pytest.mark.parametrize(
    ("answer", "code", "fix"),
    [
        (INVALID_PARAMETER, "code 100", "KAERU_META_AUDIENCE_ID"),
        (BAD_TOKEN, "code 190", "KAERU_META_ACCESS_TOKEN"),
    ],
)
async def test_meta_refusal_is_not_retried(
    sqlite_url: str,
    http: httpx.AsyncClient,
    graph_api: GraphAPIServer,
    answer: Answer,
    code: str,
    fix: str,
) -> None:
    add_customer(sqlite_url, "c1", "alice@example.com")
    graph_api.answer_next(answer)

    error = await failure(meta_settings(sqlite_url, graph_api), http)

    assert (error.type, error.non_retryable) == (AUDIENCE_REJECTED, True)
    assert "HTTP 400" in error.message and code in error.message and fix in error.message
    assert "fbtrace_id" in error.message
    assert graph_api.member_hashes() == set() and touchpoints(sqlite_url) == []


async def test_meta_rejects_a_wrong_token_and_audience_for_real(
    sqlite_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    """Not scripted: the fake validates like Meta, and kaeru reads its answers."""
    add_customer(sqlite_url, "c1", "alice@example.com")

    token = await failure(
        meta_settings(sqlite_url, graph_api, meta_access_token="EAAB-stale-token"), http
    )
    audience = await failure(meta_settings(sqlite_url, graph_api, meta_audience_id="404"), http)

    assert token.type == audience.type == AUDIENCE_REJECTED
    assert "Invalid OAuth access token" in token.message
    assert "Object with ID '404' does not exist" in audience.message
    assert "EAAB-stale-token" not in token.message  # never echo the token


@pytest.mark.parametrize(
    "answer",
    [
        RATE_LIMITED,
        SERVER_ERROR,
        AUDIENCE_THROTTLED,
        graph_error(400, 12345, "Temporary issue", is_transient=True),
    ],
    ids=["429", "500", "400-code-80003", "400-is-transient"],
)
async def test_meta_busy_is_retried_and_the_retry_succeeds(
    sqlite_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer, answer: Answer
) -> None:
    add_customer(sqlite_url, "c1", "alice@example.com")
    settings = meta_settings(sqlite_url, graph_api)
    graph_api.answer_next(answer)

    error = await failure(settings, http)

    assert (error.type, error.non_retryable) == (AUDIENCE_UNAVAILABLE, False)
    assert touchpoints(sqlite_url) == []
    assert (await add(settings, http, change())).provider == "meta"  # what Temporal's retry does
    assert graph_api.member_hashes() == {ALICE_HASH}
    assert len(touchpoints(sqlite_url, "audience_joined")) == 1


async def test_meta_unreachable_is_retried(sqlite_url: str, http: httpx.AsyncClient) -> None:
    add_customer(sqlite_url, "c1", "alice@example.com")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = make_settings(
        sqlite_url,
        meta_graph_url=f"http://127.0.0.1:{port}/v21.0",
        meta_access_token="t",
        meta_audience_id="1",
    )

    error = await failure(settings, http)

    assert (error.type, error.non_retryable) == (AUDIENCE_UNAVAILABLE, False)
    assert "KAERU_META_GRAPH_URL" in error.message


# ---- leaving removes what was added; a removal that fails for good is parked ------------------


def leave(joined: AudienceChange) -> AudienceChange:
    """The leave step of the journey that made ``joined``, naming the add it undoes."""
    left = change("leave-cart-retargeting", customer_id=joined.customer_id)
    left.joined_key = joined.key
    return left


def change_email(url: str, customer_id: str, email: str) -> None:
    with session(url) as s:
        customer = s.get(Customer, customer_id)
        assert customer is not None
        customer.email = email
        s.add(customer)


async def test_leaving_removes_the_hash_that_was_added(
    database_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    add_customer(database_url, "c1", "alice@example.com")
    settings = meta_settings(database_url, graph_api)
    joined = change()
    await add(settings, http, joined)
    change_email(database_url, "c1", "bob@example.com")  # identify with a new address

    await remove(settings, http, leave(joined))

    assert graph_api.member_hashes() == set()
    assert graph_api.requests[-1].body["payload"]["data"] == [ALICE_HASH]
    [row] = joins(database_url)
    assert row.email_sha256 == ALICE_HASH and row.left_at is not None


async def test_leaving_works_after_the_address_is_gone(
    database_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    add_customer(database_url, "c1", "alice@example.com")
    settings = meta_settings(database_url, graph_api)
    joined = change()
    await add(settings, http, joined)
    with session(database_url) as s:
        customer = s.get(Customer, "c1")
        assert customer is not None
        customer.email = None
        s.add(customer)

    await remove(settings, http, leave(joined))
    assert graph_api.member_hashes() == set()


async def test_a_removal_that_failed_for_good_is_parked_then_swept(
    database_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    add_customer(database_url, "c1", "alice@example.com")
    settings = meta_settings(database_url, graph_api)
    ads = AudienceActivities(settings, http)
    joined = change()
    await add(settings, http, joined)

    # The journey's removal ran out of retries; it parks the removal with the reason.
    left = leave(joined)
    await ActivityEnvironment().run(
        ads.park_audience_removal, ParkRemoval(change=left, reason="Meta is busy (HTTP 429)")
    )
    [row] = joins(database_url)
    assert row.left_at is None and row.removal_error == "Meta is busy (HTTP 429)"
    assert row.retry_at is not None

    # The sweeper's first try fails too: the row stays parked, to be tried later.
    graph_api.answer_next(RATE_LIMITED)
    first = await sweep(ads)
    assert (first.tried, first.removed) == (1, 0)
    [row] = joins(database_url)
    assert row.removal_attempts == 1 and row.retry_at is not None and row.left_at is None
    assert "busy" in (row.removal_error or "")
    assert graph_api.member_hashes() == {ALICE_HASH}
    assert (await sweep(ads)).tried == 0  # not due yet

    with session(database_url) as s:  # time passes
        due = s.get(AudienceJoin, joined.key)
        assert due is not None and due.retry_at is not None
        due.retry_at = due.retry_at - timedelta(days=2)
        s.add(due)
    second = await sweep(ads)
    assert (second.tried, second.removed) == (1, 1)
    assert graph_api.member_hashes() == set()
    [row] = joins(database_url)
    assert row.left_at is not None and row.retry_at is None and row.removal_error is None
    assert [t.kind for t in touchpoints(database_url)] == ["audience_joined", "audience_left"]


async def sweep(ads: AudienceActivities) -> SweepResult:
    result: SweepResult = await ActivityEnvironment().run(ads.retry_audience_removals, SweepInput())
    return result


def joins(url: str) -> list[AudienceJoin]:
    with session(url) as s:
        return list(s.exec(select(AudienceJoin)))


def rejoin(joined: AudienceChange) -> AudienceChange:
    """The add step of the customer's next journey run."""
    return dataclasses.replace(joined, key=joined.key.replace("/run-1/", "/run-2/"))


async def park(ads: AudienceActivities, joined: AudienceChange, reason: str) -> None:
    await ActivityEnvironment().run(
        ads.park_audience_removal, ParkRemoval(change=leave(joined), reason=reason)
    )


async def test_the_sweep_keeps_a_member_a_later_journey_added_again(
    database_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    """The token expired (190, not retryable), the removal parked; the token was fixed and
    the next journey added the shopper again: the sweep must not take them out."""
    add_customer(database_url, "c1", "alice@example.com")
    settings = meta_settings(database_url, graph_api)
    ads = AudienceActivities(settings, http)
    joined = change()
    await add(settings, http, joined)
    await park(ads, joined, "Meta refused (code 190)")
    await add(settings, http, rejoin(joined))

    result = await sweep(ads)

    assert (result.tried, result.removed) == (1, 0)
    assert graph_api.member_hashes() == {ALICE_HASH}
    assert [r.method for r in graph_api.requests] == ["POST", "POST"]
    parked, live = sorted(joins(database_url), key=lambda r: r.key)
    assert parked.left_at is not None and parked.retry_at is None
    assert "superseded" in (parked.removal_error or "")
    assert live.left_at is None and live.retry_at is None
    assert (await sweep(ads)).tried == 0


async def test_the_sweep_keeps_a_local_member_a_later_journey_added_again(
    database_url: str, http: httpx.AsyncClient
) -> None:
    add_customer(database_url, "c1", "alice@example.com")
    settings = make_settings(database_url)
    ads = AudienceActivities(settings, http)
    joined = change()
    await add(settings, http, joined)
    await park(ads, joined, "the database was read-only")
    await add(settings, http, rejoin(joined))

    result = await sweep(ads)

    assert (result.tried, result.removed) == (1, 0)
    assert [m.customer_id for m in members(database_url)] == ["c1"]
    parked, live = sorted(joins(database_url), key=lambda r: r.key)
    assert parked.left_at is not None and "superseded" in (parked.removal_error or "")
    assert live.left_at is None


async def test_one_rows_unexpected_error_does_not_stop_the_sweep(
    database_url: str, http: httpx.AsyncClient, graph_api: GraphAPIServer
) -> None:
    """A row whose removal raises something other than ApplicationError (here httpx refuses
    the URL of a stored audience id with a newline) waits longer; the rows after it are
    still swept, and it is not first again next time."""
    add_customer(database_url, "c1", "alice@example.com")
    add_customer(database_url, "c2", "bob@example.com")
    settings = meta_settings(database_url, graph_api)
    ads = AudienceActivities(settings, http)
    broken, fine = change(), change(customer_id="c2")
    fine.key, fine.journey_id = "cart-abandonment-c2/run-1/ad_audience", "cart-abandonment-c2"
    for joined in (broken, fine):
        await add(settings, http, joined)
        await park(ads, joined, "Meta is busy (HTTP 429)")
    with session(database_url) as s:
        row = s.get(AudienceJoin, broken.key)
        assert row is not None and row.retry_at is not None
        row.audience_id, row.retry_at = "2385\n0001", row.retry_at - timedelta(minutes=1)
        s.add(row)

    result = await sweep(ads)

    assert (result.tried, result.removed) == (2, 1)
    assert graph_api.member_hashes() == {ALICE_HASH}
    with session(database_url) as s:
        failed, swept = s.get(AudienceJoin, broken.key), s.get(AudienceJoin, fine.key)
        assert failed is not None and swept is not None
        assert failed.left_at is None and failed.removal_attempts == 1
        assert failed.retry_at is not None and failed.retry_at > utcnow()
        assert "InvalidURL" in (failed.removal_error or "")
        assert swept.left_at is not None
