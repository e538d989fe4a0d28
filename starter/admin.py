"""A small read API for operators (operator-token auth): audiences, customers, the outbox."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlmodel import col, select

from kaeru.db import session as db_session
from kaeru.models import AudienceMember, Customer, Order, Touchpoint
from kaeru.settings import Settings
from starter.deps import ApiError, Operator, SettingsDep, router_of
from starter.router import outbox_stats

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Operator])


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


class OutboxPublic(BaseModel):
    unrouted: int
    oldest_unrouted_age_seconds: float | None
    failing: int
    oldest_failure: dict[str, Any] | None
    last_error: str | None
    router: str
    holds_lease: bool
    routed_total: int


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


@router.get("/audiences/{audience}", response_model=AudiencePublic)
async def audience_members(
    audience: str, settings: SettingsDep, limit: int = Query(1000, ge=1, le=10000)
) -> AudiencePublic:
    """Members of one audience of the local audience store, oldest first."""
    return await run_in_threadpool(_audience, settings, audience, limit)


@router.get("/customers/{customer_id:path}", response_model=CustomerPublic)
async def customer_profile(
    customer_id: str, settings: SettingsDep, recent: int = Query(50, ge=1, le=500)
) -> CustomerPublic:
    """A customer's profile, newest orders and newest touchpoints."""
    found = await run_in_threadpool(_customer, settings, customer_id, recent)
    if found is None:
        raise ApiError(404, "not_found", f"no customer {customer_id!r} has sent an event")
    return found


@router.get("/admin/outbox", response_model=OutboxPublic)
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
    )
