"""The shopper's rights: export everything stored about a customer, and erase it.

``GET /v1/customers/{id}/export`` and ``DELETE /v1/customers/{id}`` (operator token), and
``kaeru customers export|erase``. A customer is their id and every anonymous id merged into it
(``identity_aliases``): the events and journeys from before they signed in are theirs too.

Erase, in this order:

1. ends their journeys: terminates ``<kind>-<id>`` of every journey kind under both ids a
   journey may show (the id itself and its pseudonym, kaeru/pseudonyms.py, whatever
   ``KAERU_PSEUDONYMOUS_IDS`` was when it started), and whatever running workflow the
   visibility store lists with either as ``KaeruCustomerId``; terminated, not cancelled, so no
   step of theirs runs again (a cancelled journey's clean-up could still send);
2. takes them out of every ad audience, here and now; a removal the platform refuses is
   parked for the audience sweeper (``audience_joins``), which retries it with backoff. Not a
   workflow of its own: an ``EraseCustomer`` history would hold the customer id in clear,
   which is what erase removes, and the sweeper already retries, backs off and shows what
   failed;
3. deletes their personal data in one transaction, keeping anonymous counts: profile, cart,
   consent state and aliases are deleted; events keep their type and times without payload;
   messages keep their status without address or subject; orders, coupons, touchpoints,
   consent history and journey entries keep their numbers under a keyed pseudonym
   (``anon-<HMAC>``) instead of the customer id;
4. crypto-shreds their data keys (kaeru/codec.py), the one of their id and the one of its
   pseudonym (the codec keys a journey's payloads by the id its workflow id shows): their
   payloads in Temporal histories no longer decrypt, anywhere, within the key cache's TTL;
5. ends again any journey the router started from their events while 1-4 ran.

Suppressions stay: an address that bounced or complained must not be emailed again, and the
suppression list is what guarantees it (the address is the one thing it holds).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy import delete, update
from sqlmodel import Session, col, or_, select
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.ads import AudienceActivities
from activities.types import AudienceChange, ParkRemoval
from kaeru.codec import KEY_CACHE_TTL, codec_for, shred
from kaeru.consent import CHANNELS, consent_of, set_consent
from kaeru.db import session as db_session
from kaeru.models import (
    AudienceChangeRow,
    AudienceJoin,
    AudienceMember,
    CartItem,
    Consent,
    ConsentChange,
    Coupon,
    Customer,
    CustomerRouting,
    EmailMessage,
    Event,
    IdentityAlias,
    JourneyEntry,
    Order,
    OrderLine,
    Suppression,
    Touchpoint,
    TrackingLink,
    utcnow,
)
from kaeru.pseudonyms import VisibleIds, pseudonym_key
from kaeru.search_attributes import CUSTOMER_ID
from kaeru.settings import Settings
from kaeru.temporal import connect, journey_kinds
from starter.deps import Admin, ApiError, SettingsDep, router_of

log = logging.getLogger("kaeru.privacy")

#: A touchpoint's details that hold no personal data (the rest is dropped by erase: an SMTP
#: answer may quote the address, a coupon's ``owner`` is a customer id).
SAFE_DETAIL = frozenset(
    {"template", "phase", "audience", "provider", "audience_id", "swept", "expires_at", "reason"}
    # An entry's journey version and experiment arms, and a message's experiment: the
    # experiment results still count an erased customer's arm (their id is a pseudonym then).
    | {"version", "arms", "experiment"}
)
ERASED_NOTE = "not routed: the customer was erased"


# ---- pseudonyms and whose data is whose ---------------------------------------------------------


def pseudonym(key: bytes, customer_id: str) -> str:
    """The keyed pseudonym of ``customer_id``: the same for the same id, and without the key
    no one can tell whose it is (or test a guessed email address against it)."""
    return "anon-" + hmac.new(key, customer_id.encode(), hashlib.sha256).hexdigest()[:32]


def ids_of(s: Session, customer_id: str) -> list[str]:
    """The customer id and every anonymous id merged into it."""
    aliases = s.exec(
        select(IdentityAlias.anonymous_id).where(IdentityAlias.customer_id == customer_id)
    ).all()
    return [customer_id, *sorted(set(aliases) - {customer_id})]


# ---- export -------------------------------------------------------------------------------------


def _dump(rows: Iterable[Any], *drop: str) -> list[dict[str, Any]]:
    return [row.model_dump(mode="json", exclude=set(drop)) for row in rows]


def export_customer(settings: Settings, customer_id: str) -> dict[str, Any] | None:
    """Everything stored about the customer, as JSON-ready data; None if nothing is. Blocking."""
    with db_session(settings.resolved_database_url) as s:
        ids = ids_of(s, customer_id)
        profile = s.get(Customer, customer_id)

        def of(model: Any, *order: Any) -> list[Any]:
            query = select(model).where(col(model.customer_id).in_(ids)).order_by(*order)
            return list(s.exec(query))

        events = of(Event, col(Event.seq))
        orders = of(Order, col(Order.completed_at))
        lines = list(
            s.exec(
                select(OrderLine).where(col(OrderLine.order_id).in_([o.order_id for o in orders]))
            )
        )
        emails = {e for e in [profile.email if profile else None] if e}
        emails |= {
            m.to_address for m in of(EmailMessage, col(EmailMessage.created_at)) if m.to_address
        }
        export = {
            "customer_id": customer_id,
            "exported_at": utcnow().isoformat(),
            "profile": profile.model_dump(mode="json") if profile else None,
            "aliases": _dump(
                s.exec(select(IdentityAlias).where(IdentityAlias.customer_id == customer_id))
            ),
            "consent": _dump(of(Consent, col(Consent.channel))),
            "consent_history": _dump(of(ConsentChange, col(ConsentChange.changed_at)), "id"),
            "events": _dump(events, "route_attempts", "route_error", "park_reason"),
            "messages": _dump(of(EmailMessage, col(EmailMessage.created_at)), "links"),
            "touchpoints": _dump(of(Touchpoint, col(Touchpoint.occurred_at)), "id"),
            "audiences": _dump(of(AudienceMember, col(AudienceMember.added_at))),
            "audience_history": _dump(of(AudienceJoin, col(AudienceJoin.joined_at))),
            "audience_changes": _dump(of(AudienceChangeRow, col(AudienceChangeRow.id)), "id"),
            "orders": [
                {
                    **order.model_dump(mode="json"),
                    "lines": _dump(
                        (line for line in lines if line.order_id == order.order_id), "order_id"
                    ),
                }
                for order in orders
            ],
            "coupons": _dump(of(Coupon, col(Coupon.created_at)), "idempotency_key"),
            "cart": _dump(of(CartItem, col(CartItem.position))),
            "journeys": _dump(of(JourneyEntry, col(JourneyEntry.started_at)), "key"),
            "suppressions": _dump(
                s.exec(select(Suppression).where(col(Suppression.email).in_(sorted(emails))))
            ),
        }
    stored = profile is not None or any(
        export[part] for part in ("events", "orders", "consent_history", "messages")
    )
    return export if stored else None


# ---- erase --------------------------------------------------------------------------------------


@dataclass
class EraseReport:
    """What an erase did (counts only: no personal data)."""

    ids: int = 0
    journeys_ended: int = 0
    audiences_left: int = 0
    #: Removals the ad platform refused now, parked for the audience sweeper.
    audiences_parked: int = 0
    keys_shredded: int = 0
    rows: dict[str, int] = field(default_factory=dict)

    def count(self, table: str, n: int) -> None:
        if n:
            self.rows[table] = self.rows.get(table, 0) + n


def _swapper(journey_ids: dict[str, str]) -> Callable[[str | None], str | None]:
    """Replace a journey id, or the ``<journey id>/...`` a key starts with, by its pseudonym."""

    def swap(value: str | None) -> str | None:
        if value is None:
            return None
        for old, new in journey_ids.items():
            if value == old:
                return new
            if value.startswith(old + "/"):
                return new + value[len(old) :]
        return value

    return swap


def _scrub_one(
    s: Session, customer_id: str, alias: str, kinds: list[str], report: EraseReport
) -> str | None:
    """Delete or pseudonymise every row of ``customer_id`` and shred their data key (in
    ``s``'s transaction); the key id shredded, if they had a key."""
    now = utcnow()
    mine = [
        (m, col(m.customer_id) == customer_id)
        for m in (EmailMessage, Touchpoint, Coupon, AudienceJoin)
    ]
    journey_ids = {f"{kind}-{customer_id}": f"{kind}-{alias}" for kind in kinds}
    for model, where in mine:
        for journey_id in s.exec(select(model.journey_id).where(where).distinct()):
            if journey_id and journey_id.endswith(f"-{customer_id}"):
                journey_ids.setdefault(journey_id, journey_id[: -len(customer_id)] + alias)
    swap = _swapper(journey_ids)

    # The consent history keeps, under the pseudonym, that the erase ended their consent.
    for channel in CHANNELS:
        if consent_of(s, customer_id, channel) is not None:
            set_consent(s, customer_id, channel, False, "erase", at=now)
    s.flush()
    for table in (Customer, CartItem, Consent, CustomerRouting):
        gone = s.execute(delete(table).where(col(table.customer_id) == customer_id))
        report.count(str(table.__tablename__), gone.rowcount)  # type: ignore[attr-defined]
    gone = s.execute(
        delete(IdentityAlias).where(
            or_(IdentityAlias.customer_id == customer_id, IdentityAlias.anonymous_id == customer_id)
        )
    )
    report.count("identity_aliases", gone.rowcount)  # type: ignore[attr-defined]

    # Events: the type and the times stay (counts), never routed again.
    base = update(Event).where(col(Event.customer_id) == customer_id)
    s.execute(
        base.where(col(Event.routed_at).is_(None)).values(routed_at=now, route_note=ERASED_NOTE)
    )
    changed = s.execute(
        base.values(customer_id=alias, payload={}, route_error=None, park_reason=None)
    )
    report.count("events", changed.rowcount)  # type: ignore[attr-defined]

    changed = s.execute(
        update(Order).where(col(Order.customer_id) == customer_id).values(customer_id=alias)
    )
    report.count("orders", changed.rowcount)  # type: ignore[attr-defined]
    changed = s.execute(
        update(ConsentChange)
        .where(col(ConsentChange.customer_id) == customer_id)
        .values(customer_id=alias, detail=None)
    )
    report.count("consent_changes", changed.rowcount)  # type: ignore[attr-defined]

    messages = s.exec(
        select(EmailMessage.key, EmailMessage.journey_id).where(
            EmailMessage.customer_id == customer_id
        )
    ).all()
    for key, journey_id in messages:
        new_key = swap(key) or key
        s.execute(
            update(TrackingLink)
            .where(col(TrackingLink.message_key) == key)
            .values(message_key=new_key)
        )
        s.execute(
            update(EmailMessage)
            .where(col(EmailMessage.key) == key)
            .values(
                key=new_key,
                customer_id=alias,
                journey_id=swap(journey_id) or journey_id,
                to_address="",
                subject="",
                error=None,
            )
        )
        report.count("email_messages", 1)

    for point in s.exec(select(Touchpoint).where(Touchpoint.customer_id == customer_id)):
        detail = {k: v for k, v in point.detail.items() if k in SAFE_DETAIL}
        if isinstance(point.detail.get("message_key"), str):
            detail["message_key"] = swap(point.detail["message_key"])
        point.customer_id, point.detail = alias, detail
        point.journey_id, point.key = swap(point.journey_id), swap(point.key)
        if point.order_key is not None:
            kind, _, rest = point.order_key.partition("/")
            if rest.startswith(f"{customer_id}/"):
                point.order_key = f"{kind}/{alias}/{rest[len(customer_id) + 1 :]}"
        s.add(point)
        report.count("touchpoints", 1)

    for coupon in s.exec(select(Coupon).where(Coupon.customer_id == customer_id)):
        coupon.customer_id = alias
        coupon.journey_id = swap(coupon.journey_id) or coupon.journey_id
        coupon.idempotency_key = swap(coupon.idempotency_key) or coupon.idempotency_key
        s.add(coupon)
        report.count("coupons", 1)

    gone = s.execute(delete(AudienceMember).where(col(AudienceMember.customer_id) == customer_id))
    report.count("audience_members", gone.rowcount)  # type: ignore[attr-defined]
    joins = s.exec(
        select(AudienceJoin.key, AudienceJoin.journey_id, AudienceJoin.left_at).where(
            AudienceJoin.customer_id == customer_id
        )
    ).all()
    for key, journey_id, left_at in joins:
        values: dict[str, Any] = {
            "key": swap(key) or key,
            "customer_id": alias,
            "journey_id": swap(journey_id) or journey_id,
        }
        if left_at is not None:  # a parked one keeps the hash the sweeper removes it by
            values["email_sha256"] = ""
        s.execute(update(AudienceJoin).where(col(AudienceJoin.key) == key).values(**values))
        report.count("audience_joins", 1)

    queued = select(AudienceChangeRow).where(AudienceChangeRow.customer_id == customer_id)
    for row in list(s.exec(queued)):
        if row.applied_at is not None:
            s.delete(row)  # a done change is only a log line
        else:  # still queued: the flush needs its hash to apply it (a leave, above all)
            row.customer_id = alias
            row.key = swap(row.key) or row.key
            row.change_key = swap(row.change_key) or row.change_key
            row.journey_id = swap(row.journey_id) or row.journey_id
            s.add(row)
        report.count("audience_changes", 1)

    entries = s.exec(select(JourneyEntry.key).where(JourneyEntry.customer_id == customer_id)).all()
    for key in entries:
        s.execute(
            update(JourneyEntry)
            .where(col(JourneyEntry.key) == key)
            .values(key=swap(key) or key, customer_id=alias)
        )
        report.count("journey_entries", 1)

    key_id = shred(s, customer_id)
    if key_id is not None:
        report.keys_shredded += 1
    return key_id


def scrub(
    settings: Settings, ids: list[str], kinds: list[str], report: EraseReport
) -> dict[str, str | None]:
    """Delete or pseudonymise the rows of every id in ``ids`` and shred their data keys, in one
    transaction: the key of each id and of each id's visible pseudonym (its journeys'
    payloads). Returns the key id shredded per id the codec knew (None: it had no key).
    Blocking."""
    with db_session(settings.resolved_database_url) as s:
        key = pseudonym_key(s)
        shredded = {i: _scrub_one(s, i, pseudonym(key, i), kinds, report) for i in ids}
        for i in ids:
            for shown in VisibleIds(key).every_id(i)[1:]:
                shredded[shown] = shred(s, shown)
                if shredded[shown] is not None:
                    report.keys_shredded += 1
        return shredded


def _ids_and_key(settings: Settings, customer_id: str) -> tuple[list[str], bytes]:
    with db_session(settings.resolved_database_url) as s:
        return ids_of(s, customer_id), pseudonym_key(s)


def _quotable(value: str) -> bool:
    """Whether ``value`` can go into a visibility query between double quotes."""
    return '"' not in value and "\\" not in value


async def workflows_of(
    client: Client, ids: list[str], kinds: list[str], visible: VisibleIds
) -> list[dict[str, Any]]:
    """Every journey workflow Temporal keeps of ``ids`` (its latest run), under the clear id
    and the pseudonym alike: ``workflow_id``, ``status``, ``started_at``, ``closed_at``.

    The known ids (``<kind>-<id>``, ``<kind>-<pseudonym>``) are described; the visibility
    store adds any other workflow with either as ``KaeruCustomerId`` where it can list.

    Raises:
        RPCError: Temporal refused a description for another reason than not knowing it.
    """
    shown = [each for customer_id in ids for each in visible.every_id(customer_id)]
    targets = {f"{kind}-{each}" for kind in kinds for each in shown}
    for each in filter(_quotable, shown):
        try:
            async for execution in client.list_workflows(f'{CUSTOMER_ID.name} = "{each}"'):
                targets.add(execution.id)
        except RPCError as exc:
            log.info("cannot list workflows by customer (%s); describing the known ids", exc.status)

    async def describe(workflow_id: str) -> dict[str, Any] | None:
        try:
            found = await client.get_workflow_handle(workflow_id).describe()
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return None
        return {
            "workflow_id": workflow_id,
            "status": found.status.name if found.status is not None else "UNKNOWN",
            "started_at": found.start_time.isoformat(),
            "closed_at": found.close_time.isoformat() if found.close_time else None,
        }

    described = await asyncio.gather(*(describe(w) for w in sorted(targets)))
    return [d for d in described if d is not None]


async def workflows_part(request: Request, settings: Settings, customer_id: str) -> Any:
    """The customer's journeys in Temporal for an API answer, or a note saying why not."""
    client = router_of(request).client
    try:
        if client is None:
            client = await connect(settings)
        ids, key = await asyncio.to_thread(_ids_and_key, settings, customer_id)
        return await workflows_of(
            client, ids, journey_kinds(settings), VisibleIds(key, settings.pseudonymous_ids)
        )
    except (RuntimeError, RPCError) as exc:
        return {
            "unavailable": f"Temporal could not be asked for the customer's journeys ({exc}): "
            "make sure it is reachable (KAERU_TEMPORAL_ADDRESS) and ask again"
        }


async def end_journeys(
    client: Client, ids: list[str], kinds: list[str], visible: VisibleIds
) -> int:
    """Terminate every running journey of ``ids``; how many were running.

    The journeys' ids are known (``<kind>-<id>`` and ``<kind>-<pseudonym>`` of each id:
    ``visible``); the visibility store adds any other running workflow with either as its
    ``KaeruCustomerId`` (a kind no longer deployed). It is eventually consistent and the
    time-skipping test server cannot list, so it only adds.

    Raises:
        RPCError: Temporal refused a termination (nothing of the customer's data is deleted
            before this step, so the erase can simply be run again).
    """
    shown = [each for customer_id in ids for each in visible.every_id(customer_id)]
    targets = {f"{kind}-{each}" for kind in kinds for each in shown}
    for customer_id in shown:
        if not _quotable(customer_id):
            continue  # not safely quotable in a visibility query; the known ids still apply
        query = f'{CUSTOMER_ID.name} = "{customer_id}" AND ExecutionStatus = "Running"'
        try:
            async for execution in client.list_workflows(query):
                targets.add(execution.id)
        except RPCError as exc:
            log.info("cannot list workflows by customer (%s); ending the known ids", exc.status)
    ended = 0
    for workflow_id in sorted(targets):
        try:
            await client.get_workflow_handle(workflow_id).terminate(
                reason="the customer was erased (kaeru customers erase)"
            )
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:  # not running: nothing to end
                raise
            continue
        ended += 1
    return ended


def _open_joins(settings: Settings, ids: list[str]) -> list[AudienceJoin]:
    with db_session(settings.resolved_database_url) as s:
        return list(
            s.exec(
                select(AudienceJoin)
                .where(col(AudienceJoin.customer_id).in_(ids))
                .where(col(AudienceJoin.left_at).is_(None))
            )
        )


def _local_memberships(settings: Settings, ids: list[str]) -> int:
    with db_session(settings.resolved_database_url) as s:
        gone = s.execute(delete(AudienceMember).where(col(AudienceMember.customer_id).in_(ids)))
        return int(gone.rowcount)  # type: ignore[attr-defined]


async def leave_audiences(settings: Settings, ids: list[str], report: EraseReport) -> None:
    """Take ``ids`` out of every audience a journey put them in; park what the platform
    refuses now for the audience sweeper (it retries with backoff)."""
    joins = await asyncio.to_thread(_open_joins, settings, ids)
    async with httpx.AsyncClient(timeout=30.0) as http:
        ads = AudienceActivities(settings, http)
        for join in joins:
            change = AudienceChange(
                key=f"{join.key}/erase",
                journey_id=join.journey_id,
                step="erase",
                customer_id=join.customer_id,
                audience=join.audience,
                joined_key=join.key,
            )
            try:
                await ads.remove_from_audience(change)
            except ApplicationError as err:
                await ads.park_audience_removal(ParkRemoval(change, f"erase: {err.message}"))
                report.audiences_parked += 1
                continue
            report.audiences_left += 1
    # Members of the local store from before adds were kept (no join to undo).
    report.audiences_left += await asyncio.to_thread(_local_memberships, settings, ids)


async def erase_customer(settings: Settings, client: Client, customer_id: str) -> EraseReport:
    """Erase the customer (see the module's docstring for what and in which order).

    Idempotent: running it again finishes what a failed run left (a journey still running,
    a removal that failed).

    Raises:
        RPCError: Temporal refused to end a journey (before anything was deleted).
    """
    kinds = journey_kinds(settings)
    ids, key = await asyncio.to_thread(_ids_and_key, settings, customer_id)
    visible = VisibleIds(key, settings.pseudonymous_ids)
    report = EraseReport(ids=len(ids))
    report.journeys_ended = await end_journeys(client, ids, kinds, visible)
    await leave_audiences(settings, ids, report)
    shredded = await asyncio.to_thread(scrub, settings, ids, kinds, report)
    codec = codec_for(settings, kinds)
    if codec is not None:  # this process stops using the keys at once, others within the TTL
        for customer, key_id in shredded.items():
            codec.keys.forget(customer, key_id)
    # The router may have started a journey from their events while the steps above ran.
    try:
        report.journeys_ended += await end_journeys(client, ids, kinds, visible)
    except RPCError as exc:
        log.warning(
            "an erase could not end a journey started while it ran (%s): erase the same "
            "customer again to end it; their data is already deleted",
            exc.status,
        )
    return report


# ---- the API ------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Admin])

CustomerIdPath = Annotated[str, Path(description="the customer's id (userId or anonymousId)")]


class EraseReportPublic(BaseModel):
    """What an erase did: counts only."""

    ids: int
    journeys_ended: int
    audiences_left: int
    audiences_parked: int
    keys_shredded: int
    rows: dict[str, int]
    key_cache_ttl_seconds: float


def report_public(report: EraseReport) -> EraseReportPublic:
    return EraseReportPublic(
        ids=report.ids,
        journeys_ended=report.journeys_ended,
        audiences_left=report.audiences_left,
        audiences_parked=report.audiences_parked,
        keys_shredded=report.keys_shredded,
        rows=report.rows,
        key_cache_ttl_seconds=KEY_CACHE_TTL,
    )


@router.get("/customers/{customer_id:path}/export", response_model=dict[str, Any])
async def export(
    customer_id: CustomerIdPath, request: Request, settings: SettingsDep
) -> dict[str, Any]:
    """Everything stored about the customer (and the anonymous ids merged into them): profile,
    consent and its history, events, messages, touchpoints, audiences, orders, coupons, cart,
    and their journeys' workflows in Temporal (``workflows``, under their clear and their
    pseudonymous ids)."""
    found = await run_in_threadpool(export_customer, settings, customer_id)
    if found is None:
        raise ApiError(404, "not_found", f"nothing is stored about customer {customer_id!r}")
    found["workflows"] = await workflows_part(request, settings, customer_id)
    return found


@router.delete("/customers/{customer_id:path}", response_model=EraseReportPublic)
async def erase(
    customer_id: CustomerIdPath, request: Request, settings: SettingsDep
) -> EraseReportPublic:
    """Erase the customer: end their journeys, take them out of every ad audience, delete
    their personal data (anonymous counts stay) and shred their payload key. Idempotent."""
    client = router_of(request).client
    try:
        if client is None:
            client = await connect(settings)
        report = await erase_customer(settings, client, customer_id)
    except (RuntimeError, RPCError) as exc:
        raise ApiError(
            503,
            "temporal_unavailable",
            f"could not end the customer's journeys ({exc}); nothing was deleted: make sure "
            "Temporal is reachable (KAERU_TEMPORAL_ADDRESS) and send the DELETE again",
        ) from exc
    return report_public(report)
