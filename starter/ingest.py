"""Storing accepted events: the outbox row plus what the shop told us (profiles, products, orders).

Every request's events are committed before the API answers, so an answered event is never
lost; requests that arrive together share a transaction (:class:`EventStore`). A repeated
``messageId`` is stored (and later routed) once: duplicates are dropped with ``INSERT ... ON
CONFLICT DO NOTHING``, which also settles two requests racing with the same id. Orders are
stored here, for every customer, whether or not a journey is waiting for them.

Trust (README, "Trust model"): only server-key events write the shared catalogue
(``products``), whose names reach other customers' emails, and links are stripped from every
name stored; a browser ``Order Completed`` is stored as an order (and redeems its coupon) only
with KAERU_TRUST_BROWSER_ORDERS; a coupon is redeemed only by an order of its own customer.
Events of ``/v1/import`` are history: stored (profiles, orders) and marked routed at once.

Consent (kaeru/consent.py): the consent traits of a server-key ``identify`` set the customer's
consent (source ``identify``) in the same transaction; one that unsubscribes also stores the
``Marketing Consent Withdrawn`` event after it (:func:`starter.consent_changes.change_consent`).
The customer's time zone comes from ``traits.timezone`` or ``context.timezone``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import bindparam, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from kaeru.commerce import (
    CART_EVENTS,
    MAX_ID_LENGTH,
    MAX_QUANTITY,
    ORDER_COMPLETED,
    CartLine,
    apply_cart_event,
    clean_product_name,
    currency_of,
    merge_carts,
    minor_of,
    order_items_of,
    order_total_of,
    product_id_of,
)
from kaeru.consent import consent_from_traits
from kaeru.coupons import redeem_coupon
from kaeru.db import write_session
from kaeru.identity import IDENTITY_MERGED, merge_id, merge_refusal
from kaeru.journeys import kind_of_workflow_id
from kaeru.models import CartItem, Customer, Event, IdentityAlias, Order, OrderLine, Product, utcnow
from kaeru.settings import Settings
from kaeru.telemetry import current_carrier
from kaeru.touchpoints import ADS, channel_of, record_purchase, record_touchpoint
from starter.consent_changes import change_consent
from starter.events import (
    PRODUCT_EVENTS,
    EventError,
    IncomingEvent,
    encoded_size,
    stated_email,
)
from starter.metrics import ApiMetrics
from starter.outbox import OUTBOX_LOCK as OUTBOX_LOCK
from starter.outbox import insert_events as insert_events
from starter.outbox import insert_statement as _insert
from starter.outbox import outbox_row as outbox_row
from starter.outbox import table_of as _table
from starter.outbox import with_trace_context
from workflows.kit import AD_CLICKED

log = logging.getLogger("kaeru.ingest")

#: Longest time zone name kept (``customers.timezone``); IANA names are far shorter.
MAX_TIMEZONE_LENGTH = 64


@dataclass(frozen=True)
class StoreResult:
    stored: int
    duplicates: int
    #: At least one stored event waits for the router.
    to_route: bool
    #: Events refused at store time (a customer's traits over the caps): position in the
    #: request's events, and why. They are not stored.
    rejected: tuple[tuple[int, EventError], ...] = ()
    #: The ``messageId`` of every event of the request that this call stored (not duplicates).
    stored_ids: frozenset[str] = frozenset()


def store_events(settings: Settings, events: Sequence[IncomingEvent]) -> StoreResult:
    """Store ``events`` (already checked) in one transaction. Blocking: call from a thread."""
    return store_requests(settings, [events])[0]


def store_requests(
    settings: Settings, requests: Sequence[Sequence[IncomingEvent]]
) -> list[StoreResult]:
    """Store the events of several requests in one transaction; one result per request.

    The events are stored in request order, each request's in its own order. A ``messageId``
    sent twice belongs to its first sender; later ones (in this or another request) count as
    duplicates. Blocking: call from a thread.
    """
    unique: dict[str, IncomingEvent] = {}
    owner: dict[str, int] = {}
    for index, events in enumerate(requests):
        for event in events:
            if event.message_id not in unique:
                unique[event.message_id] = event
                owner[event.message_id] = index
    with write_session(settings.resolved_database_url) as session:
        known = _stored_message_ids(session, list(unique))
        new = [event for message_id, event in unique.items() if message_id not in known]
        refused: dict[str, EventError] = {}
        facts: dict[str, dict[str, Any]] = {}
        if new:
            new = _resolve_identities(session, new)
            refused, changed = _store_customers(session, new, settings)
            new = [event for event in new if event.message_id not in refused]
            _store_products(session, [e for e in new if e.trusted and not e.derived])
            _store_orders(session, new, settings.offline_channel_set)
            carts, dropped = _store_carts(session, new)
            new = [event for event in new if event.message_id not in dropped]
            for message_id, names in changed.items():
                facts.setdefault(message_id, {})["changed_traits"] = names
            for message_id, cart in carts.items():
                facts.setdefault(message_id, {})["cart"] = cart
        received = utcnow()
        rows = [
            outbox_row(
                message_id=event.message_id,
                customer_id=event.customer_id,
                event_type=event.type,
                name=event.name,
                payload=event.payload,
                timestamp=event.timestamp,
                received_at=received,
                source=event.source,
                imported=event.imported,
                facts=facts.get(event.message_id),
            )
            for event in new
        ]
        inserted = insert_events(session, rows)
        _store_ad_clicks(session, [e for e in new if e.message_id in inserted])
        # After the identifies' rows, so a withdrawal's event comes after its identify.
        withdrew = _store_consent(session, [e for e in new if e.message_id in inserted])
    stored = [0] * len(requests)
    stored_ids: list[set[str]] = [set() for _ in requests]
    to_route = [False] * len(requests)
    derived = {event.message_id: event for event in new if event.derived}
    for row in rows:
        if row["message_id"] in inserted:
            if (made := derived.get(row["message_id"])) is not None:
                # A merge's event: the router must run for it, but the sender did not send it.
                index = owner[made.payload["kaeru"]["merge_of"]]
            else:
                index = owner[row["message_id"]]
                stored[index] += 1
                stored_ids[index].add(row["message_id"])
            to_route[index] = to_route[index] or row["routed_at"] is None
    for message_id in withdrew:
        to_route[owner[message_id]] = True
    rejected: list[list[tuple[int, EventError]]] = [[] for _ in requests]
    for index, events in enumerate(requests):
        for position, event in enumerate(events):
            if event.message_id in refused and owner[event.message_id] == index:
                rejected[index].append((position, refused[event.message_id]))
    return [
        StoreResult(
            stored=stored[i],
            duplicates=len(events) - stored[i] - len(rejected[i]),
            to_route=to_route[i],
            rejected=tuple(rejected[i]),
            stored_ids=frozenset(stored_ids[i]),
        )
        for i, events in enumerate(requests)
    ]


class EventStore:
    """Stores what concurrent requests bring, several requests per transaction (group commit).

    Each request waits until the transaction holding its events has committed, so an answered
    event is stored exactly as with a transaction of its own. While one transaction runs, the
    requests that arrive queue up, and the next transaction takes them all (up to
    ``max_events``): under load a transaction carries many requests, and the fixed cost of one
    is paid once for all of them. That cost is mostly waiting, not work: every SQLite call
    releases the GIL, and the thread gets it back from the busy event loop only after up to
    the switch interval (5 ms), so a transaction of a dozen calls took tens of milliseconds in
    the API process and one transaction per request capped /v1/track at a few hundred a
    second (about 450/s serialised; 1,400-1,700/s grouped, measured on 2 cores). SQLite has
    one writer anyway, so it gets one transaction at a time; PostgreSQL up to ``writers``
    (their inserts are ordered by the outbox lock).

    A transaction that fails for the database's sake (:class:`OperationalError`: down, locked)
    fails every request in it; any other failure is retried request by request, so one
    request's events cannot fail another's.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        writers: int | None = None,
        max_events: int = 5000,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        url = settings.resolved_database_url
        self.writers = writers or (1 if url.startswith("sqlite") else 4)
        self.max_events = max_events
        self._pending: deque[tuple[list[IncomingEvent], asyncio.Future[StoreResult]]] = deque()
        self._active = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def store(self, events: Sequence[IncomingEvent]) -> StoreResult:
        """Store ``events`` (already checked); returns once they are committed."""
        if not events:
            return StoreResult(stored=0, duplicates=0, to_route=False)
        if carrier := current_carrier():  # tracing on: the router continues this trace
            events = [with_trace_context(event, carrier) for event in events]
        future: asyncio.Future[StoreResult] = asyncio.get_running_loop().create_future()
        self._pending.append((list(events), future))
        if self._active < self.writers:
            self._active += 1
            task = asyncio.create_task(self._drain(), name="kaeru-event-store")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        result = await future
        if self.metrics is not None:
            self._count(events, result, self.metrics)
        return result

    @staticmethod
    def _count(events: Sequence[IncomingEvent], result: StoreResult, metrics: ApiMetrics) -> None:
        counted: set[str] = set()
        for event in events:
            if event.message_id in result.stored_ids and event.message_id not in counted:
                counted.add(event.message_id)
                metrics.ingested(event.type, event.name)
        if result.duplicates:
            metrics.events_duplicate.inc(result.duplicates)
        for _, refused in result.rejected:
            metrics.rejected(refused.code)

    async def _drain(self) -> None:
        try:
            while self._pending:
                group = [self._pending.popleft()]
                size = len(group[0][0])
                while self._pending and size + len(self._pending[0][0]) <= self.max_events:
                    size += len(self._pending[0][0])
                    group.append(self._pending.popleft())
                await self._commit(group)
        finally:
            # No await between the emptiness check above and this: a request queued meanwhile
            # finds a free writer and starts one.
            self._active -= 1

    async def _commit(
        self, group: list[tuple[list[IncomingEvent], asyncio.Future[StoreResult]]]
    ) -> None:
        try:
            results = await asyncio.to_thread(
                store_requests, self.settings, [events for events, _ in group]
            )
        except Exception as exc:
            if len(group) == 1 or isinstance(exc, OperationalError):
                _fail(group, exc)
                return
            log.warning(
                "storing %d requests together failed (%r); storing each alone", len(group), exc
            )
            for events, future in group:
                try:
                    result = await asyncio.to_thread(store_events, self.settings, events)
                except Exception as alone:
                    _fail([(events, future)], alone)
                else:
                    _resolve(future, result)
            return
        except BaseException as exc:  # cancelled (shutdown): the requests must not hang
            _fail(group, exc)
            raise
        for (_, future), result in zip(group, results, strict=True):
            _resolve(future, result)


