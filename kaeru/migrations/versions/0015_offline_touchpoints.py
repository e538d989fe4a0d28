"""touchpoints T (offline touchpoints, purchases): the history written before them, completed

Touches recorded before stream T said no journey kind and no channel, and stored orders,
redeemed coupons and ad clicks had no touchpoint at all: the analytics read only
``touchpoints``, so they would start the day of the upgrade. This fills them in from what was
stored, once (each row is skipped when its key is already there, so upgrading again after a
downgrade adds nothing):

- ``journey_kind`` of every touch of a journey: its id without ``-<customer id>`` (journey ids
  are ``<kind>-<customer id>``; a migration does not load the journey registry);
- ``channel`` by kind: ``email`` (email and coupon touches), ``ads`` (audiences), ``web``
  (conversions, refused coupons);
- a ``purchase`` for every stored order, a ``coupon_redeemed`` for every redeemed coupon
  (with the step of its ``coupon_issued``), an ``ad_clicked`` for every stored ``Ad Clicked``.

No schema change. The downgrade keeps the rows: the code before 0015 reads neither these kinds
nor these columns, and its touches are all still there.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 05:10:00.000000
"""

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Rows read and written per round trip.
PAGE = 5000
COUPON_CODE_MAX = 64

touchpoints = sa.table(
    "touchpoints",
    sa.column("id", sa.BigInteger),
    sa.column("key", sa.String),
    sa.column("customer_id", sa.String),
    sa.column("journey_id", sa.String),
    sa.column("journey_kind", sa.String),
    sa.column("step", sa.String),
    sa.column("variant", sa.String),
    sa.column("channel", sa.String),
    sa.column("kind", sa.String),
    sa.column("occurred_at", UTCDateTime()),
    sa.column("order_id", sa.String),
    sa.column("value_minor", sa.BigInteger),
    sa.column("currency", sa.String),
    sa.column("coupon_code", sa.String),
    sa.column("detail", sa.JSON),
)
orders = sa.table(
    "orders",
    sa.column("order_id", sa.String),
    sa.column("customer_id", sa.String),
    sa.column("total_minor", sa.BigInteger),
    sa.column("currency", sa.String),
    sa.column("coupon", sa.String),
    sa.column("completed_at", UTCDateTime()),
)
coupons = sa.table(
    "coupons",
    sa.column("code", sa.String),
    sa.column("idempotency_key", sa.String),
    sa.column("customer_id", sa.String),
    sa.column("journey_id", sa.String),
    sa.column("amount_minor", sa.BigInteger),
    sa.column("currency", sa.String),
    sa.column("redeemed_at", UTCDateTime()),
    sa.column("redeemed_order_id", sa.String),
)
events = sa.table(
    "events",
    sa.column("seq", sa.BigInteger),
    sa.column("message_id", sa.String),
    sa.column("customer_id", sa.String),
    sa.column("name", sa.String),
    sa.column("payload", sa.JSON),
    sa.column("timestamp", UTCDateTime()),
)

CHANNELS = {
    "email": (
        "email_sent",
        "email_bounced",
        "email_opened",
        "email_clicked",
        "coupon_issued",
    ),
    "ads": ("audience_joined", "audience_left"),
    "web": ("conversion", "coupon_refused"),
}


def upgrade() -> None:
    bind = op.get_bind()
    t = touchpoints.c
    for channel, kinds in CHANNELS.items():
        bind.execute(
            touchpoints.update()
            .where(t.channel.is_(None), t.kind.in_(kinds))
            .values(channel=channel)
        )
    # ``<kind>-<customer id>``: the id's end is ``-`` and the customer id.
    suffix = sa.func.length(t.customer_id) + 1
    bind.execute(
        touchpoints.update()
        .where(
            t.journey_kind.is_(None),
            t.journey_id.is_not(None),
            sa.func.length(t.journey_id) > suffix,
            sa.func.substr(t.journey_id, sa.func.length(t.journey_id) - suffix + 1)
            == sa.literal("-") + t.customer_id,
        )
        .values(journey_kind=sa.func.substr(t.journey_id, 1, sa.func.length(t.journey_id) - suffix))
    )
    _insert_new(bind, _purchases(bind))
    _insert_new(bind, _redemptions(bind))
    _insert_new(bind, _ad_clicks(bind))


