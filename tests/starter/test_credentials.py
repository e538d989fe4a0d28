"""Managed write keys and operator accounts against the real API app (SQLite and PostgreSQL):
made by the real CLI, checked through the cache, refused once revoked, every change audited."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time

import httpx

from kaeru.audit import cli_actor
from kaeru.credentials import READ_ONLY, Account, digest
from kaeru.settings import Settings
from starter import dashboard
from starter.app import create_app
from starter.dashboard import SESSION_COOKIE
from starter.operator_session import account_cookie
from tests.conftest import make_settings
from tests.starter.conftest import OPERATOR, asgi_client, basic, events
from tests.starter.test_admin import park
from tests.starter.test_limits import NEVER, batch, serving
from tests.support.cli import clean_environment, run_kaeru  # noqa: F401 - a fixture

TRACK = {"userId": "u1", "event": "Product Added", "properties": {"product_id": "p1"}}
#: Short, so a revoke shows within the test; the product's default is 5 s.
TTL = 0.3


def kaeru(url: str, *args: str) -> str:
    """Run the real CLI on the test's database; its output (it must succeed)."""
    result = run_kaeru(list(args), {"KAERU_DATABASE_URL": url}, columns=200)
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.output


def secret_of(output: str, prefix: str) -> str:
    found = re.findall(rf"{prefix}[A-Za-z0-9_-]+", output)
    assert len(found) == 1, output
    return str(found[0])


def new_key(url: str, name: str, *flags: str) -> str:
    kind = "kaeru_bk_" if "--browser" in flags else "kaeru_sk_"
    return secret_of(kaeru(url, "keys", "create", name, *flags), kind)


def new_operator(url: str, name: str, role: str) -> dict[str, str]:
    token = secret_of(kaeru(url, "operators", "add", name, "--role", role), "kaeru_op_")
    return {"Authorization": f"Bearer {token}"}


def settings_of(database_url: str, **overrides: object) -> Settings:
    return make_settings(database_url, credentials_cache_ttl=TTL, **overrides)


async def test_cli_keys_ingest_two_at_once_and_a_revoked_one_is_refused_and_audited(
    database_url: str,
) -> None:
    # No KAERU_WRITE_KEY at all: the database's keys are the only ones.
    settings = settings_of(database_url, write_key=None, browser_write_key=None)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        none_yet = await api.post("/v1/track", json=TRACK, headers=basic("kaeru_sk_whatever"))
        assert none_yet.status_code == 503, none_yet.text
        assert "kaeru keys create" in none_yet.json()["message"]

        old = new_key(database_url, "shop-2026-11")
        new = new_key(database_url, "shop-2026-12")
        await asyncio.sleep(TTL)  # the 503 above cached "no keys"
        for key in (old, new):
            answer = await api.post("/v1/track", json=TRACK, headers=basic(key))
            assert answer.status_code == 200, answer.text
        assert len(events(settings)) == 2
        wrong = await api.post("/v1/track", json=TRACK, headers=basic(old + "x"))
        assert wrong.status_code == 401

        kaeru(database_url, "keys", "revoke", "shop-2026-11")
        await asyncio.sleep(TTL + 0.1)
        refused = await api.post("/v1/track", json=TRACK, headers=basic(old))
        assert refused.status_code == 401, refused.text
        assert refused.json()["code"] == "unauthorized"
        assert "revoked" in refused.json()["message"]
        # writeKey in the body is checked the same way.
        in_body = await api.post("/v1/track", json={**TRACK, "writeKey": old})
        assert in_body.status_code == 401
        still = await api.post("/v1/track", json=TRACK, headers=basic(new))
        assert still.status_code == 200, still.text
        assert len(events(settings)) == 3

        log = await api.get("/v1/admin/audit", params={"action": "write_key."}, headers=OPERATOR)
        assert log.status_code == 200, log.text
        got = [(e["actor"], e["action"], e["target"]) for e in log.json()["entries"]]
        assert got == [
            (cli_actor(), "write_key.revoke", "shop-2026-11"),
            (cli_actor(), "write_key.create", "shop-2026-12"),
            (cli_actor(), "write_key.create", "shop-2026-11"),
        ]
        assert cli_actor().startswith("cli:")
        assert all(old not in str(e) and new not in str(e) for e in log.json()["entries"])


async def test_a_revoke_reaches_every_api_process_within_the_cache_ttl(
    database_url: str,
) -> None:
    # Two API apps on one database, each with its own cache, as two `kaeru api` processes.
    settings = settings_of(database_url)
    key = new_key(database_url, "backend")
    operator = new_operator(database_url, "frank", "operator")
    async with (
        asgi_client(create_app(settings, run_router=False)) as one,
        asgi_client(create_app(settings, run_router=False)) as two,
    ):
        for api in (one, two):
            assert (await api.post("/v1/track", json=TRACK, headers=basic(key))).status_code == 200
            assert (await api.get("/v1/admin/outbox", headers=operator)).status_code == 200
        kaeru(database_url, "keys", "revoke", "backend")
        kaeru(database_url, "operators", "revoke", "frank")
        await asyncio.sleep(TTL + 0.1)
        for api in (one, two):
            assert (await api.post("/v1/track", json=TRACK, headers=basic(key))).status_code == 401
            assert (await api.get("/v1/admin/outbox", headers=operator)).status_code == 401