def _resolve(future: asyncio.Future[StoreResult], result: StoreResult) -> None:
    if not future.done():  # its request may have been cancelled (the client went away)
        future.set_result(result)


def _fail(
    group: list[tuple[list[IncomingEvent], asyncio.Future[StoreResult]]], exc: BaseException
) -> None:
    for _, future in group:
        if not future.done():
            future.set_exception(exc)


_MESSAGE_ID = _table(Event).c.message_id
#: Built once (an expanding IN): building a statement costs more than running it.
_STORED_MESSAGE_IDS = select(_MESSAGE_ID).where(_MESSAGE_ID.in_(bindparam("ids", expanding=True)))


def _stored_message_ids(session: Session, message_ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(message_ids), 500):
        chunk = message_ids[start : start + 500]
        found.update(session.execute(_STORED_MESSAGE_IDS, {"ids": chunk}).scalars())
    return found


# ---- customers -------------------------------------------------------------------------------


def _traits_problem(traits: dict[str, Any], settings: Settings) -> EventError | None:
    if len(traits) > settings.max_traits:
        return EventError(
            "too_many_traits",
            f"the customer's traits would be {len(traits)} keys, over KAERU_MAX_TRAITS="
            f"{settings.max_traits} (stored traits merged with this identify): send fewer traits",
        )
    if (size := encoded_size(traits)) > settings.max_traits_bytes:
        return EventError(
            "traits_too_large",
            f"the customer's traits would be {size} bytes as JSON, over KAERU_MAX_TRAITS_BYTES="
            f"{settings.max_traits_bytes} (stored traits merged with this identify): send less",
        )
    return None