def downgrade() -> None:
    """Nothing to undo in the schema; the rows filled in stay (see the module's doc)."""


def _insert_new(bind: sa.Connection, rows: Iterator[list[dict[str, Any]]]) -> None:
    """Insert each page's rows whose key is not in ``touchpoints`` yet."""
    for page in rows:
        keys = [row["key"] for row in page]
        there = set(
            bind.execute(sa.select(touchpoints.c.key).where(touchpoints.c.key.in_(keys))).scalars()
        )
        new = [row for row in page if row["key"] not in there]
        if new:
            bind.execute(touchpoints.insert(), new)


def _row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(c.name for c in touchpoints.c if c.name != "id")
    row.update(values)
    return row


def _purchases(bind: sa.Connection) -> Iterator[list[dict[str, Any]]]:
    last = ""
    while True:
        query = sa.select(orders).where(orders.c.order_id > last).order_by(orders.c.order_id)
        page = bind.execute(query.limit(PAGE)).all()
        if not page:
            return
        last = page[-1].order_id
        yield [
            _row(
                key=f"purchase/{o.order_id}",
                customer_id=o.customer_id,
                kind="purchase",
                channel="web",
                occurred_at=o.completed_at,
                order_id=o.order_id,
                value_minor=o.total_minor,
                currency=o.currency,
                coupon_code=o.coupon if o.coupon and len(o.coupon) <= COUPON_CODE_MAX else None,
                detail={"backfilled": True}
                | ({"coupon": o.coupon} if o.coupon and len(o.coupon) > COUPON_CODE_MAX else {}),
            )
            for o in page
        ]


def _redemptions(bind: sa.Connection) -> Iterator[list[dict[str, Any]]]:
    last = ""
    issued = touchpoints.alias("issued")
    while True:
        page = bind.execute(
            sa.select(coupons, issued.c.journey_kind, issued.c.step, issued.c.variant)
            .outerjoin(issued, issued.c.key == coupons.c.idempotency_key)
            .where(coupons.c.redeemed_order_id.is_not(None), coupons.c.code > last)
            .order_by(coupons.c.code)
            .limit(PAGE)
        ).all()
        if not page:
            return
        last = page[-1].code
        yield [
            _row(
                key=f"coupon_redeemed/{c.code}",
                customer_id=c.customer_id,
                journey_id=c.journey_id,
                journey_kind=c.journey_kind,
                step=c.step,
                variant=c.variant,
                channel="web",
                kind="coupon_redeemed",
                occurred_at=c.redeemed_at,
                order_id=c.redeemed_order_id,
                value_minor=c.amount_minor,
                currency=c.currency,
                coupon_code=c.code,
                detail={"backfilled": True},
            )
            for c in page
        ]


def _ad_clicks(bind: sa.Connection) -> Iterator[list[dict[str, Any]]]:
    last = 0
    while True:
        page = bind.execute(
            sa.select(events)
            .where(events.c.name == "Ad Clicked", events.c.seq > last)
            .order_by(events.c.seq)
            .limit(PAGE)
        ).all()
        if not page:
            return
        last = page[-1].seq
        yield [_ad_click(e) for e in page]


def _ad_click(e: Any) -> dict[str, Any]:
    payload = e.payload if isinstance(e.payload, dict) else {}
    properties = payload.get("properties")
    named = properties.get("journey_id") if isinstance(properties, dict) else None
    journey_id: str | None = None
    if isinstance(named, str) and named.endswith(f"-{e.customer_id}"):
        journey_id = named if len(named) > len(e.customer_id) + 1 else None
    context = payload.get("context")
    campaign = context.get("campaign") if isinstance(context, dict) else None
    name = campaign.get("name") if isinstance(campaign, dict) else None
    return _row(
        key=f"ad_clicked/{e.message_id}",
        customer_id=e.customer_id,
        journey_id=journey_id,
        journey_kind=journey_id[: -len(e.customer_id) - 1] if journey_id else None,
        channel="ads",
        kind="ad_clicked",
        occurred_at=e.timestamp,
        detail={"message_id": e.message_id, "backfilled": True}
        | ({"campaign": name[:200]} if isinstance(name, str) else {}),
    )