async def test_a_managed_browser_key_is_limited_like_the_browser_key(database_url: str) -> None:
    settings = settings_of(database_url)
    browser = new_key(database_url, "storefront", "--browser")
    server = new_key(database_url, "backend")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        assert (await api.post("/v1/track", json=TRACK, headers=basic(browser))).status_code == 200
        # The consent API is for the shop's server only.
        path = "/v1/customers/u1/consent"
        refused = await api.get(path, headers=basic(browser))
        assert refused.status_code == 403, refused.text
        assert (await api.get(path, headers=basic(server))).status_code in (200, 404)
        # The environment's keys keep working beside the database's.
        assert (
            await api.post("/v1/track", json=TRACK, headers=basic("test-write-key"))
        ).status_code == 200


async def test_a_read_only_operator_reads_but_may_not_change(
    database_url: str,
) -> None:
    settings = settings_of(database_url)
    seq = park(settings, "u1", "m-1")
    reader = new_operator(database_url, "ann", "read-only")
    operator = new_operator(database_url, "bob", "operator")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        for path in ("/v1/admin/outbox", "/v1/admin/parked", "/v1/admin/audit", "/dashboard"):
            answer = await api.get(path, headers=reader)
            assert answer.status_code == 200, (path, answer.text)
        for method, path in (
            ("POST", f"/v1/admin/parked/{seq}/retry"),
            ("POST", f"/v1/admin/parked/{seq}/drop"),
            ("DELETE", "/v1/customers/u1"),
        ):
            answer = await api.request(method, path, headers=reader)
            assert answer.status_code == 403, (path, answer.text)
            assert answer.json()["code"] == "forbidden"
            assert "read-only" in answer.json()["message"]
        # The operator role may: its retry is recorded under its name.
        retried = await api.post(f"/v1/admin/parked/{seq}/retry", headers=operator)
        assert retried.status_code == 200, retried.text
        log = (await api.get("/v1/admin/audit", headers=reader)).json()["entries"]
        assert (log[0]["actor"], log[0]["action"], log[0]["target"]) == (
            "api:bob",
            "parked.retry",
            str(seq),
        )
        # KAERU_OPERATOR_TOKEN is an operator too, named "operator".
        other = park(settings, "u2", "m-2")
        dropped = await api.post(f"/v1/admin/parked/{other}/drop", headers=OPERATOR)
        assert dropped.status_code == 200, dropped.text
        log = (await api.get("/v1/admin/audit", headers=reader)).json()["entries"]
        assert (log[0]["actor"], log[0]["action"]) == ("api:operator", "parked.drop")


async def test_the_dashboard_signs_in_an_account_and_a_revoke_signs_it_out(
    database_url: str,
) -> None:
    settings = settings_of(database_url)
    reader = new_operator(database_url, "carol", "read-only")
    token = reader["Authorization"].removeprefix("Bearer ")
    api_app = create_app(settings, run_router=False)
    async with asgi_client(api_app) as api:
        signed = await api.post(
            "/dashboard/login",
            data={"token": token, "next": "/dashboard/funnels"},
            follow_redirects=False,
        )
        assert signed.status_code == 303, signed.text
        assert token not in signed.headers["set-cookie"]
        page = await api.get("/dashboard/funnels", follow_redirects=False)
        assert page.status_code == 200
        # A cookie naming another account does not open it.
        cookie = api.cookies[SESSION_COOKIE]
        assert cookie.endswith(".carol")
        forged = cookie.removesuffix("carol") + "ann"
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api_app), base_url="http://kaeru.test"
        ) as stranger:
            stranger.cookies.set(SESSION_COOKIE, forged, domain="kaeru.test", path="/dashboard")
            away = await stranger.get("/dashboard/funnels", follow_redirects=False)
            assert away.status_code == 303
            # The stored token hash alone (a database dump, a backup) makes no cookie: the
            # server's secret key signs it too.
            token_hash = digest(token)
            expires = int(time.time()) + 3600
            message = f"{dashboard._PURPOSE}:carol:{expires}".encode()
            hash_only = hmac.new(token_hash.encode(), message, hashlib.sha256).hexdigest()
            carol = Account("carol", READ_ONLY, token_hash)
            for made in (
                f"{expires}.{hash_only}.carol",
                account_cookie(carol, dashboard._PURPOSE, b"another server's secret key 0123"),
            ):
                stranger.cookies.set(SESSION_COOKIE, made, domain="kaeru.test", path="/dashboard")
                refused = await stranger.get("/dashboard/funnels", follow_redirects=False)
                assert refused.status_code == 303, made
            server_key = api_app.state.signing_key
            assert settings.secret_key is not None
            assert server_key == settings.secret_key.get_secret_value().encode()
            with_key = account_cookie(carol, dashboard._PURPOSE, server_key)
            stranger.cookies.set(SESSION_COOKIE, with_key, domain="kaeru.test", path="/dashboard")
            assert (await stranger.get("/dashboard/funnels")).status_code == 200
            stranger.cookies.set(SESSION_COOKIE, cookie, domain="kaeru.test", path="/dashboard")
            assert (await stranger.get("/dashboard/funnels")).status_code == 200

        kaeru(database_url, "operators", "revoke", "carol")
        await asyncio.sleep(TTL + 0.1)
        gone = await api.get("/dashboard/funnels", follow_redirects=False)
        assert gone.status_code == 303 and "/dashboard/login" in gone.headers["location"]
        api_gone = await api.get("/v1/admin/outbox", headers=reader)
        assert api_gone.status_code == 401, api_gone.text
        assert "revoked" in api_gone.json()["message"]
        again = await api.post("/dashboard/login", data={"token": token}, follow_redirects=False)
        assert again.status_code == 401


