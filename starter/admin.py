"""The operator API: audiences, customers, the outbox, parked events, the audit log.

Any operator token reads (``Reader``); a change needs the role operator (``Operator``): the
router's ``Admin`` dependency decides by method, so a new POST route is safe by default.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import col, select

from kaeru import audit
from kaeru.db import session as db_session
from kaeru.models import AudienceMember, Customer, Order, Touchpoint
from kaeru.settings import Settings
from starter.deps import Admin, ApiError, Operator, Reader, SettingsDep, api_actor, router_of
from starter.parking import drop_parked, parked_events, retry_parked
from starter.privacy import workflows_part
from starter.router import outbox_stats

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Admin])


class AudienceMemberPublic(BaseModel):
    customer_id: str
    added_at: datetime
    journey_id: str


class AudiencePublic(BaseModel):
    audience: str
    count: int
    members: list[AudienceMemberPublic]


class TouchpointPublic(BaseModel):
    kind: str
    occurred_at: datetime
    journey_id: str | None
    step: str | None
    order_id: str | None
    value_minor: int | None
    currency: str | None
    coupon_code: str | None
    detail: dict[str, Any]


class OrderPublic(BaseModel):
    order_id: str
    total_minor: int
    currency: str
    coupon: str | None
    completed_at: datetime


class CustomerPublic(BaseModel):
    customer_id: str
    email: str | None
    traits: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    orders: list[OrderPublic]
    touchpoints: list[TouchpointPublic]
    #: Their journeys in Temporal under the clear and the pseudonymous id (kaeru/pseudonyms.py),
    #: or ``{"unavailable": why}`` when Temporal cannot be asked.
    workflows: list[dict[str, Any]] | dict[str, str] = Field(default_factory=list)


class OutboxPublic(BaseModel):
    unrouted: int
    oldest_unrouted_age_seconds: float | None
    failing: int
    oldest_failure: dict[str, Any] | None
    last_error: str | None
    router: str
    holds_lease: bool
    routed_total: int
    parked: int
    oldest_parked_age_seconds: float | None


class ParkedEventPublic(BaseModel):
    seq: int
    customer_id: str
    event: str
    message_id: str
    attempts: int
    reason: str | None
    parked_at: datetime


class ParkedPublic(BaseModel):
    count: int
    parked: list[ParkedEventPublic]


class ParkedActionPublic(BaseModel):
    seq: int
    status: str


def _audience(settings: Settings, audience: str, limit: int) -> AudiencePublic:
    with db_session(settings.resolved_database_url) as s:
        rows = s.exec(
            select(AudienceMember)
            .where(AudienceMember.audience == audience)
            .order_by(col(AudienceMember.added_at), col(AudienceMember.customer_id))
            .limit(limit)
        ).all()
    members = [
        AudienceMemberPublic(
            customer_id=r.customer_id, added_at=r.added_at, journey_id=r.journey_id
        )
        for r in rows
    ]
    return AudiencePublic(audience=audience, count=len(members), members=members)


def _customer(settings: Settings, customer_id: str, recent: int) -> CustomerPublic | None:
    with db_session(settings.resolved_database_url) as s:
        customer = s.get(Customer, customer_id)
        if customer is None:
            return None
        orders = s.exec(
            select(Order)
            .where(Order.customer_id == customer_id)
            .order_by(col(Order.completed_at).desc())
            .limit(recent)
        ).all()
        touchpoints = s.exec(
            select(Touchpoint)
            .where(Touchpoint.customer_id == customer_id)
            .order_by(col(Touchpoint.occurred_at).desc(), col(Touchpoint.id).desc())
            .limit(recent)
        ).all()
    return CustomerPublic(
        customer_id=customer.customer_id,
        email=customer.email,
        traits=customer.traits,
        created_at=customer.created_at,
        updated_at=customer.updated_at,
        orders=[OrderPublic.model_validate(o, from_attributes=True) for o in orders],
        touchpoints=[TouchpointPublic.model_validate(t, from_attributes=True) for t in touchpoints],
    )


@router.get("/audiences/{audience}", response_model=AudiencePublic, dependencies=[Reader])
async def audience_members(
    audience: str, settings: SettingsDep, limit: int = Query(1000, ge=1, le=10000)
) -> AudiencePublic:
    """Members of one audience of the local audience store, oldest first."""
    return await run_in_threadpool(_audience, settings, audience, limit)


@router.get("/customers/{customer_id:path}", response_model=CustomerPublic, dependencies=[Reader])
async def customer_profile(
    customer_id: str,
    request: Request,
    settings: SettingsDep,
    recent: int = Query(50, ge=1, le=500),
) -> CustomerPublic:
    """A customer's profile, newest orders and newest touchpoints, and their journeys'
    workflows in Temporal (under their clear and their pseudonymous ids)."""
    found = await run_in_threadpool(_customer, settings, customer_id, recent)
    if found is None:
        raise ApiError(404, "not_found", f"no customer {customer_id!r} has sent an event")
    found.workflows = await workflows_part(request, settings, customer_id)
    return found


@router.get("/admin/outbox", response_model=OutboxPublic, dependencies=[Reader])
async def outbox(request: Request, settings: SettingsDep) -> OutboxPublic:
    """Whether routing keeps up: unrouted events, the oldest one's age, the routing errors."""
    stats = await run_in_threadpool(outbox_stats, settings)
    event_router = router_of(request)
    return OutboxPublic(
        unrouted=stats.unrouted,
        oldest_unrouted_age_seconds=stats.oldest_unrouted_age_seconds,
        failing=stats.failing,
        oldest_failure=stats.oldest_failure,
        last_error=event_router.last_error,
        router=event_router.holder,
        holds_lease=event_router.running and event_router.holds_lease,
        routed_total=event_router.routed_total,
        parked=stats.parked,
        oldest_parked_age_seconds=stats.oldest_parked_age_seconds,
    )


