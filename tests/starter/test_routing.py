"""The journey registry and the lease, without Temporal: what goes where, and who may route."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kaeru.journeys import (
    Delivery,
    JourneyError,
    deliveries,
    discover,
    load_registry,
    prefix_of,
    registry,
)
from kaeru.pseudonyms import AUTO, NEVER, VisibleIds, visible_customer_id
from kaeru.settings import Settings
from starter.router import acquire_lease, lease_holder, release_lease
from tests.conftest import make_settings
from tests.journeys.hello import Browse, Hello, Lifecycle, Receipt
from workflows.cart_abandonment import CART_EVENTS, CartAbandonment, CartJourneySettings

HELLO = "tests.journeys.hello"


def hello_only(found: list[Delivery]) -> list[Delivery]:
    """The deliveries to the test journeys of tests/journeys/hello.py (the shipped journeys
    have their own tests)."""
    return [d for d in found if d.workflow_id.startswith("test-")]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> Iterator[None]:
    """Each test reads the environment it sets (and no .env of the machine)."""
    monkeypatch.chdir(str(tmp_path))
    registry.cache_clear()
    yield
    registry.cache_clear()


def test_cart_events_start_the_cart_journey() -> None:
    for name in sorted(CART_EVENTS):
        (delivery,) = [d for d in deliveries(name, "u1", {}) if d.start]
        assert (delivery.workflow_id, delivery.start) == ("cart-abandonment-u1", True)


def test_orders_ad_clicks_and_merges_only_reach_a_live_cart_journey() -> None:
    """Only the cart journey is switched on here (tests/conftest.py): none of these starts
    anything, and each reaches a live cart journey."""
    for name in ("Order Completed", "Ad Clicked", "Identity Merged"):
        found = {d.workflow_id: d.start for d in deliveries(name, "u1", {})}
        assert found["cart-abandonment-u1"] is False
        assert not any(found.values()), found


def test_opens_and_clicks_go_to_the_customers_own_journey_only() -> None:
    own = {"journey_id": "cart-abandonment-u1"}
    for name in ("Email Opened", "Email Link Clicked"):
        (delivery,) = deliveries(name, "u1", own)
        assert (delivery.workflow_id, delivery.start) == ("cart-abandonment-u1", False)
        assert deliveries(name, "u2", own) == []
        assert deliveries(name, "u1", {"journey_id": {"x": 1}}) == []
        assert deliveries(name, "u1", {}) == []


KEY = b"k" * 43


def cart_only(found: list[Delivery]) -> list[Delivery]:
    return [d for d in found if d.route.kind == "cart-abandonment"]


EMAIL = "ann@example.com"


def test_an_email_id_is_routed_under_its_pseudonym_and_before_that_its_clear_id() -> None:
    """New journeys of an email customer id get the pseudonym; the clear id stays the place
    to look first for a journey started before it (a start) or after it (a signal)."""
    ids = VisibleIds(KEY, AUTO)
    pseudo = f"cart-abandonment-{visible_customer_id(EMAIL, KEY, AUTO)}"
    for name, start in (("Product Added", True), ("Order Completed", False)):
        (delivery,) = cart_only(deliveries(name, EMAIL, {}, ids))
        assert (delivery.workflow_id, delivery.before, delivery.start) == (
            pseudo,
            f"cart-abandonment-{EMAIL}",
            start,
        )
    (clear,) = cart_only(deliveries("Product Added", "u1", {}, ids))
    assert (clear.workflow_id, clear.before) == ("cart-abandonment-u1", None)
    (never,) = cart_only(deliveries("Product Added", EMAIL, {}, VisibleIds(KEY, NEVER)))
    assert (never.workflow_id, never.before) == (f"cart-abandonment-{EMAIL}", None)
    # Without the key (a caller that names no ids) journeys keep clear ids, as before.
    (plain,) = cart_only(deliveries("Product Added", EMAIL, {}))
    assert (plain.workflow_id, plain.before) == (f"cart-abandonment-{EMAIL}", None)


def test_an_open_reaches_the_customers_journey_under_either_id() -> None:
    ids = VisibleIds(KEY, AUTO)
    pseudo = f"cart-abandonment-{visible_customer_id(EMAIL, KEY, AUTO)}"
    for journey_id in (pseudo, f"cart-abandonment-{EMAIL}"):
        (delivery,) = deliveries("Email Opened", EMAIL, {"journey_id": journey_id}, ids)
        assert (delivery.workflow_id, delivery.before, delivery.start) == (
            journey_id,
            None,
            False,
        )
    other = f"cart-abandonment-{visible_customer_id('bob@example.com', KEY, AUTO)}"
    assert deliveries("Email Opened", EMAIL, {"journey_id": other}, ids) == []
    # Ingestion, without the key, keeps an open of a pseudonymous journey for the router (it
    # cannot tell whose it is); the router, with the key, refuses someone else's.
    for journey_id in (pseudo, other):
        (kept,) = deliveries("Email Opened", EMAIL, {"journey_id": journey_id})
        assert kept.workflow_id == journey_id
    assert deliveries("Email Opened", EMAIL, {"journey_id": "cart-abandonment-p_x"}) == []


def test_other_events_go_nowhere() -> None:
    for name in (None, "Signed Up", "order completed", "Identify", "product viewed"):
        assert deliveries(name, "u1", {}) == []


def test_an_identify_that_changed_no_start_trait_starts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for journey in discover():
        monkeypatch.setenv(f"KAERU_{prefix_of(journey)}_ENABLED", "true")
    registry.cache_clear()
    for properties in ({}, {"changed_traits": ["name"]}, {"changed_traits": "email"}):
        assert not any(d.start for d in deliveries("identify", "u1", properties))
    assert [
        d.workflow_id
        for d in deliveries("identify", "u1", {"changed_traits": ["email"]})
        if d.start
    ] == ["welcome-u1"]


def test_the_workflows_package_is_searched_and_journey_modules_add_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shipped = discover()
    kinds = {journey.kind for journey in shipped}
    assert CartAbandonment in shipped and len(kinds) == len(shipped)
    assert kinds >= {
        "cart-abandonment",
        "order-confirmation",
        "post-purchase",
        "welcome",
        "win-back",
        "price-drop",
    }
    # A module of the package that is not a journey's adds nothing (the kit's own classes).
    assert not {journey.__module__ for journey in shipped} & {"workflows.kit"}
    assert discover(f" {HELLO} ,") == [*shipped, Browse, Hello, Lifecycle, Receipt]
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", HELLO)
    names = [route.workflow_name for route in registry().routes][len(shipped) :]
    assert names == ["TestBrowse", "TestHello", "TestLifecycle", "TestReceipt"]
    with pytest.raises(JourneyError, match="KAERU_JOURNEY_MODULES names 'shop.nope'"):
        discover("shop.nope")


def test_an_identify_that_changed_a_start_trait_starts_an_enabled_journey(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", HELLO)
    new_email = {"changed_traits": ["name", "email"]}
    # Off by default (enabled_by_default = False): its events reach a live one only.
    (off,) = hello_only(deliveries("identify", "u1", new_email))
    assert (off.workflow_id, off.start) == ("test-hello-u1", False)

    monkeypatch.setenv("KAERU_TEST_HELLO_ENABLED", "true")
    registry.cache_clear()
    (on,) = hello_only(deliveries("identify", "u1", new_email))
    assert (on.route.label, on.workflow_id, on.start) == ("Test hello", "test-hello-u1", True)
    (name_only,) = hello_only(deliveries("identify", "u1", {"changed_traits": ["name"]}))
    assert not name_only.start  # reaches a live one, starts none
    viewed = {d.workflow_id: d.start for d in hello_only(deliveries("Product Viewed", "u1", {}))}
    assert viewed == {"test-hello-u1": False, "test-browse-u1": True}


def test_a_purchase_reaches_every_journey_it_ends_and_starts_the_one_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_JOURNEY_MODULES", HELLO)
    found = {d.workflow_id: d.start for d in deliveries("Order Completed", "u1", {})}
    found = {wid: start for wid, start in found.items() if wid.startswith(("test-", "cart-"))}
    assert found == {
        "cart-abandonment-u1": False,
        "test-browse-u1": False,
        "test-hello-u1": False,
        "test-lifecycle-u1": False,
        "test-receipt-u1": True,
    }
    # Browse abandonment gives way to a cart: a cart event reaches it, and starts the cart's.
    added = {d.workflow_id: d.start for d in deliveries("Product Added", "u1", {})}
    added = {wid: start for wid, start in added.items() if wid.startswith(("test-", "cart-"))}
    assert added == {"cart-abandonment-u1": True, "test-browse-u1": False}


def test_a_disabled_cart_journey_is_never_started_but_a_live_one_still_hears(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_CART_ENABLED", "false")
    (delivery,) = [
        d for d in deliveries("Product Added", "u1", {}) if d.route.kind == "cart-abandonment"
    ]
    assert not any(d.start for d in deliveries("Product Added", "u1", {}))
    assert (delivery.workflow_id, delivery.start) == ("cart-abandonment-u1", False)


def test_journey_input_carries_the_settings_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    for name, value in {
        "EMAIL_DELAY": "PT2H",
        "OPEN_WAIT": "60",
        "AD_DELAY": "86400.0",
        "COUPON_AMOUNT_MINOR": "500",
        "COUPON_CURRENCY": "eur",
        "URL": "https://shop.test/cart",
        "RECOMMENDATIONS": "0",
        "EMPTY_GRACE": "P1D",
    }.items():
        monkeypatch.setenv(f"KAERU_CART_{name}", value)
    route = registry().route("cart-abandonment")
    start = route.make_input("u1", make_settings(sqlite_url))
    s = start.settings
    assert start.customer_id == "u1" and isinstance(s, CartJourneySettings)
    assert (s.email_delay, s.open_wait, s.ad_delay, s.empty_grace) == (7200, 60, 86400, 86400)
    assert (s.coupon_amount_minor, s.coupon_currency) == (500, "EUR")
    assert (s.cart_url, s.recommendations) == ("https://shop.test/cart", 0)
    assert s.offer_wait == CartJourneySettings().offer_wait  # unset: the default


def test_journey_settings_come_from_dot_env_too(tmp_path: object) -> None:
    with open(".env", "w") as env:
        env.write("KAERU_CART_OFFER_DELAY=PT5M\n")
    assert registry().route("cart-abandonment").journey_settings.offer_delay == 300


CART_DURATIONS = [
    "EMAIL_DELAY",
    "OPEN_WAIT",
    "AD_DELAY",
    "AD_CLICK_WAIT",
    "OFFER_DELAY",
    "OFFER_WAIT",
    "COUPON_TTL",
    "EMPTY_GRACE",
]


@pytest.mark.parametrize("name", CART_DURATIONS)
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("86400", 86400), ("5.5", 5.5), ("P1D", 86400), ("PT30M", 1800), ("01:00:00", 3600)],
)
def test_every_journey_duration_reads_seconds_or_iso_8601_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, seconds: float
) -> None:
    monkeypatch.setenv(f"KAERU_CART_{name}", text)
    cart = registry().route("cart-abandonment").journey_settings
    assert getattr(cart, name.lower()) == seconds


@pytest.mark.parametrize("name", CART_DURATIONS)
@pytest.mark.parametrize("text", ["0", "-5", "soon", "inf", "nan"])
def test_a_journey_duration_not_positive_or_not_a_duration_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    monkeypatch.setenv(f"KAERU_CART_{name}", text)
    with pytest.raises(JourneyError, match=f"KAERU_CART_{name}='{text}' is not valid"):
        registry()


@pytest.mark.parametrize(
    ("variable", "value", "phrases"),
    [
        ("KAERU_CART_EMAIL_DELAY", "abc", ("KAERU_CART_EMAIL_DELAY='abc' is not valid", "P1D")),
        ("KAERU_CART_OPEN_WAIT", "0", ("KAERU_CART_OPEN_WAIT='0' is not valid", "positive")),
        (
            "KAERU_CART_COUPON_CURRENCY",
            "dollars",
            ("KAERU_CART_COUPON_CURRENCY='dollars' is not valid (must", "4217"),
        ),
        ("KAERU_CART_COUPON_AMOUNT_MINOR", "ten", ("KAERU_CART_COUPON_AMOUNT_MINOR='ten'",)),
        (
            "KAERU_CART_RECOMMENDATIONS",
            "13",
            ("KAERU_CART_RECOMMENDATIONS=13 is not valid (must be 0 to 12)",),
        ),
        ("KAERU_CART_ENABLED", "perhaps", ("KAERU_CART_ENABLED='perhaps' is not valid",)),
    ],
)
def test_a_bad_journey_setting_names_the_variable_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, phrases: tuple[str, ...]
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(JourneyError) as caught:
        load_registry(Settings(_env_file=None))
    for phrase in phrases:
        assert phrase in str(caught.value)
    assert "Fix it in the environment or in .env" in str(caught.value)


def test_one_holder_at_a_time_and_takeover_after_expiry(settings: Settings) -> None:
    url = settings.resolved_database_url
    assert lease_holder(url) is None
    assert acquire_lease(url, "a", ttl=0.3)
    assert not acquire_lease(url, "b", ttl=0.3)
    assert acquire_lease(url, "a", ttl=0.3)  # renewal
    holder = lease_holder(url)
    assert holder is not None and holder[0] == "a"
    time.sleep(0.4)
    assert acquire_lease(url, "b", ttl=30)
    assert not acquire_lease(url, "a", ttl=30)
    release_lease(url, "a")  # not the holder: changes nothing
    assert not acquire_lease(url, "a", ttl=30)
    release_lease(url, "b")
    assert acquire_lease(url, "a", ttl=30)