async def test_accounts_alone_open_the_admin_api_without_an_operator_token(
    database_url: str,
) -> None:
    settings = settings_of(database_url, operator_token=None)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        off = await api.get("/v1/admin/outbox", headers=OPERATOR)
        assert off.status_code == 503 and "kaeru operators add" in off.json()["message"]
        operator = new_operator(database_url, "dave", "operator")
        await asyncio.sleep(TTL)
        assert (await api.get("/v1/admin/outbox", headers=operator)).status_code == 200
        assert (await api.get("/v1/admin/outbox", headers=OPERATOR)).status_code == 401
        login = await api.get("/dashboard/login")
        assert login.status_code == 200 and 'name="token"' in login.text


async def test_a_managed_server_key_is_limited_per_key_not_per_client_address(
    sqlite_url: str,
) -> None:
    # As KAERU_WRITE_KEY (tests/starter/test_limits.py): a shop's backend sends from one
    # address, so the browser-sized per-client limit must not throttle its managed key.
    settings = settings_of(
        sqlite_url,
        rate_limit_client_burst=3,
        rate_limit_client_per_second=NEVER,
        rate_limit_key_burst=10,
        rate_limit_key_per_second=NEVER,
    )
    server = new_key(sqlite_url, "backend")
    browser = new_key(sqlite_url, "web", "--browser")
    async with serving(settings) as (url, _), httpx.AsyncClient(base_url=url) as http:
        codes = [(await http.post("/v1/batch", json=batch(5), auth=(server, ""))).status_code]
        codes.append(
            (await http.post("/v1/batch", json=batch(5, "u2"), auth=(server, ""))).status_code
        )
        over_key = await http.post("/v1/batch", json=batch(1, "u3"), auth=(server, ""))
        from_browser = await http.post("/v1/batch", json=batch(4, "u4"), auth=(browser, ""))
    assert codes == [200, 200]  # 10 events from one address, over the client burst of 3
    assert over_key.status_code == 429
    assert from_browser.status_code == 413  # a browser key keeps the client limit


async def test_the_audit_log_filters_and_says_what_is_wrong_with_a_filter(
    database_url: str,
) -> None:
    settings = settings_of(database_url)
    new_key(database_url, "backend")
    new_operator(database_url, "erin", "read-only")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        every = (await api.get("/v1/admin/audit", headers=OPERATOR)).json()
        assert [e["action"] for e in every["entries"]] == ["operator.add", "write_key.create"]
        one = await api.get(
            "/v1/admin/audit", params={"action": "operator.add", "limit": 5}, headers=OPERATOR
        )
        assert [e["target"] for e in one.json()["entries"]] == ["erin"]
        later = await api.get(
            "/v1/admin/audit", params={"since": "2999-01-01T00:00:00Z"}, headers=OPERATOR
        )
        assert later.json() == {"count": 0, "entries": []}
        naive = await api.get(
            "/v1/admin/audit", params={"since": "2026-12-02T14:00:00"}, headers=OPERATOR
        )
        assert naive.status_code == 400 and "time zone" in naive.json()["message"]
        assert (await api.get("/v1/admin/audit")).status_code == 401
        assert (await api.get("/v1/admin/audit", auth=("test-write-key", ""))).status_code == 401


async def test_steering_by_an_account_is_audited_under_its_name_and_refused_to_read_only(
    database_url: str,
) -> None:
    settings = settings_of(database_url)
    reader = new_operator(database_url, "gina", "read-only")
    operator = new_operator(database_url, "hugo", "operator")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        refused = await api.post(
            "/v1/admin/kill-switch/on", json={"reason": "checking"}, headers=reader
        )
        assert refused.status_code == 403, refused.text
        assert "read-only" in refused.json()["message"]
        on = await api.post("/v1/admin/kill-switch/on", json={"reason": "prices"}, headers=operator)
        assert on.status_code == 200, on.text
        log = (await api.get("/v1/admin/audit", headers=reader)).json()["entries"]
        assert (log[0]["actor"], log[0]["action"]) == ("api:hugo", "kill_switch.on")