def _store_customers(
    session: Session, events: Sequence[IncomingEvent], settings: Settings
) -> tuple[dict[str, EventError], dict[str, list[str]]]:
    """Every customer gets a profile; ``identify`` traits and emails update it, in order.

    Returns:
        The events refused because the customer's merged traits would pass the caps, by
        message id (they change nothing and are not stored); and, by message id of each
        stored ``identify``, the names of the traits it set new or changed (``email`` too
        when the address was first set or changed), in the order the event sent them.
    """
    now = utcnow()
    session.execute(
        _insert(session, _table(Customer)).on_conflict_do_nothing(index_elements=["customer_id"]),
        [
            {"customer_id": c, "email": None, "traits": {}, "created_at": now, "updated_at": now}
            for c in sorted({event.customer_id for event in events})
        ],
    )
    updates: dict[str, list[tuple[IncomingEvent, str | None]]] = {}
    zones: dict[str, str] = {}
    for event in events:
        email = stated_email(event)
        if (event.type == "identify" and event.traits) or email:
            updates.setdefault(event.customer_id, []).append((event, email))
        elif event.type == "identify":
            updates.setdefault(event.customer_id, []).append((event, None))
        if not event.imported and (zone := timezone_of(event)) is not None:
            zones[event.customer_id] = zone  # the newest event's zone wins
    refused: dict[str, EventError] = {}
    changed: dict[str, list[str]] = {}
    # Sorted, so two requests updating the same customers lock them in the same order.
    for customer_id in sorted(updates):
        customer = session.get(Customer, customer_id, with_for_update=True)
        assert customer is not None  # inserted above, in this transaction
        traits, address = dict(customer.traits), customer.email
        for event, email in updates[customer_id]:
            names: list[str] = []
            if event.type == "identify" and event.traits:
                merged = {**traits, **event.traits}
                if (problem := _traits_problem(merged, settings)) is not None:
                    refused[event.message_id] = problem
                    continue
                names = [
                    key
                    for key, value in event.traits.items()
                    if traits.get(key, _NO_VALUE) != value
                ]
                traits = merged
            if email and email != address and "email" not in names:
                names.append("email")
            address = email or address
            if event.type == "identify":
                changed[event.message_id] = names
        if traits != customer.traits or address != customer.email:
            customer.traits, customer.email, customer.updated_at = traits, address, now
            session.add(customer)
    session.flush()
    if zones:
        # One statement for every customer (almost every event of a browser carries
        # context.timezone): no row is read, and only a changed zone is written.
        session.execute(
            _ZONE_UPDATE,
            [{"id": c, "zone": zones[c], "now": now} for c in sorted(zones)],
        )
    return refused, changed


