"""The steering endpoints of the admin API: the kill switch, and pause, resume or cancel of one
journey (on the dev server with a real worker), their refusals and their audit entries."""

from __future__ import annotations

import httpx
import pytest

from kaeru.audit import entries
from kaeru.holds import PAUSED
from kaeru.kill_switch import switches
from kaeru.search_attributes import HELD
from starter.app import create_app
from starter.steering import API_ACTOR
from tests.conftest import make_settings
from tests.kaeru.test_cli_hold import (  # noqa: F401 - fixtures
    Stack,
    smtp,
    stack,
    until,
)
from tests.starter.conftest import OPERATOR, asgi_client
from tests.support.cli import clean_environment  # noqa: F401 - a fixture
from tests.workflows.conftest import SETTINGS, SHOE

SWITCH = "/v1/admin/kill-switch"


def journey(workflow_id: str, action: str) -> str:
    return f"/v1/admin/journeys/{workflow_id}/{action}"


def audited(url: str) -> list[tuple[str, str]]:
    """The audit log's (action, target) pairs, oldest first, all by the API's actor."""
    found = list(reversed(entries(url)))
    assert {e.actor for e in found} <= {API_ACTOR}
    return [(e.action, e.target) for e in found]


def refusal(answer: httpx.Response, status: int, code: str) -> str:
    assert answer.status_code == status, answer.text
    assert answer.json()["code"] == code, answer.text
    message: str = answer.json()["message"]
    return message


async def test_the_kill_switch_over_the_api(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, temporal_address="127.0.0.1:1")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        for path in (f"{SWITCH}/on", f"{SWITCH}/off"):
            refusal(await api.post(path, json={}), 401, "unauthorized")
        assert (await api.get(SWITCH)).status_code == 401
        known = refusal(
            await api.post(f"{SWITCH}/on", json={"kind": "nope"}, headers=OPERATOR),
            422,
            "unknown_kind",
        )
        assert "there is no journey kind 'nope'" in known and "cart-abandonment" in known
        refusal(
            await api.post(f"{SWITCH}/on", json={"kind": "welcome", "all": True}, headers=OPERATOR),
            422,
            "bad_request",
        )
        on = await api.post(f"{SWITCH}/on", json={"reason": "wrong prices"}, headers=OPERATOR)
        assert on.status_code == 200, on.text
        assert on.json()["changed"] is True
        assert on.json()["switch"] | {"since": None} == {
            "scope": "*",
            "covers": "marketing journeys",
            "include_transactional": False,
            "since": None,
            "by": API_ACTOR,
            "reason": "wrong prices",
            "held": None,
        }
        again = await api.post(f"{SWITCH}/on", json={}, headers=OPERATOR)
        assert again.json()["changed"] is False

        status = (await api.get(SWITCH, headers=OPERATOR)).json()
        assert [s["reason"] for s in status["on"]] == ["wrong prices"]
        assert status["paused"] is None and "cannot reach Temporal" in status["temporal_problem"]

        not_on = refusal(
            await api.post(f"{SWITCH}/off", json={"kind": "welcome"}, headers=OPERATOR),
            409,
            "not_on",
        )
        assert "the welcome kill switch is not on" in not_on
        # Temporal down: the switch is off all the same, and the answer says the release failed.
        off = await api.post(f"{SWITCH}/off", json={}, headers=OPERATOR)
        assert off.status_code == 200, off.text
        assert "cannot reach Temporal" in off.json()["release_problem"]
        assert switches(sqlite_url) == []

        down = await api.post(journey("cart-abandonment-c-1", "pause"), json={}, headers=OPERATOR)
        assert "cannot reach Temporal" in refusal(down, 503, "temporal_unavailable")
    assert audited(sqlite_url) == [("kill_switch.on", "*"), ("kill_switch.off", "*")]


async def test_one_journey_is_paused_resumed_and_cancelled_over_the_api(
    stack: Stack,  # noqa: F811 - the fixture
) -> None:
    shopper, url = stack.shopper, stack.env["KAERU_DATABASE_URL"]
    shopper.settings = SETTINGS  # its email is a day away: the steering is what this is about
    settings = make_settings(url, temporal_address=stack.env["KAERU_TEMPORAL_ADDRESS"])
    async with asgi_client(create_app(settings, run_router=False)) as api:
        nobody = await api.post(journey("cart-abandonment-nobody", "pause"), headers=OPERATOR)
        assert "no journey with id 'cart-abandonment-nobody'" in refusal(nobody, 404, "not_found")
        # An id with a slash in it (a customer id may have one) travels escaped.
        slashed = await api.post(journey("cart-abandonment-a%2Fb", "pause"), headers=OPERATOR)
        assert "no journey with id 'cart-abandonment-a/b'" in refusal(slashed, 404, "not_found")
        await shopper.cart("Product Added", **SHOE)
        await shopper.wait_for_step("cart_quiet")
        journey_id = shopper.journey_id

        paused = await api.post(
            journey(journey_id, "pause"), json={"reason": "checking"}, headers=OPERATOR
        )
        assert paused.status_code == 200, paused.text
        assert paused.json()["changed"] is True

        async def held_is(value: str | None) -> bool:
            return (await shopper.handle.describe()).typed_search_attributes.get(HELD) == value

        await until(lambda: held_is(PAUSED), "KaeruHeld says paused")
        assert "paused by api:operator: checking" in (await shopper.status()).story[-1]
        again = await api.post(journey(journey_id, "pause"), json={}, headers=OPERATOR)
        assert again.json()["changed"] is False

        async def counted() -> bool:
            return bool((await api.get(SWITCH, headers=OPERATOR)).json()["paused"] == 1)

        await until(counted, "the status counts the paused journey")

        resumed = await api.post(
            journey(journey_id, "resume"), json={"reason": "checked"}, headers=OPERATOR
        )
        assert resumed.status_code == 200, resumed.text
        assert (resumed.json()["was"], resumed.json()["still_held_by"]) == (PAUSED, None)
        await until(lambda: held_is(None), "KaeruHeld is unset")
        assert any(
            "resumed by api:operator: checked" in line for line in (await shopper.status()).story
        )
        refusal(await api.post(journey(journey_id, "resume"), headers=OPERATOR), 409, "not_held")

        cancelled = await api.post(
            journey(journey_id, "cancel"), json={"reason": "test"}, headers=OPERATOR
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["changed"] is True
        ended = refusal(
            await api.post(journey(journey_id, "cancel"), json={}, headers=OPERATOR),
            409,
            "ended",
        )
        assert "has already ended (canceled, outcome cancelled)" in ended
    assert audited(url) == [
        ("journey.pause", journey_id),
        ("journey.resume", journey_id),
        ("journey.cancel", journey_id),
    ]
    assert shopper.emails() == []


@pytest.mark.parametrize("action", ["pause", "resume", "cancel"])
async def test_steering_a_journey_needs_the_operator_token(sqlite_url: str, action: str) -> None:
    settings = make_settings(sqlite_url, temporal_address="127.0.0.1:1")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        answer = await api.post(journey("cart-abandonment-c-1", action), json={})
    refusal(answer, 401, "unauthorized")
