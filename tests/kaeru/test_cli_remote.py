"""``kaeru kill-switch`` and ``kaeru journeys pause|resume|cancel`` with ``KAERU_API_URL``: they
steer a remote deployment through its admin API (a real uvicorn on loopback, a real worker on
the dev server, real SMTP), with no database or Temporal of their own: the CLI's
``KAERU_DATABASE_URL`` and ``KAERU_TEMPORAL_ADDRESS`` point nowhere.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator

import pytest

from kaeru.audit import entries
from kaeru.holds import KILL_SWITCH, PAUSED
from kaeru.kill_switch import switches
from starter.app import create_app
from starter.steering import API_ACTOR
from tests.conftest import make_settings
from tests.kaeru.test_cli_hold import (  # noqa: F401 - fixtures
    Stack,
    kaeru,
    kaeru_async,
    smtp,
    stack,
    until,
)
from tests.starter.conftest import uvicorn_server
from tests.support.cli import (  # noqa: F401 - clean_environment is a fixture
    UNREACHABLE,
    assert_clear_failure,
    clean_environment,
)
from tests.workflows.conftest import SETTINGS, SHOE

TOKEN = "test-operator-token"  # make_settings's
#: The CLI's own stack points nowhere: whatever it does goes through the API.
NOWHERE = {
    "KAERU_DATABASE_URL": "sqlite:////nonexistent/kaeru.db",
    "KAERU_TEMPORAL_ADDRESS": UNREACHABLE,
    "KAERU_OPERATOR_TOKEN": TOKEN,
}


@pytest.fixture
async def remote(stack: Stack) -> AsyncIterator[dict[str, str]]:  # noqa: F811 - the fixture
    """The environment of a CLI that steers the stack's deployment through its API."""
    url = stack.env["KAERU_DATABASE_URL"]
    settings = make_settings(url, temporal_address=stack.env["KAERU_TEMPORAL_ADDRESS"])
    async with uvicorn_server(create_app(settings, run_router=False)) as base:
        yield {**NOWHERE, "KAERU_API_URL": base}


def audited(url: str) -> list[tuple[str, str]]:
    found = list(reversed(entries(url)))
    assert {e.actor for e in found} <= {API_ACTOR}
    return [(e.action, e.target) for e in found]


async def test_the_switch_on_through_the_api_holds_a_send_and_off_releases_it_once(
    stack: Stack,  # noqa: F811 - the fixture
    remote: dict[str, str],
) -> None:
    shopper = stack.shopper
    on = await kaeru_async("kill-switch", "on", "--reason", "bad copy", **remote)
    assert on.exit_code == 0, on.output
    assert "The global kill switch is on: marketing journeys wait" in on.stdout
    await shopper.cart("Product Added", **SHOE)  # its email is due a second later

    async def held() -> bool:
        return bool((await shopper.status()).held == KILL_SWITCH)

    await until(held, "the journey is held by the kill switch")

    async def counted() -> bool:  # visibility lags behind the journey's upsert
        status = await kaeru_async("kill-switch", "status", **remote)
        assert status.exit_code == 0, status.output
        return any(
            line.split()[:1] == ["global"] and line.split()[-1] == "1"
            for line in status.stdout.splitlines()
        )

    await until(counted, "kill-switch status counts the held journey")
    assert shopper.emails() == []

    off = await kaeru_async("kill-switch", "off", **remote)
    assert off.exit_code == 0, off.output
    assert "released 1 held journey(s)" in off.stdout
    await shopper.wait_for_emails(1)

    async def sent() -> bool:
        return any("sent the cart email" in line for line in (await shopper.status()).story)

    await until(sent, "the journey goes on after the send")
    assert len(shopper.emails()) == 1
    url = stack.env["KAERU_DATABASE_URL"]
    assert switches(url) == []
    assert audited(url) == [("kill_switch.on", "*"), ("kill_switch.off", "*")]