_CUSTOMERS = _table(Customer)
#: Built once: the customer's time zone, when it changed.
_ZONE_UPDATE = (
    _CUSTOMERS.update()
    .where(_CUSTOMERS.c.customer_id == bindparam("id"))
    .where(or_(_CUSTOMERS.c.timezone.is_(None), _CUSTOMERS.c.timezone != bindparam("zone")))
    .values(timezone=bindparam("zone"), updated_at=bindparam("now"))
)


#: Stands for a trait the customer does not have (``None`` is a value a trait can hold).
_NO_VALUE = object()


def timezone_of(event: IncomingEvent) -> str | None:
    """The customer's IANA time zone an event states (an identify's ``traits.timezone``, else
    ``context.timezone``), or None.

    A name zoneinfo does not know is ignored with a warning, never refused: Segment's
    libraries fill ``context.timezone`` from the device on every event, so an odd value from
    an old browser must not cost the event, and quiet hours then fall back to the shop's zone.
    """
    stated = [event.traits.get("timezone")] if event.type == "identify" else []
    stated.append(event.context.get("timezone"))
    for value in stated:
        if value is None or value == "":
            continue
        if isinstance(value, str) and len(value) <= MAX_TIMEZONE_LENGTH:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError, OSError):
                pass
            else:
                return value
        # The message id, not the value or the customer: neither belongs in a log.
        log.warning(
            "event %s names a time zone zoneinfo does not know; it is ignored (send an IANA "
            "name such as Europe/Berlin)",
            event.message_id,
        )
    return None


