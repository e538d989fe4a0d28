"""Concurrent requests share transactions (group commit) without sharing their fate."""

from __future__ import annotations

import asyncio

import httpx

from kaeru.settings import Settings
from tests.starter.conftest import WRITE_KEY, events

AUTH = (WRITE_KEY, "")


def track(n: int, message_id: str) -> dict[str, object]:
    return {
        "userId": f"u{n % 10}",
        "event": "Product Added",
        "messageId": message_id,
        "properties": {"product_id": f"p{n}", "price": 5},
    }


async def test_concurrent_requests_are_each_stored_once(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    bodies = [track(n, f"m{n % 25}") for n in range(100)]  # every messageId four times
    answers = await asyncio.gather(*(api.post("/v1/track", json=b, auth=AUTH) for b in bodies))
    assert [a.status_code for a in answers] == [200] * 100
    stored = events(settings)
    assert sorted(e.message_id for e in stored) == sorted(f"m{n}" for n in range(25))
    # seq order is the order in which the events were stored, one per messageId.
    seqs = [e.seq or 0 for e in stored]
    assert seqs == sorted(seqs) and len(set(seqs)) == 25


async def test_a_bad_request_does_not_fail_its_neighbours(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    good = [api.post("/v1/track", json=track(n, f"ok-{n}"), auth=AUTH) for n in range(20)]
    bad = [
        api.post("/v1/track", json={**track(n, f"bad-{n}"), "userId": {"x": 1}}, auth=AUTH)
        for n in range(5)
    ]
    answers = await asyncio.gather(*good, *bad)
    assert [a.status_code for a in answers[:20]] == [200] * 20
    assert [a.status_code for a in answers[20:]] == [400] * 5
    assert sorted(e.message_id for e in events(settings)) == sorted(f"ok-{n}" for n in range(20))