async def test_a_pause_through_the_api_holds_the_email_and_resume_sends_it_once(
    stack: Stack,  # noqa: F811 - the fixture
    remote: dict[str, str],
) -> None:
    shopper = stack.shopper
    shopper.settings = dataclasses.replace(SETTINGS, email_delay=2.0)
    assert_clear_failure(
        await kaeru_async("journeys", "pause", "cart-abandonment-nobody", **remote),
        "refused (404)",
        "there is no journey with id 'cart-abandonment-nobody'",
    )
    await shopper.cart("Product Added", **SHOE)
    journey = shopper.journey_id
    await shopper.wait_for_step("cart_quiet")
    paused = await kaeru_async("journeys", "pause", journey, "--reason", "checking", **remote)
    assert paused.exit_code == 0, paused.output
    assert f"Paused {journey}: it waits before its next email" in paused.stdout

    async def waits_at_the_email() -> bool:
        story = (await shopper.status()).story
        return any("held before the cart_email step: the journey is paused" in s for s in story)

    await until(waits_at_the_email, "the journey waits before its email")
    assert (await shopper.status()).held == PAUSED
    assert shopper.emails() == []

    resumed = await kaeru_async("journeys", "resume", journey, **remote)
    assert resumed.exit_code == 0, resumed.output
    assert f"Resumed {journey}" in resumed.stdout
    await shopper.wait_for_emails(1)
    assert_clear_failure(
        await kaeru_async("journeys", "resume", journey, **remote), "is neither paused nor held"
    )
    assert len(shopper.emails()) == 1

    cancelled = await kaeru_async("journeys", "cancel", journey, **remote)
    assert cancelled.exit_code == 0, cancelled.output
    assert f"Cancelled {journey}: it ended cancelled" in cancelled.stdout
    assert_clear_failure(
        await kaeru_async("journeys", "cancel", journey, **remote),
        "refused (409)",
        "has already ended",
    )
    assert audited(stack.env["KAERU_DATABASE_URL"]) == [
        ("journey.pause", journey),
        ("journey.resume", journey),
        ("journey.cancel", journey),
    ]


async def test_an_api_refusal_is_printed_with_its_reason(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, temporal_address=UNREACHABLE)
    async with uvicorn_server(create_app(settings, run_router=False)) as base:
        env = {**NOWHERE, "KAERU_API_URL": base}
        assert_clear_failure(
            await kaeru_async("kill-switch", "on", "--kind", "nope", **env),
            "refused (422)",
            "there is no journey kind 'nope'",
            "cart-abandonment",
        )
        assert_clear_failure(
            await kaeru_async("kill-switch", "on", **{**env, "KAERU_OPERATOR_TOKEN": "wrong"}),
            "refused (401)",
            "the admin API needs the operator token",
        )
        on = await kaeru_async("kill-switch", "on", "--kind", "welcome", **env)
        assert on.exit_code == 0, on.output
        # The API's own Temporal is down: the switch goes off, and the CLI says what was not done.
        assert_clear_failure(
            await kaeru_async("kill-switch", "off", "--kind", "welcome", **env),
            "the welcome kill switch is off, but the journeys it held could not be released",
        )
        status = await kaeru_async("kill-switch", "status", **env)
        assert "No kill switch is on." in status.stdout
        assert "Temporal could not be asked (check KAERU_API_URL's deployment)" in status.stdout
    assert switches(sqlite_url) == []


def test_an_unreachable_api_names_kaeru_api_url() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = s.getsockname()[1]
    try:
        for args in (("kill-switch", "status"), ("journeys", "resume", "cart-abandonment-c-1")):
            assert_clear_failure(
                kaeru(*args, **NOWHERE, KAERU_API_URL=f"http://127.0.0.1:{port}"),
                f"cannot reach the kaeru API at KAERU_API_URL=http://127.0.0.1:{port}",
            )
    finally:
        s.close()
    no_token = {**NOWHERE, "KAERU_API_URL": "http://127.0.0.1:9", "KAERU_OPERATOR_TOKEN": ""}
    assert_clear_failure(
        kaeru("kill-switch", "on", **no_token), "KAERU_API_URL is set", "KAERU_OPERATOR_TOKEN"
    )


@pytest.mark.parametrize(
    "url",
    ["http://kaeru.shop.example", "http://10.0.0.5:8000", "http://127.0.0.1.nip.io", "ftp://x"],
)
def test_the_token_goes_to_no_plain_http_url_but_loopback(url: str) -> None:
    refused = kaeru("kill-switch", "status", **NOWHERE, KAERU_API_URL=url)
    assert_clear_failure(refused, f"KAERU_API_URL={url} is not an https:// URL", "https://")
    assert "cannot reach" not in refused.stderr  # refused before any request


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "[::1]", "localhost"])
def test_a_loopback_http_url_is_used(host: str) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: refused (or unreachable) on each host
    port = s.getsockname()[1]
    try:
        url = f"http://{host}:{port}"
        assert_clear_failure(
            kaeru("kill-switch", "status", **NOWHERE, KAERU_API_URL=url),
            f"cannot reach the kaeru API at KAERU_API_URL={url}",
        )
    finally:
        s.close()
