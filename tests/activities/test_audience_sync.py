"""Batched audience sync: queued joins and leaves flushed to real loopback Meta and Google APIs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import httpx
import pytest
from sqlmodel import select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.ads import email_sha256
from activities.audience_sync import AudienceSyncActivities
from activities.google_ads import google_email_sha256
from activities.types import (
    AUDIENCE_PENDING,
    AUDIENCE_REJECTED,
    AudienceChange,
    AudienceTargets,
    FlushInput,
    FlushResult,
)
from kaeru.db import session
from kaeru.models import AudienceChangeRow, AudienceJoin, Customer
from kaeru.settings import Settings
from tests.conftest import make_settings
from tests.support.google_ads_api import BAD_TOKEN, GoogleAdsServer, rate_limited
from tests.support.graph_api import RATE_LIMITED, Answer, GraphAPIServer


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
def graph() -> Iterator[GraphAPIServer]:
    with GraphAPIServer() as server:
        yield server


@pytest.fixture
def google() -> Iterator[GoogleAdsServer]:
    with GoogleAdsServer() as server:
        yield server


def both(url: str, graph: GraphAPIServer, google: GoogleAdsServer, **more: object) -> Settings:
    return make_settings(
        url,
        meta_graph_url=graph.url,
        meta_access_token=graph.token,
        meta_audience_id=graph.audience_id,
        **google.settings(),
        **more,
    )


def shoppers(url: str, n: int) -> list[str]:
    """``n`` customers with consent (the test settings count unknown consent as yes)."""
    ids = [f"c{i}" for i in range(n)]
    with session(url) as s:
        for i, customer_id in enumerate(ids):
            s.add(Customer(customer_id=customer_id, email=f" First.Last{i}@GMail.com "))
    return ids


def join(customer_id: str, journey: str = "cart-abandonment") -> AudienceChange:
    journey_id = f"{journey}-{customer_id}"
    return AudienceChange(
        key=f"{journey_id}/r1/ad_audience",
        journey_id=journey_id,
        step="ad_audience",
        customer_id=customer_id,
        audience="cart-retargeting",
    )


def leave(customer_id: str, journey: str = "cart-abandonment") -> AudienceChange:
    joined = join(customer_id, journey)
    return AudienceChange(
        key=f"{joined.journey_id}/r1/leave-cart-retargeting",
        journey_id=joined.journey_id,
        step="leave-cart-retargeting",
        customer_id=customer_id,
        audience=joined.audience,
        joined_key=joined.key,
    )


async def run(sync: AudienceSyncActivities, name: str, arg: object) -> object:
    return await ActivityEnvironment().run(getattr(sync, name), arg)


async def flush(sync: AudienceSyncActivities) -> FlushResult:
    result = await run(sync, "flush_audience_changes", FlushInput())
    assert isinstance(result, FlushResult)
    return result


def meta_hash(i: int) -> str:
    return email_sha256(f"first.last{i}@gmail.com")


def google_hash(i: int) -> str:
    return hashlib.sha256(f"firstlast{i}@gmail.com".encode()).hexdigest()


def test_google_normalises_gmail_addresses_as_it_asks() -> None:
    assert (
        google_email_sha256(" First.Last@GoogleMail.com ")
        == hashlib.sha256(b"firstlast@googlemail.com").hexdigest()
    )
    assert google_email_sha256("First.Last@Example.com") == email_sha256("first.last@example.com")


async def test_joins_and_leaves_go_in_batches_to_meta_and_google(
    database_url: str, http: httpx.AsyncClient, graph: GraphAPIServer, google: GoogleAdsServer
) -> None:
    settings = both(database_url, graph, google, meta_batch_size=10, google_ads_batch_size=10)
    sync = AudienceSyncActivities(settings, http)
    ids = shoppers(database_url, 25)
    for customer_id in ids:
        queued = await run(sync, "queue_audience_join", join(customer_id))
        assert isinstance(queued, AudienceTargets) and queued.pending
        assert [t.provider for t in queued.targets] == ["meta", "google"]
    # A retried queue step queues nothing twice.
    await run(sync, "queue_audience_join", join(ids[0]))
    with pytest.raises(ApplicationError) as pending:
        impatient = AudienceSyncActivities(settings, http, confirm_watch=timedelta(0))
        await run(impatient, "confirm_audience_change", join(ids[0]))
    assert pending.value.type == AUDIENCE_PENDING and not pending.value.non_retryable

    result = await flush(sync)

    assert (result.batches, result.applied) == (6, 50)  # ⌈25/10⌉ per provider
    posts = [r for r in graph.requests if r.method == "POST"]
    assert [len(r.body["payload"]["data"]) for r in posts] == [10, 10, 5]
    assert graph.member_hashes() == {meta_hash(i) for i in range(25)}
    assert len(google.runs()) == 3
    assert google.members == {google_hash(i) for i in range(25)}
    for request in google.requests:
        assert request.headers["developer-token"] == google.developer_token
    confirmed = await run(sync, "confirm_audience_change", join(ids[3]))
    assert isinstance(confirmed, AudienceTargets) and len(confirmed.targets) == 2

    for customer_id in ids:
        await run(sync, "queue_audience_leave", leave(customer_id))
    result = await flush(sync)

    assert (result.batches, result.applied) == (6, 50)
    deletes = [r for r in graph.requests if r.method == "DELETE"]
    assert [len(r.body["payload"]["data"]) for r in deletes] == [10, 10, 5]
    assert graph.member_hashes() == set() and google.members == set()
    with session(database_url) as s:
        joins = list(s.exec(select(AudienceJoin)))
    assert len(joins) == 50 and all(j.left_at is not None for j in joins)
    assert await flush(sync) == FlushResult()  # nothing left: no request at all
    assert len(graph.requests) == 6


async def test_a_leave_queued_after_a_join_in_the_same_window_wins(
    sqlite_url: str, http: httpx.AsyncClient, graph: GraphAPIServer, google: GoogleAdsServer
) -> None:
    sync = AudienceSyncActivities(both(sqlite_url, graph, google), http)
    [alice] = shoppers(sqlite_url, 1)
    graph.members[graph.audience_id].add(meta_hash(0))  # in the audience from long ago

    await run(sync, "queue_audience_join", join(alice))
    await run(sync, "queue_audience_leave", leave(alice))
    result = await flush(sync)

    assert result.superseded == 2 and result.applied == 2
    assert [r.method for r in graph.requests] == ["DELETE"]
    assert graph.member_hashes() == set() and google.members == set()
    # The journey that waited for its join learns it is settled (superseded by the leave).
    await run(sync, "confirm_audience_change", join(alice))


async def test_a_429_is_retried_after_the_retry_after_it_asked_for(
    sqlite_url: str, http: httpx.AsyncClient, graph: GraphAPIServer, google: GoogleAdsServer
) -> None:
    sync = AudienceSyncActivities(both(sqlite_url, graph, google), http)
    [alice] = shoppers(sqlite_url, 1)
    await run(sync, "queue_audience_join", join(alice))

    limited = Answer(RATE_LIMITED.status, RATE_LIMITED.body, {"Retry-After": "7"})
    graph.answer_next(limited)
    with pytest.raises(ApplicationError) as meta_busy:
        await flush(sync)
    assert not meta_busy.value.non_retryable
    assert meta_busy.value.next_retry_delay == timedelta(seconds=7)

    google.answer_next(rate_limited(9))
    with pytest.raises(ApplicationError) as google_busy:
        await flush(sync)
    assert google_busy.value.next_retry_delay == timedelta(seconds=9)
    assert "RESOURCE_EXHAUSTED" in google_busy.value.message

    result = await flush(sync)  # Temporal's retry, after the wait
    assert result.applied == 1  # Meta's batch was marked by the attempt before
    assert graph.member_hashes() == {meta_hash(0)} and google.members == {google_hash(0)}
    assert len(google.runs()) == 1


async def test_a_crash_between_sending_and_marking_applies_each_change_once(
    database_url: str, http: httpx.AsyncClient, graph: GraphAPIServer, google: GoogleAdsServer
) -> None:
    settings = both(database_url, graph, google)
    [alice, bob] = shoppers(database_url, 2)
    crashed = AudienceSyncActivities(settings, http)
    await run(crashed, "queue_audience_join", join(alice))
    await run(crashed, "queue_audience_join", join(bob))
    # The worker claims and sends Meta's batch, then dies before marking it.
    claimed = crashed._next_batch(1000, FlushResult())
    assert claimed is not None and claimed[0].provider == "meta"
    await crashed._send(*claimed)
    # Meanwhile Alice's journey ends: her leave is queued after the batch that holds her join.
    await run(crashed, "queue_audience_leave", leave(alice))

    result = await flush(AudienceSyncActivities(settings, http))  # Temporal's retry

    # The unfinished batch went again first (a set operation), then the leave: in order.
    assert [r.method for r in graph.requests] == ["POST", "POST", "DELETE"]
    assert graph.member_hashes() == {meta_hash(1)}
    # Google's join of Alice was still queued: her leave supersedes it, Bob's goes alone.
    assert google.members == {google_hash(1)}
    assert result.superseded == 1
    with session(database_url) as s:
        rows = list(s.exec(select(AudienceChangeRow)))
    assert len(rows) == 6 and all(r.applied_at is not None for r in rows)
    assert await flush(AudienceSyncActivities(settings, http)) == FlushResult()


async def test_a_google_job_that_ran_before_the_crash_is_not_run_again(
    sqlite_url: str, http: httpx.AsyncClient, google: GoogleAdsServer
) -> None:
    settings = make_settings(sqlite_url, **google.settings())
    [alice, bob] = shoppers(sqlite_url, 2)
    sync = AudienceSyncActivities(settings, http)
    await run(sync, "queue_audience_join", join(alice))
    await run(sync, "queue_audience_join", join(bob))
    claimed = sync._next_batch(1000, FlushResult())
    assert claimed is not None
    await sync._send(*claimed)  # created, filled and ran the job; then the worker died
    assert len(google.runs()) == 1

    result = await flush(sync)

    assert result.applied == 2 and len(google.runs()) == 1 and len(google.jobs) == 1
    assert google.members == {google_hash(0), google_hash(1)}
    await run(sync, "confirm_audience_change", join(alice))


async def test_a_refused_batch_tells_the_waiting_journey_how_to_fix_it(
    sqlite_url: str, http: httpx.AsyncClient, google: GoogleAdsServer
) -> None:
    sync = AudienceSyncActivities(make_settings(sqlite_url, **google.settings()), http)
    [alice] = shoppers(sqlite_url, 1)
    await run(sync, "queue_audience_join", join(alice))
    google.answer_next(BAD_TOKEN)

    result = await flush(sync)

    assert result.rejected == 1 and google.members == set()
    with pytest.raises(ApplicationError) as refused:
        await run(sync, "confirm_audience_change", join(alice))
    assert refused.value.type == AUDIENCE_REJECTED and refused.value.non_retryable
    assert "UNAUTHENTICATED" in refused.value.message
    assert "KAERU_GOOGLE_ADS_ACCESS_TOKEN" in refused.value.message


async def test_the_local_store_applies_at_once(sqlite_url: str, http: httpx.AsyncClient) -> None:
    sync = AudienceSyncActivities(make_settings(sqlite_url), http)
    [alice] = shoppers(sqlite_url, 1)
    queued = await run(sync, "queue_audience_join", join(alice))
    assert isinstance(queued, AudienceTargets) and not queued.pending
    await run(sync, "confirm_audience_change", join(alice))
    left = await run(sync, "queue_audience_leave", leave(alice))
    assert isinstance(left, AudienceTargets) and [t.provider for t in left.targets] == ["local"]
    assert await flush(sync) == FlushResult()
