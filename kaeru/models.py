"""Database tables (sqlmodel). Works on SQLite and PostgreSQL; schema changes go through alembic.

Every timestamp is timezone-aware UTC. Money is integer minor units plus a currency code.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: kaeru stores timezone-aware UTC timestamps only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(*, nullable: bool = False, index: bool = False) -> Any:
    column: Column[datetime] = Column(UTCDateTime(), nullable=nullable, index=index)
    if nullable:
        return Field(default=None, sa_column=column)
    return Field(default_factory=utcnow, sa_column=column)


def _json(nullable: bool = False) -> Any:
    return Field(default_factory=dict, sa_column=Column(JSON, nullable=nullable))


class Event(SQLModel, table=True):
    """Every accepted event, stored before it is routed (the outbox). ``seq`` orders them."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_unrouted", "routed_at", "seq"),)

    seq: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    message_id: str = Field(sa_column=Column(String(200), unique=True, nullable=False))
    customer_id: str = Field(sa_column=Column(String(200), nullable=False, index=True))
    type: str = Field(max_length=20)
    name: str | None = Field(default=None, max_length=200)
    payload: dict[str, Any] = _json()
    timestamp: datetime = _ts()
    received_at: datetime = _ts()
    routed_at: datetime | None = _ts(nullable=True)
    route_attempts: int = 0
    route_error: str | None = None
    #: Which key the event came with: ``server`` (trusted) or ``browser`` (untrusted).
    source: str = Field(
        default="server",
        sa_column=Column(String(10), nullable=False, server_default="server"),
    )
    #: Set when the router gave up on the event (see ``park_reason``): it left the ordered
    #: stream, the customer's later events flow, and an operator retries or drops it.
    parked_at: datetime | None = _ts(nullable=True)
    park_reason: str | None = None
    #: An operator sent a parked event back into routing (so it may be older than the
    #: customer's last routed ``seq``).
    retried_at: datetime | None = _ts(nullable=True)
    #: An operator dropped a parked event: never routed, kept for the record.
    dropped_at: datetime | None = _ts(nullable=True)
    #: Why the router handled the event as it did, when that was not a plain delivery.
    route_note: str | None = Field(default=None, max_length=500)