@router.get("/admin/parked", response_model=ParkedPublic, dependencies=[Reader])
async def parked(settings: SettingsDep, limit: int = Query(1000, ge=1, le=10000)) -> ParkedPublic:
    """Events the router gave up on, oldest first: retry or drop each one."""
    total, rows = await run_in_threadpool(parked_events, settings.resolved_database_url, limit)
    return ParkedPublic(
        count=total,
        parked=[ParkedEventPublic.model_validate(r, from_attributes=True) for r in rows],
    )


def _no_parked_event(seq: int) -> ApiError:
    return ApiError(
        404,
        "not_parked",
        f"no parked event has seq {seq} (unknown, already routed or dropped): "
        "list the parked events with GET /v1/admin/parked",
    )


@router.post(
    "/admin/parked/{seq}/retry", response_model=ParkedActionPublic, dependencies=[Operator]
)
async def retry(seq: int, request: Request, settings: SettingsDep) -> ParkedActionPublic:
    """Send a parked event back into routing, its attempts reset."""
    if await run_in_threadpool(retry_parked, settings.resolved_database_url, [seq]):
        raise _no_parked_event(seq)
    await run_in_threadpool(
        audit.record, settings.resolved_database_url, api_actor(request), "parked.retry", str(seq)
    )
    router_of(request).wake()
    return ParkedActionPublic(seq=seq, status="retrying")


@router.post("/admin/parked/{seq}/drop", response_model=ParkedActionPublic, dependencies=[Operator])
async def drop(seq: int, request: Request, settings: SettingsDep) -> ParkedActionPublic:
    """Drop a parked event: it is never routed, and kept for the record."""
    if await run_in_threadpool(drop_parked, settings.resolved_database_url, [seq]):
        raise _no_parked_event(seq)
    await run_in_threadpool(
        audit.record, settings.resolved_database_url, api_actor(request), "parked.drop", str(seq)
    )
    return ParkedActionPublic(seq=seq, status="dropped")


class AuditEntryPublic(BaseModel):
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditPublic(BaseModel):
    count: int
    entries: list[AuditEntryPublic]


@router.get("/admin/audit", response_model=AuditPublic, dependencies=[Reader])
async def audit_log(
    settings: SettingsDep,
    since: datetime | None = None,
    action: str | None = Query(None, max_length=100),
    actor: str | None = Query(None, max_length=200),
    limit: int = Query(100, ge=1, le=1000),
) -> AuditPublic:
    """Operator actions, newest first: who (``cli:<user>``, ``api:<operator>``) did what to
    which target. ``action`` is one action (``write_key.revoke``) or a prefix ending in a dot
    (``write_key.``)."""
    if since is not None and since.utcoffset() is None:
        raise ApiError(
            400,
            "invalid_since",
            "since needs a time zone, e.g. 2026-12-02T14:00:00Z",
        )
    found = await run_in_threadpool(
        lambda: audit.entries(
            settings.resolved_database_url, since=since, action=action, actor=actor, limit=limit
        )
    )
    return AuditPublic(
        count=len(found),
        entries=[AuditEntryPublic.model_validate(e, from_attributes=True) for e in found],
    )
