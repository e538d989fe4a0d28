"""``GET /metrics`` of the API: what ingestion counts, with bounded labels, and its token."""

from __future__ import annotations

import httpx
import pytest

from kaeru.settings import Settings
from starter.app import create_app
from starter.metrics import OTHER, bounded, event_labels
from tests.conftest import make_settings
from tests.starter.conftest import AUTH, BROWSER_AUTH, asgi_client
from tests.support.prometheus import Scrape

INGESTED = "kaeru_events_ingested_total"
REJECTED = "kaeru_events_rejected_total"


async def scrape(api: httpx.AsyncClient, **headers: str) -> Scrape:
    answer = await api.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return Scrape(answer.text)


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return make_settings(sqlite_url)


async def test_ingestion_counts_events_by_type_and_known_name_only(settings: Settings) -> None:
    async with asgi_client(create_app(settings, run_router=False)) as api:
        before = await scrape(api)
        track = {"userId": "zoe@example.com", "event": "Product Added", "messageId": "m-1"}
        assert (await api.post("/v1/track", json=track, auth=AUTH)).status_code == 200
        again = await api.post("/v1/track", json=track, auth=AUTH)  # the same messageId
        assert again.status_code == 200
        custom = {"userId": "zoe@example.com", "event": "Zoe's wishlist 4711"}
        assert (await api.post("/v1/track", json=custom, auth=AUTH)).status_code == 200
        who = {"userId": "zoe@example.com", "traits": {"email": "zoe@example.com"}}
        assert (await api.post("/v1/identify", json=who, auth=AUTH)).status_code == 200
        batch = {
            "batch": [
                {"type": "page", "userId": "zoe@example.com", "name": "Home"},
                {"type": "track", "event": "Order Completed"},  # no userId: rejected
                {"type": "screen", "userId": "zoe@example.com"},  # refused type
            ]
        }
        answer = await api.post("/v1/batch", json=batch, auth=AUTH)
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        no_id = await api.post("/v1/track", json={"event": "Product Added"}, auth=AUTH)
        assert no_id.status_code == 400
        after = await scrape(api)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta(INGESTED, type="track", event="Product Added") == 1  # the re-send is not
    assert delta(INGESTED, type="track", event=OTHER) == 1
    assert delta(INGESTED, type="identify", event="none") == 1
    assert delta(INGESTED, type="page", event="none") == 1
    assert delta(INGESTED) == 4
    assert delta("kaeru_events_duplicate_total") == 1
    assert delta(REJECTED, reason="missing_id") == 2
    assert delta(REJECTED, reason="unsupported_type") == 1
    assert delta(REJECTED) == 3
    # Nothing the shop sent became a label: no id, no address, no free-form event name.
    assert "zoe" not in after.text.lower()
    assert "wishlist" not in after.text.lower()


async def test_store_time_refusals_count_with_their_reason(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, max_traits=2)
    async with asgi_client(create_app(settings, run_router=False)) as api:
        crowded = {"userId": "u1", "traits": {"a": 1, "b": 2, "c": 3}}
        assert (await api.post("/v1/identify", json=crowded, auth=AUTH)).status_code == 400
        after = await scrape(api)
    assert after.value(REJECTED, reason="too_many_traits") == 1
    assert after.value(INGESTED) == 0


def test_labels_come_from_fixed_sets() -> None:
    assert event_labels("track", "Order Completed") == ("track", "Order Completed")
    assert event_labels("track", "order completed") == ("track", OTHER)  # not normalised
    assert event_labels("page", "Ad Clicked") == ("page", "Ad Clicked")
    assert event_labels("mystery", None) == (OTHER, "none")
    assert bounded("a-new-code", {"missing_id"}) == OTHER


async def test_metrics_token_guards_the_scrape_when_set(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, metrics_token="scrape-token-0123456789")
    async with asgi_client(create_app(settings, run_router=False)) as api:
        missing = await api.get("/metrics")
        assert missing.status_code == 401
        assert "KAERU_METRICS_TOKEN" in missing.json()["message"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = await api.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        # The operator token is not the metrics token.
        operator = {"Authorization": "Bearer test-operator-token"}
        assert (await api.get("/metrics", headers=operator)).status_code == 401
        ok = await scrape(api, Authorization="Bearer scrape-token-0123456789")
        assert "# TYPE kaeru_events_ingested_total counter" in ok.text


async def test_without_a_token_the_scrape_is_open(settings: Settings) -> None:
    async with asgi_client(create_app(settings, run_router=False)) as api:
        assert "# HELP kaeru_router_deliveries_total" in (await scrape(api)).text


async def test_each_app_has_a_registry_of_its_own(settings: Settings) -> None:
    first, second = create_app(settings, run_router=False), create_app(settings, run_router=False)
    first.state.metrics.rejected("missing_id")
    assert Scrape(second.state.metrics.exposition().decode()).value(REJECTED) == 0


async def test_requests_refused_as_a_whole_count_by_reason(settings: Settings) -> None:
    async with asgi_client(create_app(settings, run_router=False)) as api:
        one = {"userId": "u1", "event": "Product Added"}
        wrong_key = await api.post("/v1/track", json=one, auth=("not-the-key", ""))
        assert wrong_key.status_code == 401
        not_json = await api.post("/v1/batch", content=b"{nope", auth=AUTH)
        assert not_json.status_code == 400 and not_json.json()["code"] == "invalid_json"
        not_a_batch = await api.post("/v1/batch", json={"events": []}, auth=AUTH)
        assert not_a_batch.status_code == 400
        browser_import = await api.post("/v1/import", json={"batch": []}, auth=BROWSER_AUTH)
        assert browser_import.status_code == 403
        listed = await api.post("/v1/track", json=[one], auth=AUTH)  # not one event
        assert listed.status_code == 400
        after = await scrape(api)
    refused = "kaeru_ingest_requests_rejected_total"
    assert after.value(refused, reason="unauthorized") == 1
    assert after.value(refused, reason="invalid_json") == 1
    assert after.value(refused, reason="not_a_batch") == 1
    assert after.value(refused, reason="forbidden") == 1
    assert after.value(refused) == 4
    assert after.value(REJECTED, reason="invalid_event") == 1  # a body that is no event
    assert after.value(REJECTED) == 1
    assert after.value(INGESTED) == 0


async def test_the_schema_documents_metrics_with_its_token(settings: Settings) -> None:
    async with asgi_client(create_app(settings, run_router=False)) as api:
        schema = (await api.get("/openapi.json")).json()
    operation = schema["paths"]["/metrics"]["get"]
    assert operation["security"] == [{"metricsToken": []}, {}]  # the token, or none when unset
    assert schema["components"]["securitySchemes"]["metricsToken"]["scheme"] == "bearer"