def _store_consent(session: Session, events: Sequence[IncomingEvent]) -> set[str]:
    """Set consent from the consent traits of each stored identify of the server key, in order
    (``kaeru.consent.consent_from_traits``; read_event refused bad values). Imported history
    sets none: an old ``true`` must not undo a later unsubscribe.

    Returns:
        The message ids of the identifies that unsubscribed a channel: the withdrawal event
        each stored needs the router.
    """
    withdrawn: set[str] = set()
    now = utcnow()
    for event in events:
        if event.type != "identify" or not event.trusted or event.derived or event.imported:
            continue
        for channel, subscribed in consent_from_traits(event.traits).items():
            change = change_consent(
                session,
                event.customer_id,
                channel,
                subscribed,
                "identify",
                detail=f"identify {event.message_id}",
                at=now,
            )
            if change is not None and not subscribed:
                withdrawn.add(event.message_id)
    return withdrawn


# ---- products --------------------------------------------------------------------------------


def _product_values(props: dict[str, Any], currency: Any) -> dict[str, Any] | None:
    """Product columns the event states (absent ones are left as stored)."""
    product_id = product_id_of(props)
    if product_id is None:
        return None
    values: dict[str, Any] = {"product_id": product_id}
    if name := clean_product_name(props.get("name")):
        values["name"] = name
    code = currency_of(props.get("currency") or currency)
    if (price := minor_of(props.get("price"), code)) is not None:
        values["price_minor"], values["currency"] = price, code
    for field in ("image_url", "url"):
        if isinstance(props.get(field), str):
            values[field] = props[field][:2000]
    return values


def products_of(event: IncomingEvent) -> list[dict[str, Any]]:
    """Products an e-commerce event describes: the event itself, or its ``products`` list."""
    if event.type != "track":
        return []
    props = event.properties
    found: list[dict[str, Any]] = []
    if event.name in PRODUCT_EVENTS and (values := _product_values(props, None)):
        found.append(values)
    items = props.get("products")
    if isinstance(items, list):
        found.extend(
            values
            for item in items
            if isinstance(item, dict) and (values := _product_values(item, props.get("currency")))
        )
    return found


def _store_products(session: Session, events: Iterable[IncomingEvent]) -> None:
    """Write the catalogue from ``events`` (trusted ones only: the caller filters)."""
    latest: dict[str, dict[str, Any]] = {}
    for event in events:
        for values in products_of(event):
            latest.setdefault(values["product_id"], {}).update(values)
    now = utcnow()
    dialect = session.get_bind().dialect.name
    for product_id in sorted(latest):
        values = {**latest[product_id], "updated_at": now}
        row = {"name": product_id, "currency": "USD", **values}
        session.execute(_product_upsert(dialect, tuple(sorted(values))), row)


@lru_cache(maxsize=256)
def _product_upsert(dialect: str, stated: tuple[str, ...]) -> Any:
    """Insert a product, or update only the ``stated`` columns of the stored one.

    Built once per dialect and set of columns, so SQLAlchemy's compiled cache is hit.
    """
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(_table(Product))
    return statement.on_conflict_do_update(
        index_elements=["product_id"],
        set_={key: statement.excluded[key] for key in stated if key != "product_id"},
    )


# ---- carts ---------------------------------------------------------------------------------


def _stored_cart(session: Session, customer_id: str) -> list[CartLine]:
    table = _table(CartItem)
    rows = session.execute(
        select(CartItem).where(table.c.customer_id == customer_id).order_by(table.c.position)
    ).scalars()
    return [
        CartLine(
            product_id=row.product_id,
            quantity=row.quantity,
            name=row.name,
            price_minor=row.price_minor,
            currency=row.currency,
            image_url=row.image_url,
            url=row.url,
        )
        for row in rows
    ]


