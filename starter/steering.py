"""The operator API for steering (operator-token auth): the kill switch, and pause, resume or
cancel of one journey, so that ``kaeru`` with ``KAERU_API_URL`` steers a remote deployment
without database or Temporal credentials. The logic is kaeru/steering.py's, shared with the
local CLI; every change is audited with the operator's actor (``api:<name>``,
:data:`API_ACTOR` for KAERU_OPERATOR_TOKEN).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client
from temporalio.service import RPCError

from kaeru import steering
from kaeru.kill_switch import switches
from kaeru.models import KillSwitch
from kaeru.settings import Settings
from kaeru.steering import SteeringError
from kaeru.temporal import connect
from starter.deps import Admin, ApiError, SettingsDep, api_actor, router_of

#: Reads (the switches' status) need any operator token, changes the role operator.
router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Admin])

#: Who the audit log says acted through this API with KAERU_OPERATOR_TOKEN; an account of
#: ``kaeru operators`` acts as ``api:<its name>`` (:func:`starter.deps.api_actor`).
API_ACTOR = "api:operator"
T = TypeVar("T")


class KillSwitchOn(BaseModel):
    kind: str | None = Field(None, description="one journey kind; without it, the global switch")
    all: bool = Field(
        False, description="the global switch holds transactional journeys (receipts) too"
    )
    reason: str = Field("", max_length=400, description="why, for the story and the status")


class KillSwitchOff(BaseModel):
    kind: str | None = Field(None, description="one journey kind; without it, the global switch")


class SwitchPublic(BaseModel):
    scope: str = Field(description="`*` for the global switch, else a journey kind")
    covers: str
    include_transactional: bool
    since: datetime
    by: str
    reason: str
    #: Journeys it holds now (from visibility, a moment behind); None: Temporal not asked.
    held: int | None = None


class SwitchChangePublic(BaseModel):
    switch: SwitchPublic
    #: False when it already was on (left as it was).
    changed: bool
    #: How long workers keep what they read of the switches (KAERU_KILL_SWITCH_CACHE).
    workers_see_it_within_seconds: float


class SwitchOffPublic(BaseModel):
    switch: SwitchPublic
    released: int
    failed: int
    #: Set when the held journeys could not be released (they try again on their own).
    release_problem: str | None = None


class KillSwitchStatus(BaseModel):
    on: list[SwitchPublic]
    #: Journeys paused by an operator; None when Temporal could not be asked.
    paused: int | None
    temporal_problem: str | None = None


class Reason(BaseModel):
    reason: str = Field("", max_length=400, description="why, for the story and the audit log")


class JourneyChangePublic(BaseModel):
    journey_id: str
    action: str
    #: pause: False when it already was paused. cancel: False when it did not end within
    #: the wait (it ends as soon as a worker takes it).
    changed: bool
    #: resume: what held it (``paused`` or ``kill-switch``).
    was: str | None = None
    #: resume: the switch that still covers it (it is held again at its next outside step).
    still_held_by: str | None = None


def _public(switch: KillSwitch, held: int | None = None) -> SwitchPublic:
    return SwitchPublic(
        scope=switch.scope,
        covers=steering.covers(switch),
        include_transactional=switch.include_transactional,
        since=switch.since,
        by=switch.actor,
        reason=switch.reason,
        held=held,
    )


def _refused(err: SteeringError) -> ApiError:
    return ApiError(steering.STATUS_OF.get(err.code, 400), err.code, err.message)


async def _client(request: Request, settings: Settings) -> Client:
    client = router_of(request).client
    if client is not None:
        return client
    try:
        return await connect(settings)
    except RuntimeError as exc:
        raise ApiError(503, "temporal_unavailable", str(exc)) from exc


async def _steer(action: Callable[[], Awaitable[T]]) -> T:
    try:
        return await action()
    except SteeringError as err:
        raise _refused(err) from err
    except RPCError as err:
        raise ApiError(
            502, "temporal_refused", f"Temporal refused: {err.message}; try again"
        ) from err


async def _steer_journey(
    request: Request,
    settings: Settings,
    action: Callable[..., Awaitable[T]],
    workflow_id: str,
    body: Reason | None,
) -> T:
    """``steering.pause``, ``resume`` or ``cancel`` of one journey, as this request's operator."""
    client = await _client(request, settings)
    return await _steer(
        lambda: action(
            client,
            settings,
            steering.journeys_of(settings),
            workflow_id,
            reason=(body or Reason()).reason,
            actor=api_actor(request),
        )
    )