class Customer(SQLModel, table=True):
    """A shopper: ``userId``, or ``anonymousId`` until identified."""

    __tablename__ = "customers"

    customer_id: str = Field(primary_key=True, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    traits: dict[str, Any] = _json()
    #: IANA time zone (``Asia/Tokyo``) from traits or ``context.timezone``; None: the shop's.
    timezone: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Product(SQLModel, table=True):
    """What the shop sells, as learnt from its events."""

    __tablename__ = "products"

    product_id: str = Field(primary_key=True, max_length=200)
    name: str = Field(max_length=500)
    price_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    currency: str = Field(default="USD", max_length=3)
    image_url: str | None = None
    url: str | None = None
    updated_at: datetime = _ts()
    #: False: out of stock or withdrawn (``kaeru catalog import``): never recommended.
    available: bool = Field(
        default=True, sa_column=Column(Boolean, nullable=False, server_default=true())
    )


class Order(SQLModel, table=True):
    """A completed order, stored at ingestion whether or not a journey is waiting for it."""

    __tablename__ = "orders"

    order_id: str = Field(primary_key=True, max_length=200)
    customer_id: str = Field(index=True, max_length=200)
    total_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(max_length=3)
    coupon: str | None = Field(default=None, max_length=200)
    completed_at: datetime = _ts()


class OrderLine(SQLModel, table=True):
    __tablename__ = "order_lines"

    order_id: str = Field(primary_key=True, max_length=200)
    product_id: str = Field(primary_key=True, max_length=200, index=True)
    quantity: int = 1


class Coupon(SQLModel, table=True):
    """A single-use coupon of the local coupon provider."""

    __tablename__ = "coupons"

    code: str = Field(primary_key=True, max_length=64)
    idempotency_key: str = Field(sa_column=Column(String(400), unique=True, nullable=False))
    customer_id: str = Field(index=True, max_length=200)
    journey_id: str = Field(max_length=400)
    amount_minor: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(max_length=3)
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
    redeemed_at: datetime | None = _ts(nullable=True)
    redeemed_order_id: str | None = Field(default=None, max_length=200)


class AudienceMember(SQLModel, table=True):
    """Membership in the local audience store (the default ad-audience provider)."""

    __tablename__ = "audience_members"

    audience: str = Field(primary_key=True, max_length=200)
    customer_id: str = Field(primary_key=True, max_length=200)
    email_sha256: str = Field(max_length=64)
    journey_id: str = Field(max_length=400)
    added_at: datetime = _ts()


class EmailMessage(SQLModel, table=True):
    """The message log: one row per journey message, so a retried send never sends twice.

    ``status`` goes pending → sending → data → sent (or bounced, unconfirmed, skipped);
    ``data`` and ``unconfirmed`` mean the SMTP server may hold the message, so it is never
    resent. The states are explained in ``activities/email/message_log.py``.
    """

    __tablename__ = "email_messages"
    __table_args__ = (Index("ix_email_messages_topic", "customer_id", "topic"),)

    key: str = Field(primary_key=True, max_length=400)
    message_id: str = Field(max_length=400)
    customer_id: str = Field(index=True, max_length=200)
    journey_id: str = Field(max_length=400)
    step: str = Field(max_length=100)
    to_address: str = Field(max_length=320)
    subject: str = Field(max_length=500)
    status: str = Field(max_length=20)
    links: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    attempts: int = 0
    created_at: datetime = _ts()
    sent_at: datetime | None = _ts(nullable=True)
    error: str | None = None
    first_open_routed: bool = False
    first_click_routed: bool = False
    #: A marketing message (consent and the topic rule apply) or a transactional one.
    marketing: bool = Field(
        default=True, sa_column=Column(Boolean, nullable=False, server_default=true())
    )
    #: What the message is about (``cart:<fingerprint>``): one marketing message per topic.
    topic: str | None = Field(default=None, max_length=200)
    #: The experiment arm it is (``SendEmailInput.variant``), for its opens and clicks.
    variant: str | None = Field(default=None, max_length=100)


class Suppression(SQLModel, table=True):
    """Addresses kaeru must not email: ``reason`` is ``hard_bounce``, ``complaint`` or
    ``manual`` (see kaeru/consent.py)."""

    __tablename__ = "suppressions"

    email: str = Field(primary_key=True, max_length=320)
    reason: str = Field(max_length=50)
    detail: str | None = None
    created_at: datetime = _ts()
    #: Where it came from: ``smtp`` (a 5xx), ``arf`` (a feedback-loop report), ``ses`` (the
    #: provider webhook), ``cli``; None for rows older than the column.
    source: str | None = Field(default=None, max_length=50)


class Touchpoint(SQLModel, table=True):
    """Append-only record of every touch, online and offline: its kinds are listed in
    kaeru/touchpoints.py (email sent, delivered, opened, clicked; audience joined and left; ad
    clicked; coupon issued and redeemed; purchase, conversion; store visit, contact)."""

    __tablename__ = "touchpoints"
    __table_args__ = (
        UniqueConstraint("key", name="uq_touchpoints_key"),
        UniqueConstraint("order_key", name="uq_touchpoints_order_key"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    key: str | None = Field(default=None, max_length=400)
    customer_id: str = Field(index=True, max_length=200)
    journey_id: str | None = Field(default=None, index=True, max_length=400)
    step: str | None = Field(default=None, max_length=100)
    kind: str = Field(index=True, max_length=50)
    occurred_at: datetime = _ts(index=True)
    #: The kind of the journey of ``journey_id`` (``cart``, ``win-back``...), so reports group
    #: by kind without parsing ids; NULL for a touch outside any journey (a purchase).
    journey_kind: str | None = Field(default=None, index=True, max_length=100)
    #: The experiment variant this touch belongs to (``holdout`` for the holdout group).
    variant: str | None = Field(default=None, max_length=100)
    #: Where the touch happened: ``email``, ``ads``, ``web``, or an offline channel (``pos``,
    #: ``call-centre``...) from ``context.channel`` or ``kaeru touchpoints import``.
    channel: str | None = Field(default=None, max_length=50)
    order_id: str | None = Field(default=None, max_length=200)
    value_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    currency: str | None = Field(default=None, max_length=3)
    coupon_code: str | None = Field(default=None, max_length=64)
    detail: dict[str, Any] = _json()
    #: A conversion's ``<journey kind>/<customer id>/<order id>``: one conversion per journey
    #: kind, customer and order, however often the order is delivered (NULL for every other
    #: touch). 1,000 characters: a kind (at most the 400 of ``journey_id``) and two ids of at
    #: most 200 each.
    order_key: str | None = Field(default=None, max_length=1000)


class AppSecret(SQLModel, table=True):
    """Secrets kaeru generates once and must keep across restarts (the link-signing key)."""

    __tablename__ = "app_secrets"

    name: str = Field(primary_key=True, max_length=100)
    value: str = Field(max_length=200)
    created_at: datetime = _ts()


class Lease(SQLModel, table=True):
    """A named lease held by one process at a time (the event router)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=100)
    holder: str = Field(max_length=200)
    expires_at: datetime = _ts()
    #: The fencing token: increases every time the lease changes holder. A holder's writes
    #: carry its token and are refused once another process took the lease over.
    token: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


# ---- Stream D (issue 13): the message log's tracking links ----------------------------------


class TrackingLink(SQLModel, table=True):
    """One tracking token of a sent email (its open pixel or one of its links), with its hits.

    Keyed by the token's SHA-256 (:func:`kaeru.tracking_tokens.digest_of`), never the token: a copy
    of the database cannot be replayed as opens or clicks. Repeated hits are counted here; only
    the first one of each token becomes a touchpoint.
    """

    __tablename__ = "tracking_links"

    digest: str = Field(primary_key=True, max_length=64)
    message_key: str = Field(index=True, max_length=400)
    kind: str = Field(max_length=1)  # "o" (open) or "c" (click)
    link: int | None = None  # the index into EmailMessage.links of a click
    hits: int = 0
    created_at: datetime = _ts()
    first_hit_at: datetime | None = _ts(nullable=True)
    last_hit_at: datetime | None = _ts(nullable=True)
    #: Why the token's first hit was a machine's (kaeru/machine_opens.py: ``apple_mpp``,
    #: ``scanner_ua``, ``all_links_same_second``); None: a person's, or no hit yet.
    machine_reason: str | None = Field(default=None, max_length=30)
    #: The token's first hit judged a person's (open rates count these rows).
    first_human_at: datetime | None = _ts(nullable=True)


# ---- stream B (issue 13): journey exactness ----------------------------------------------------


class AudienceJoin(SQLModel, table=True):
    """What one journey step added to an ad audience, so that leaving removes exactly that.

    A removal that failed for good stays here with ``left_at`` unset, its ``removal_error``
    and ``retry_at``: the audience sweeper (a Temporal Schedule) tries it again then.
    """

    __tablename__ = "audience_joins"

    key: str = Field(primary_key=True, max_length=400)  # the add step's idempotency key
    journey_id: str = Field(max_length=400, index=True)
    customer_id: str = Field(max_length=200, index=True)
    audience: str = Field(max_length=200)
    provider: str = Field(max_length=20)
    audience_id: str = Field(max_length=200)
    email_sha256: str = Field(max_length=64)
    joined_at: datetime = _ts()
    left_at: datetime | None = _ts(nullable=True)
    removal_error: str | None = None
    removal_attempts: int = 0
    retry_at: datetime | None = _ts(nullable=True, index=True)


# ---- Stream A: the event router ------------------------------------------------------------


class CustomerRouting(SQLModel, table=True):
    """The router's state of one customer, kept outside any journey run.

    ``last_routed_seq`` is the newest event delivered to the customer's journeys; ``failures``
    and ``retry_at`` are the backoff after a failed delivery (the fetch skips the customer's
    events until ``retry_at``, in SQL, however many customers wait).
    """

    __tablename__ = "customer_routing"

    customer_id: str = Field(primary_key=True, max_length=200)
    last_routed_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    failures: int = 0
    retry_at: datetime | None = _ts(nullable=True)


# ---- Stream A: journey entries (re-entry rules) --------------------------------------------


class JourneyEntry(SQLModel, table=True):
    """One customer's entry into a journey kind, claimed by the kit when the journey starts.

    ``key`` is the claim's idempotency key (workflow id, first run id, generation): a retried
    claim finds its own row and is granted again. The re-entry rule reads the newest entry
    of (``kind``, ``customer_id``).
    """

    __tablename__ = "journey_entries"
    __table_args__ = (Index("ix_journey_entries_kind_customer", "kind", "customer_id"),)

    key: str = Field(primary_key=True, max_length=500)
    kind: str = Field(max_length=100)
    customer_id: str = Field(max_length=200)
    started_at: datetime = _ts()


# ---- Stream C: identity and carts ------------------------------------------------------------


class CartItem(SQLModel, table=True):
    """One line of a customer's cart, kept at ingestion from their cart events.

    A journey that starts after an earlier one ended reads the whole cart from here (through
    the ``cart`` property of each cart event), not only the newest item. ``position`` keeps
    the order lines were first added in; an order empties the cart.
    """

    __tablename__ = "cart_lines"

    customer_id: str = Field(primary_key=True, max_length=200)
    product_id: str = Field(primary_key=True, max_length=200)
    position: int
    quantity: int
    name: str | None = Field(default=None, max_length=500)
    price_minor: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    currency: str = Field(default="USD", max_length=3)
    image_url: str | None = None
    url: str | None = None
    updated_at: datetime = _ts()


class IdentityAlias(SQLModel, table=True):
    """An anonymous id merged into an identified customer (an ``identify`` naming both).

    Events that later carry only ``anonymous_id`` are stored for ``customer_id``.
    """

    __tablename__ = "identity_aliases"

    anonymous_id: str = Field(primary_key=True, max_length=200)
    customer_id: str = Field(max_length=200, index=True)
    #: The ``identify`` that merged them, and the key it came with.
    message_id: str = Field(max_length=200)
    source: str = Field(max_length=20)
    merged_at: datetime = _ts()


# ---- Consent and deliverability ---------------------------------------------------------------


class Consent(SQLModel, table=True):
    """A customer's marketing consent on one channel, as it stands now (see kaeru/consent.py).

    No row: ``unknown``. ``kinds_off`` lists journey kinds the customer opted out of on the
    preference page while staying subscribed to the rest. Every change is also a row of
    :class:`ConsentChange`.
    """

    __tablename__ = "consents"

    customer_id: str = Field(primary_key=True, max_length=200)
    channel: str = Field(primary_key=True, max_length=20)
    state: str = Field(max_length=20)
    source: str = Field(max_length=50)
    kinds_off: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    changed_at: datetime = _ts()


class ConsentChange(SQLModel, table=True):
    """Append-only history of consent: who said what, through which source, when."""

    __tablename__ = "consent_changes"
    __table_args__ = (Index("ix_consent_changes_customer", "customer_id", "changed_at"),)

    id: int | None = Field(default=None, primary_key=True)
    customer_id: str = Field(max_length=200)
    channel: str = Field(max_length=20)
    #: ``subscribed`` / ``unsubscribed`` for the channel, or for one journey ``kind``.
    state: str = Field(max_length=20)
    kind: str | None = Field(default=None, max_length=100)
    source: str = Field(max_length=50)
    detail: str | None = Field(default=None, max_length=500)
    changed_at: datetime = _ts()


# ---- Stream P: the shopper's rights (payload codec keys) --------------------------------------


class CustomerKey(SQLModel, table=True):
    """The data key of one customer's Temporal payloads (kaeru/codec.py), wrapped by the
    master key ``KAERU_CODEC_MASTER_KEY``.

    ``key_id`` names the key in each encrypted payload's metadata (``kaeru-key``), so a
    payload is decrypted by it alone. Erase crypto-shreds the key: ``wrapped_key`` is removed,
    ``customer_id`` becomes the customer's pseudonym and ``erased_at`` is set; the row stays so
    that a payload of an erased customer decodes as "erased", not as an unknown key.
    """

    __tablename__ = "customer_keys"

    customer_id: str = Field(primary_key=True, max_length=200)
    key_id: str = Field(sa_column=Column(String(32), unique=True, nullable=False))
    #: base64 of nonce + AES-GCM(master key, data key); None once erased.
    wrapped_key: str | None = Field(default=None, max_length=200)
    #: Which master key wrapped it (a fingerprint, see kaeru/codec.py); None once erased.
    key_version: str | None = Field(default=None, max_length=32)
    created_at: datetime = _ts()
    erased_at: datetime | None = _ts(nullable=True)


# ---- Stream C: consent feedback (complaints and bounces) -------------------------------------


class FeedbackReport(SQLModel, table=True):
    """One complaint or bounce report kaeru acted on, kept so the same report twice (a
    provider's retry) has one effect. No address: ``message_id`` names the kaeru message."""

    __tablename__ = "feedback_reports"

    #: ``arf:<sha-256 of the report>`` or ``ses:<feedbackId>``.
    report_id: str = Field(primary_key=True, max_length=200)
    #: ``complaint`` or ``hard_bounce``.
    kind: str = Field(max_length=20)
    message_id: str | None = Field(default=None, max_length=400)
    customer_id: str | None = Field(default=None, max_length=200)
    received_at: datetime = _ts()


# ---- Consent stream G: the send gate (frequency caps, priority, quiet hours) -------------------


class SendSlot(SQLModel, table=True):
    """One marketing message's reservation of a send slot (``activities/send_gate.py``).

    ``key`` is the message's idempotency key (``SendEmailInput.key``): a journey that asks
    again finds its own row. ``granted`` rows are what the frequency caps count (by
    ``granted_at``, the gate's clock); a ``waiting`` row of a higher ``priority`` (lower number)
    makes lower ones wait; ``dropped`` rows say why (``reason``) a message never went.
    """

    __tablename__ = "send_slots"
    __table_args__ = (Index("ix_send_slots_customer", "customer_id", "state", "granted_at"),)

    key: str = Field(primary_key=True, max_length=400)
    customer_id: str = Field(max_length=200)
    kind: str = Field(max_length=100)
    step: str = Field(max_length=100)
    priority: int
    channel: str = Field(max_length=20)
    #: ``waiting``, ``granted`` or ``dropped``.
    state: str = Field(max_length=20)
    wanted_at: datetime = _ts()
    granted_at: datetime | None = _ts(nullable=True)
    #: A waiting message's next free slot (when its journey asks again).
    until: datetime | None = _ts(nullable=True)
    #: Past it, the message is stale: dropped rather than sent (None: never stale).
    stale_at: datetime | None = _ts(nullable=True)
    #: Why the slot waits or was dropped (no personal data).
    reason: str | None = Field(default=None, max_length=500)
    updated_at: datetime = _ts()


# ---- Stream S: Shopify in (starter/shopify.py) ----------------------------------------------


class ShopifyCheckout(SQLModel, table=True):
    """The newest state of one Shopify checkout kaeru stored, and the order that completed it.

    Shopify does not deliver webhooks in order: a ``checkouts/update`` older than the one
    stored, or one delivered after the checkout's order, is not stored (it would undo the cart,
    or refill the cart the order emptied and remind a buyer of it).
    """

    __tablename__ = "shopify_checkouts"

    #: The checkout's ``id`` (an order's ``checkout_id``), else its ``token``.
    checkout_id: str = Field(primary_key=True, max_length=200)
    #: Shopify's ``updated_at`` of the newest state stored; None: only its order is known.
    updated_at: datetime | None = _ts(nullable=True)
    #: The order that completed the checkout; no later checkout webhook is stored.
    order_id: str | None = Field(default=None, max_length=200)
    seen_at: datetime = _ts()


# ---- Stream X: experiments and holdouts ----------------------------------------------------


class ExperimentPromotion(SQLModel, table=True):
    """An experiment's winner, promoted by ``KAERU_EXPERIMENT_AUTO_PROMOTE`` once significant
    (kaeru/experiments.py): journeys that enter later give every customer ``variant``.

    One per journey kind and experiment, so a later reader sees when it happened and why
    (``reason``: the numbers the verdict stood on).
    """

    __tablename__ = "experiment_promotions"
    __table_args__ = (
        UniqueConstraint("journey_kind", "experiment", name="uq_experiment_promotions"),
    )

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    journey_kind: str = Field(max_length=100)
    experiment: str = Field(max_length=100)
    variant: str = Field(max_length=100)
    promoted_at: datetime = _ts()
    reason: str = Field(max_length=2000)


# ---- analytics: dashboard and weekly report (D) ----


class StoredReport(SQLModel, table=True):
    """One report the schedule built and emailed (``workflows/report.py``), kept for the record.

    ``key`` is the idempotency key of the run (the schedule's action time): a retried or
    repeated run finds its row, reuses the report it stored and sends no second email.
    ``report`` is :class:`kaeru.analytics.model.Report` as JSON (``report_to_json``);
    it holds counts and money only, no personal data.
    """

    __tablename__ = "reports"

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    key: str = Field(sa_column=Column(String(400), unique=True, nullable=False))
    period_start: datetime = _ts()
    period_end: datetime = _ts()
    created_at: datetime = _ts()
    report: dict[str, Any] = _json()
    #: The email as rendered when the report was stored: a retry sends exactly this.
    subject: str = Field(sa_column=Column(Text, nullable=False))
    text: str = Field(sa_column=Column(Text, nullable=False))
    html: str = Field(sa_column=Column(Text, nullable=False))
    #: When the SMTP relay accepted the email to every operator (None: not yet).
    emailed_at: datetime | None = _ts(nullable=True)


# ---- Stream R: recommendations for the shop's pages -----------------------------------------


class Recommendation(SQLModel, table=True):
    """One precomputed "bought together" answer: ``recommended_id`` is shown next to
    ``product_id`` at ``rank`` (0 first). Written only by a refresh
    (:func:`kaeru.recommendations.refresh`), which replaces every row in one transaction."""

    __tablename__ = "recommendations"

    product_id: str = Field(primary_key=True, max_length=200)
    rank: int = Field(primary_key=True)
    recommended_id: str = Field(max_length=200)
    #: Orders holding both products (the support, as a count).
    together: int
    #: ``together`` over the orders holding ``product_id``.
    confidence: float


class BestSeller(SQLModel, table=True):
    """The shop's best-selling products at the last refresh, the fallback of every answer."""

    __tablename__ = "best_sellers"

    rank: int = Field(primary_key=True)
    product_id: str = Field(max_length=200)
    orders: int


class RecommendationRefresh(SQLModel, table=True):
    """The last refresh (one row, ``id`` 1): when, and what it read and wrote."""

    __tablename__ = "recommendation_refreshes"

    id: int = Field(default=1, primary_key=True)
    refreshed_at: datetime = _ts()
    orders: int
    pairs: int
    best_sellers: int


# ---- connectors: audiences out, batched; Google Customer Match (G) ----


class AudienceBatch(SQLModel, table=True):
    """One request (Meta) or offline user data job (Google) of queued audience changes.

    Claimed changes point at it before anything is sent, so a flush that crashed after
    sending and before marking sends the same batch again (adds and removals are set
    operations) and, for Google, finds the job it created (``job``) and does not run it twice.
    """

    __tablename__ = "audience_batches"

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    provider: str = Field(max_length=20)
    audience_id: str = Field(max_length=200)
    joining: bool
    #: Google: the offline user data job's resource name, once created.
    job: str | None = Field(default=None, max_length=400)
    created_at: datetime = _ts()
    done_at: datetime | None = _ts(nullable=True, index=True)
    error: str | None = None


class AudienceChangeRow(SQLModel, table=True):
    """One queued join or leave of one member of one provider's audience.

    ``key`` is the journey step's idempotency key and the provider (a retried step queues
    nothing twice). Pending until a flush puts it in a batch (``batch_id``) and then marks it
    ``applied_at`` with its ``outcome``: ``applied``, ``superseded`` (a later change of the same
    member in the same flush won) or ``rejected: ...``.
    """

    __tablename__ = "audience_changes"
    __table_args__ = (Index("ix_audience_changes_pending", "applied_at", "batch_id"),)

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    key: str = Field(sa_column=Column(String(440), unique=True, nullable=False))
    change_key: str = Field(max_length=400, index=True)
    journey_id: str = Field(max_length=400, index=True)
    step: str = Field(max_length=100)
    customer_id: str = Field(max_length=200)
    audience: str = Field(max_length=200)
    provider: str = Field(max_length=20)
    audience_id: str = Field(max_length=200)
    email_sha256: str = Field(max_length=64)
    joining: bool
    queued_at: datetime = _ts()
    batch_id: int | None = Field(default=None, index=True)
    applied_at: datetime | None = _ts(nullable=True)
    outcome: str | None = None
    #: The W3C ``traceparent`` of the journey step that queued the change (its activity's
    #: span), only while tracing is on: the flush's ``ad audience batch`` span links to it.
    #: Trace and span ids only, nothing personal.
    traceparent: str | None = Field(default=None, max_length=64)


# ---- operations: the audit log of operator actions -------------------------------------------


class AuditEntry(SQLModel, table=True):
    """One operator action: who did what to which target, and when (append-only).

    ``actor`` names the operator (``api:<account name>``, ``api:operator`` for
    ``KAERU_OPERATOR_TOKEN``, or ``cli:<os user>`` for the CLI on the deployment); ``target``
    is a journey id, a journey kind, a key's or account's name or ``*``. No personal data:
    customers appear only by id.
    """

    __tablename__ = "audit_log"

    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    )
    at: datetime = _ts(index=True)
    actor: str = Field(max_length=200, index=True)
    action: str = Field(max_length=100, index=True)
    target: str = Field(max_length=400)
    detail: dict[str, Any] = _json()


# ---- operations: the kill switch (stream H) --------------------------------------------------


class KillSwitch(SQLModel, table=True):
    """A kill switch that is on: journeys it covers wait before their next outside step.

    ``scope`` is ``*`` (every marketing journey; transactional ones too when
    ``include_transactional``) or one journey kind. Turning a switch off deletes its row; the
    audit log keeps who turned it on and off.
    """

    __tablename__ = "kill_switches"

    scope: str = Field(primary_key=True, max_length=100)
    include_transactional: bool = False
    reason: str = Field(default="", max_length=400)
    actor: str = Field(max_length=200)
    since: datetime = _ts()


# ---- operations: operator accounts and managed write keys (stream secure) ------------------


class OperatorAccount(SQLModel, table=True):
    """An operator account of the admin API and the dashboard (kaeru/credentials.py).

    ``role`` is ``read-only`` (reads only) or ``operator`` (reads and changes). Only the token's
    SHA-256 is kept; revoking sets ``revoked_at`` and keeps the row for the record (the name
    stays taken).
    """

    __tablename__ = "operators"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=20)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()
    created_by: str = Field(max_length=200)
    revoked_at: datetime | None = _ts(nullable=True)


class WriteKey(SQLModel, table=True):
    """A write key managed by ``kaeru keys``: ``server`` (trusted) or ``browser`` (public).

    Only the key's SHA-256 and its first characters (``prefix``, to tell keys apart) are kept.
    """

    __tablename__ = "write_keys"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    kind: str = Field(max_length=10)
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=20)
    created_at: datetime = _ts()
    created_by: str = Field(max_length=200)
    revoked_at: datetime | None = _ts(nullable=True)