def _store_carts(
    session: Session, events: Sequence[IncomingEvent]
) -> tuple[dict[str, list[dict[str, Any]]], set[str]]:
    """Keep each customer's cart from their cart events, in order; their order empties it.

    An ``Identity Merged`` moves the anonymous id's cart into the ``Cart Viewed`` the merge
    stores for the user (which then lists the merged cart); imported history changes no cart.

    Returns:
        By message id of each cart event that said something about the cart, the whole cart
        after it (``Cart Viewed`` ``products`` items); and the merges' ``Cart Viewed`` not to
        store (the anonymous id had no cart).
    """
    mine = [
        event
        for event in events
        if event.type == "track"
        and not event.imported
        and (event.name in CART_EVENTS or event.name in (ORDER_COMPLETED, IDENTITY_MERGED))
    ]
    carts: dict[str, list[CartLine]] = {}
    # Sorted and locked through the customer row, so concurrent writers apply one customer's
    # cart events one transaction after another, as their events were committed.
    for customer_id in sorted({event.customer_id for event in mine}):
        session.get(Customer, customer_id, with_for_update=True)
        carts[customer_id] = _stored_cart(session, customer_id)
    stored = {customer_id: list(cart) for customer_id, cart in carts.items()}
    after: dict[str, list[dict[str, Any]]] = {}
    moving: dict[str, list[CartLine]] = {}
    dropped: set[str] = set()
    for event in mine:
        cart = carts[event.customer_id]
        if event.name == IDENTITY_MERGED and event.derived:
            into = str(event.properties.get("into"))
            moving[into] = merge_carts(moving.get(into, []), cart)
            carts[event.customer_id] = []
            continue
        if event.name == ORDER_COMPLETED:
            carts[event.customer_id] = []
            continue
        if event.derived:  # the merge's Cart Viewed: the user's cart plus the moved one
            if not (moved := moving.pop(event.customer_id, [])):
                dropped.add(event.message_id)
                continue
            merged = merge_carts(cart, moved)
            event.properties["products"] = [line.as_product() for line in merged]
        if (changed := apply_cart_event(cart, event.name, event.properties)) is None:
            continue
        carts[event.customer_id] = changed
        after[event.message_id] = [line.as_product() for line in changed]
    now = utcnow()
    for customer_id in sorted(carts):
        if carts[customer_id] == stored[customer_id]:
            continue
        session.execute(
            _table(CartItem).delete().where(_table(CartItem).c.customer_id == customer_id)
        )
        session.add_all(
            CartItem(
                customer_id=customer_id,
                position=position,
                updated_at=now,
                product_id=line.product_id,
                quantity=line.quantity,
                name=line.name,
                price_minor=line.price_minor,
                currency=line.currency,
                image_url=line.image_url,
                url=line.url,
            )
            for position, line in enumerate(carts[customer_id])
        )
    session.flush()
    return after, dropped


# ---- identities ------------------------------------------------------------------------------


def _resolve_identities(session: Session, events: Sequence[IncomingEvent]) -> list[IncomingEvent]:
    """Events as kaeru stores them: an anonymous id merged into a user is the user's, and
    each merge an ``identify`` makes adds its ``Identity Merged`` and ``Cart Viewed``.

    A merge the trust rules refuse (:func:`kaeru.identity.merge_refusal`) moves nothing: the
    identify is stored with the reason under ``payload.kaeru.merge_refused``.
    """
    anonymous = sorted({a for event in events if (a := event.anonymous_id) is not None})
    if not anonymous:
        return list(events)
    table = _table(IdentityAlias)
    aliases: dict[str, str] = {}
    for start in range(0, len(anonymous), 500):
        rows = session.execute(
            select(table.c.anonymous_id, table.c.customer_id).where(
                table.c.anonymous_id.in_(anonymous[start : start + 500])
            )
        )
        aliases.update({row[0]: row[1] for row in rows})
    with_email: set[str] = set()
    out: list[IncomingEvent] = []
    for event in events:
        anonymous_id, user_id = event.anonymous_id, event.user_id
        if user_id is None and anonymous_id in aliases:
            event = replace(event, customer_id=aliases[anonymous_id])
        if stated_email(event):
            with_email.add(event.customer_id)
        if event.type != "identify" or user_id is None or anonymous_id in (None, user_id):
            out.append(event)
            continue
        assert anonymous_id is not None
        already = aliases.get(anonymous_id)
        if already == user_id:  # merged before: nothing to move
            out.append(event)
            continue
        known = session.get(Customer, user_id)
        refusal = merge_refusal(
            trusted=event.trusted,
            already_into=already,
            into=user_id,
            into_has_email=user_id in with_email or bool(known and known.email),
        )
        if refusal is not None:
            notes = _object_of(event.payload.get("kaeru"))
            out.append(
                replace(
                    event, payload={**event.payload, "kaeru": {**notes, "merge_refused": refusal}}
                )
            )
            continue
        aliases[anonymous_id] = user_id
        _save_alias(session, anonymous_id, user_id, event)
        out.extend([event, *_merge_events(event, anonymous_id, user_id)])
    return out