@router.get("/admin/kill-switch", response_model=KillSwitchStatus)
async def kill_switch_status(request: Request, settings: SettingsDep) -> KillSwitchStatus:
    """The switches that are on (global first), how many journeys each holds, and how many
    journeys an operator paused."""
    try:
        on = await run_in_threadpool(switches, settings.resolved_database_url)
    except SQLAlchemyError as exc:
        raise ApiError(
            503,
            "unavailable",
            "cannot read the kill switches from the database (KAERU_DATABASE_URL); try again",
        ) from exc
    journeys = steering.journeys_of(settings)
    try:
        client = await _client(request, settings)
        counts, paused = await steering.held_counts(client, journeys, on)
        problem = None
        if await steering.held_attribute_missing(client, settings.temporal_namespace):
            problem = " ".join(steering.NO_HELD_ATTRIBUTE)
    except (ApiError, RPCError) as exc:
        counts, paused = {}, None
        problem = f"held journeys not counted: Temporal could not be asked ({exc})"
    return KillSwitchStatus(
        on=[_public(s, counts.get(s.scope)) for s in on], paused=paused, temporal_problem=problem
    )


@router.post("/admin/kill-switch/on", response_model=SwitchChangePublic)
async def kill_switch_on(
    request: Request, settings: SettingsDep, body: KillSwitchOn | None = None
) -> SwitchChangePublic:
    """Turn a kill switch on: the journeys it covers wait before their next outside step."""
    body = body or KillSwitchOn()
    journeys = steering.journeys_of(settings)
    try:
        switch, changed = await run_in_threadpool(
            lambda: steering.switch_on(
                settings.resolved_database_url,
                journeys,
                body.kind,
                actor=api_actor(request),
                reason=body.reason,
                include_transactional=body.all,
            )
        )
    except SteeringError as err:
        raise _refused(err) from err
    return SwitchChangePublic(
        switch=_public(switch),
        changed=changed,
        workers_see_it_within_seconds=settings.kill_switch_cache.total_seconds(),
    )


@router.post("/admin/kill-switch/off", response_model=SwitchOffPublic)
async def kill_switch_off(
    request: Request, settings: SettingsDep, body: KillSwitchOff | None = None
) -> SwitchOffPublic:
    """Turn a kill switch off and release the journeys it held: each sends what it held, once.

    The switch is off even when the release fails (``release_problem``): the held journeys
    then try again on their own.
    """
    body = body or KillSwitchOff()
    journeys = steering.journeys_of(settings)
    try:
        switch, still_on = await run_in_threadpool(
            lambda: steering.switch_off(
                settings.resolved_database_url, journeys, body.kind, actor=api_actor(request)
            )
        )
    except SteeringError as err:
        raise _refused(err) from err
    scope = switch.scope
    try:
        client = await _client(request, settings)
        ids = await steering.held_by(client, journeys, scope, still_on)
        released, failed = await steering.release(client, ids, api_actor(request))
    except (ApiError, RPCError) as exc:
        problem = exc.message
        return SwitchOffPublic(
            switch=_public(switch), released=0, failed=0, release_problem=problem
        )
    return SwitchOffPublic(switch=_public(switch), released=released, failed=failed)


@router.post("/admin/journeys/{workflow_id:path}/pause", response_model=JourneyChangePublic)
async def pause(
    workflow_id: str, request: Request, settings: SettingsDep, body: Reason | None = None
) -> JourneyChangePublic:
    """Pause one journey before its next outside step, until a resume."""
    changed = await _steer_journey(request, settings, steering.pause, workflow_id, body)
    return JourneyChangePublic(journey_id=workflow_id, action="pause", changed=changed)


@router.post("/admin/journeys/{workflow_id:path}/resume", response_model=JourneyChangePublic)
async def resume(
    workflow_id: str, request: Request, settings: SettingsDep, body: Reason | None = None
) -> JourneyChangePublic:
    """Resume a paused or held journey: what it held goes out once (an email through the
    send gate again)."""
    resumed = await _steer_journey(request, settings, steering.resume, workflow_id, body)
    return JourneyChangePublic(
        journey_id=workflow_id,
        action="resume",
        changed=True,
        was=resumed.was,
        still_held_by=resumed.still_held_by.scope if resumed.still_held_by else None,
    )


@router.post("/admin/journeys/{workflow_id:path}/cancel", response_model=JourneyChangePublic)
async def cancel(
    workflow_id: str, request: Request, settings: SettingsDep, body: Reason | None = None
) -> JourneyChangePublic:
    """Cancel one journey: it ends with outcome ``cancelled`` and leaves its ad audiences."""
    ended = await _steer_journey(request, settings, steering.cancel, workflow_id, body)
    return JourneyChangePublic(journey_id=workflow_id, action="cancel", changed=ended)