def _object_of(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _save_alias(session: Session, anonymous_id: str, user_id: str, event: IncomingEvent) -> None:
    values = {
        "anonymous_id": anonymous_id,
        "customer_id": user_id,
        "message_id": event.message_id,
        "source": event.source,
        "merged_at": utcnow(),
    }
    statement = _insert(session, _table(IdentityAlias))
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["anonymous_id"],
            set_={key: statement.excluded[key] for key in values if key != "anonymous_id"},
        ),
        values,
    )


def _merge_events(identify: IncomingEvent, anonymous_id: str, user_id: str) -> list[IncomingEvent]:
    """What a merge stores after its identify: ``Identity Merged`` for the anonymous id, and a
    ``Cart Viewed`` for the user that :func:`_store_carts` fills with the merged cart."""

    def event(part: str, customer_id: str, name: str, props: dict[str, Any]) -> IncomingEvent:
        message_id = merge_id(identify.message_id, part)
        id_field = "userId" if customer_id == user_id else "anonymousId"
        return IncomingEvent(
            message_id=message_id,
            customer_id=customer_id,
            type="track",
            name=name,
            timestamp=identify.timestamp,
            payload={
                "type": "track",
                "event": name,
                id_field: customer_id,
                "messageId": message_id,
                "properties": props,
                "kaeru": {"merge_of": identify.message_id},
            },
            source=identify.source,
            derived=True,
        )

    return [
        event("identity", anonymous_id, IDENTITY_MERGED, {"into": user_id}),
        event("cart", user_id, "Cart Viewed", {"products": []}),
    ]


# ---- orders ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderFacts:
    order_id: str
    customer_id: str
    total_minor: int
    currency: str
    coupon: str | None
    lines: dict[str, int]
    completed_at: datetime
    #: Where it was placed: ``web``, or the channel its ``context.channel`` names.
    channel: str = "web"
    #: ``channel`` is a store channel (KAERU_OFFLINE_CHANNELS).
    offline: bool = False
    #: The event that reported it.
    message_id: str = ""


def order_of(
    event: IncomingEvent, offline_channels: frozenset[str] = frozenset()
) -> OrderFacts | None:
    """The order an ``Order Completed`` event reports (read as the journeys read it); None for
    another event, or a browser order that does not count (KAERU_TRUST_BROWSER_ORDERS).

    Its channel is the event's ``context.channel`` (:func:`kaeru.touchpoints.channel_of`:
    ``web`` by default, a store channel of ``offline_channels`` from the server key only)."""
    if event.type != "track" or event.name != ORDER_COMPLETED or not event.counts_as_order:
        return None
    props = event.properties
    order = order_total_of(props, event.message_id)
    order_id, currency, coupon_code = order.order_id, order.currency, order.coupon
    if len(order_id) > MAX_ID_LENGTH:
        log.warning("order id of event %s is too long to store; order skipped", event.message_id)
        return None
    channel = channel_of(
        event.context.get("channel"), trusted=event.trusted, offline=offline_channels
    )
    total = order.total_minor
    if total is None:
        log.warning("order %s has an unreadable total; stored as 0", order_id)
        total = 0
    lines: dict[str, int] = {}
    for item in order_items_of(props):  # one product listed twice is one line of both
        lines[item.product_id] = min(lines.get(item.product_id, 0) + item.quantity, MAX_QUANTITY)
    return OrderFacts(
        order_id=order_id,
        customer_id=event.customer_id,
        total_minor=total,
        currency=currency,
        coupon=coupon_code,
        lines=lines,
        completed_at=event.timestamp,
        channel=channel,
        offline=channel in offline_channels,
        message_id=event.message_id,
    )


def _store_orders(
    session: Session, events: Iterable[IncomingEvent], offline_channels: frozenset[str]
) -> None:
    """Store each new order with its lines, its ``purchase`` touchpoint, and redeem its
    coupon; a known order is kept as is (and so is its one purchase touch)."""
    orders: dict[str, OrderFacts] = {}
    for event in events:
        if (facts := order_of(event, offline_channels)) is not None:
            orders.setdefault(facts.order_id, facts)
    for order_id in sorted(orders):
        facts = orders[order_id]
        inserted = session.execute(
            _insert(session, _table(Order))
            .values(
                order_id=facts.order_id,
                customer_id=facts.customer_id,
                total_minor=facts.total_minor,
                currency=facts.currency,
                coupon=facts.coupon,
                completed_at=facts.completed_at,
            )
            .on_conflict_do_nothing(index_elements=["order_id"])
            .returning(_table(Order).c.order_id)
        ).first()
        if inserted is None:
            continue
        for product_id, quantity in sorted(facts.lines.items()):
            session.add(OrderLine(order_id=order_id, product_id=product_id, quantity=quantity))
        session.flush()
        record_purchase(
            session,
            customer_id=facts.customer_id,
            order_id=facts.order_id,
            value_minor=facts.total_minor,
            currency=facts.currency,
            coupon_code=facts.coupon,
            channel=facts.channel,
            occurred_at=facts.completed_at,
            offline=facts.offline,
            detail={"message_id": facts.message_id},
        )
        if facts.coupon:
            _redeem(session, facts)


def _redeem(session: Session, facts: OrderFacts) -> None:
    """Mark the order's coupon used. A failure is logged; the order is kept regardless."""
    try:
        with session.begin_nested():
            coupon = redeem_coupon(
                session,
                facts.coupon or "",
                facts.order_id,
                facts.completed_at,
                customer_id=facts.customer_id,
                channel=facts.channel,
            )
    except Exception:
        log.exception(
            "could not redeem coupon %r for order %s; the order is stored without it",
            facts.coupon,
            facts.order_id,
        )
        return
    if coupon is None:
        log.info(
            "order %s used coupon %r, which kaeru did not issue to this customer or which is "
            "used or expired",
            facts.order_id,
            facts.coupon,
        )


# ---- ad clicks ---------------------------------------------------------------------------------


def _store_ad_clicks(session: Session, events: Iterable[IncomingEvent]) -> None:
    """One ``ad_clicked`` touchpoint per stored ``Ad Clicked`` (the track event, or a page
    call from the retargeting campaign). Its journey is the one ``properties.journey_id``
    names, if that is a journey of the same customer (a forged id names none)."""
    for event in events:
        if event.name != AD_CLICKED:
            continue
        named = event.properties.get("journey_id")
        journey_id = None
        if isinstance(named, str) and (kind := kind_of_workflow_id(named)) is not None:
            journey_id = named if named == f"{kind}-{event.customer_id}" else None
        campaign = event.context.get("campaign")
        name = campaign.get("name") if isinstance(campaign, dict) else None
        record_touchpoint(
            session,
            customer_id=event.customer_id,
            kind="ad_clicked",
            key=f"ad_clicked/{event.message_id}",
            journey_id=journey_id,
            channel=ADS,
            occurred_at=event.timestamp,
            detail={"message_id": event.message_id}
            | ({"campaign": name[:200]} if isinstance(name, str) else {}),
        )
