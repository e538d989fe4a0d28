"""Ad audiences: put a shopper into a retargeting audience and take them out again.

Two providers, chosen by settings: Meta Custom Audiences when ``KAERU_META_ACCESS_TOKEN`` and
``KAERU_META_AUDIENCE_ID`` are set, otherwise the local audience store (``audience_members``),
which ``kaeru dev`` uses and a shop can export. Both only ever see the SHA-256 of the
normalised email address. Adding and removing are set operations, so a retry is always safe.

Every add is kept (``audience_joins``) with the hash it sent, and leaving removes that hash,
not the one of the customer's address today (they may have changed it meanwhile). A removal
that fails for good is parked there with its reason; ``retry_audience_removals``, run by the
audience sweeper's Temporal Schedule, tries parked removals again with backoff, and closes
one as superseded instead when a later journey has added the same member again.

Consent: a customer without email marketing consent (:func:`kaeru.consent.refusal`, with
``KAERU_UNKNOWN_CONSENT_IS_YES``) or with a suppressed address never joins an audience: the add
fails with ``NotConsented`` before the platform is asked, and the journey ends
``unsubscribed`` (it leaves every audience it joined before, as every journey's end does).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from typing import Any

import httpx
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.email.addresses import mask_address, recipient_address
from activities.email.gate import suppression_of
from activities.google_ads import GOOGLE, GoogleCustomerMatch, retry_after
from activities.metrics import count
from activities.types import (
    AUDIENCE_REJECTED,
    NOT_CONSENTED,
    AudienceChange,
    AudienceResult,
    ParkRemoval,
    SweepInput,
    SweepResult,
)
from kaeru.consent import refusal
from kaeru.db import session
from kaeru.identity import email_key, no_email_address
from kaeru.metric_names import AD_API_CALLS, AD_API_ERRORS
from kaeru.models import AudienceJoin, AudienceMember, utcnow
from kaeru.pseudonyms import journey_kind
from kaeru.settings import Settings
from kaeru.touchpoints import ADS, record_touchpoint

LOCAL = "local"
META = "meta"

#: Graph API error codes that mean "later", whatever the HTTP status: unknown / service
#: errors, throttling of the app, user, page or ad account, and custom-audience throttling.
TRANSIENT_GRAPH_CODES = frozenset({1, 2, 4, 17, 32, 341, 613, 80003})

#: ApplicationError type of retryable Graph API failures, to tell them apart in the UI.
AUDIENCE_UNAVAILABLE = "AudienceUnavailable"

#: The longest wait between two sweeps of one parked removal.
MAX_SWEEP_BACKOFF = timedelta(days=1)


def email_sha256(address: str) -> str:
    """The hash ad platforms match on: SHA-256 hex of the trimmed, lower-cased address."""
    return hashlib.sha256(email_key(address).encode()).hexdigest()


class AudienceActivities:
    """``add_to_audience`` and ``remove_from_audience``, with settings and HTTP client injected."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http

    @property
    def provider(self) -> str:
        s = self.settings
        return META if s.meta_access_token and s.meta_audience_id else LOCAL

    @activity.defn(name="add_to_audience")
    async def add_to_audience(self, change: AudienceChange) -> AudienceResult:
        """Add the customer to ``change.audience`` (idempotent), and keep what was added.

        Raises:
            ApplicationError: ``NoEmailAddress``, ``NotConsented`` (no marketing consent, or a
                suppressed address) or ``AudienceRejected`` (non-retryable), or a retryable
                one when the ad platform is busy or unreachable.
        """
        hashed = email_sha256(await asyncio.to_thread(self._consented_email, change))
        target = self._target(change.audience)
        await self._send(target, hashed, joining=True)
        await asyncio.to_thread(self._record, change, hashed, target, True)
        return target

    @activity.defn(name="remove_from_audience")
    async def remove_from_audience(self, change: AudienceChange) -> AudienceResult:
        """Remove what the journey's add put into ``change.audience`` (idempotent).

        Adds made before kaeru kept them are removed by the current address's hash.

        Raises:
            ApplicationError: as for adding.
        """
        join = await asyncio.to_thread(self._join_of, change)
        if join is not None:
            hashed, target = join.email_sha256, AudienceResult(join.provider, join.audience_id)
        else:
            hashed = email_sha256(await asyncio.to_thread(self._email, change))
            target = self._target(change.audience)
        await self._send(target, hashed, joining=False)
        await asyncio.to_thread(self._record, change, hashed, target, False)
        return target

    @activity.defn(name="park_audience_removal")
    async def park_audience_removal(self, parked: ParkRemoval) -> None:
        """Keep a removal that failed for good, with its reason, for the audience sweeper."""
        await asyncio.to_thread(self._park, parked)

    @activity.defn(name="retry_audience_removals")
    async def retry_audience_removals(self, sweep: SweepInput) -> SweepResult:
        """Try the parked removals that are due; one that fails again waits longer.

        A parked removal whose member a later journey added again (another open join of the
        same member) is closed as superseded, not removed: removing it would take out a live
        membership. Every row is handled on its own: whatever one row raises, it waits
        longer and the rows after it are still tried.
        """
        due = await asyncio.to_thread(self._due, sweep.limit)
        result = SweepResult()
        for join in due:
            activity.heartbeat(result.tried)
            result.tried += 1
            target = AudienceResult(join.provider, join.audience_id)
            try:
                if await asyncio.to_thread(self._superseded, join):
                    continue
                await self._send(target, join.email_sha256, joining=False)
                await asyncio.to_thread(self._swept, join)
            except ApplicationError as err:
                await asyncio.to_thread(self._still_parked, join.key, err.message)
                continue
            except Exception as exc:
                # Only the error's type: its text (a database error's parameters) may hold the
                # customer's id, often an email address. The text is kept in the row.
                activity.logger.warning(
                    "a parked removal from %s failed unexpectedly (%s, see "
                    "audience_joins.removal_error); it waits for a later sweep, and the other "
                    "parked removals are still tried",
                    join.audience,
                    type(exc).__name__,
                )
                await asyncio.to_thread(
                    self._still_parked, join.key, f"{type(exc).__name__}: {exc}"
                )
                continue
            result.removed += 1
        return result

    def _target(self, audience: str) -> AudienceResult:
        """Where ``audience`` lives with today's settings."""
        if self.provider == META:
            assert self.settings.meta_audience_id is not None
            return AudienceResult(provider=META, audience_id=self.settings.meta_audience_id)
        return AudienceResult(provider=LOCAL, audience_id=audience)

    async def _send(self, target: AudienceResult, hashed: str, *, joining: bool) -> None:
        """Tell the ad platform (the local store is written with the touchpoint)."""
        if target.provider == META:
            await self.meta([hashed], target.audience_id, joining=joining)
        elif target.provider == GOOGLE:
            google = GoogleCustomerMatch(self.settings, self.http)
            job = await google.create_job(target.audience_id)
            await google.add_and_run(job, [hashed], joining=joining)

    def _email(self, change: AudienceChange) -> str:
        with session(self.settings.resolved_database_url) as s:
            address = recipient_address(s, change.customer_id)
        if not address:
            raise no_email_address(
                change.customer_id, f"they cannot join or leave the {change.audience} audience"
            )
        return address

    def _consented_email(self, change: AudienceChange) -> str:
        """The address to add, if the customer may be marketed to (else ``NotConsented``)."""
        address = self._email(change)
        with session(self.settings.resolved_database_url) as s:
            why = refusal(
                s,
                change.customer_id,
                kind=journey_kind_of(change),
                unknown_is_yes=self.settings.unknown_consent_is_yes,
            )
            suppressed = suppression_of(s, address)
        if why is None and suppressed is not None:
            why = f"{mask_address(address)} is on the suppression list ({suppressed.reason})"
        if why is not None:
            raise ApplicationError(
                f"the shopper is not added to the {change.audience} audience: {why}",
                type=NOT_CONSENTED,
                non_retryable=True,
            )
        return address

    def _join_of(self, change: AudienceChange) -> AudienceJoin | None:
        """The add a leave undoes: the one it names, else the journey's newest open one."""
        with session(self.settings.resolved_database_url) as s:
            return _join_of(s, change)

    def _record(
        self, change: AudienceChange, hashed: str, result: AudienceResult, joining: bool
    ) -> None:
        """Update the local store, the kept add and the touchpoint, in one go."""
        with session(self.settings.resolved_database_url) as s:
            if result.provider == LOCAL:
                set_local_member(
                    s, change.audience, change.customer_id, hashed, change.journey_id, joining
                )
            join = s.get(AudienceJoin, change.key) if joining else _join_of(s, change)
            if joining and join is None:
                s.add(
                    AudienceJoin(
                        key=change.key,
                        journey_id=change.journey_id,
                        customer_id=change.customer_id,
                        audience=change.audience,
                        provider=result.provider,
                        audience_id=result.audience_id,
                        email_sha256=hashed,
                    )
                )
            elif not joining and join is not None:
                join.left_at, join.removal_error, join.retry_at = utcnow(), None, None
                s.add(join)
            record_touchpoint(
                s,
                customer_id=change.customer_id,
                kind="audience_joined" if joining else "audience_left",
                key=change.key,
                journey_id=change.journey_id,
                step=change.step,
                channel=ADS,
                detail={
                    "audience": change.audience,
                    "provider": result.provider,
                    "audience_id": result.audience_id,
                },
            )

    def _park(self, parked: ParkRemoval) -> None:
        change = parked.change
        with session(self.settings.resolved_database_url) as s:
            join = _join_of(s, change)
            queued = _queued_joins(s, change) if join is None else []
            if queued:  # a batched join: one kept add per provider it went to
                for each in queued:
                    each.removal_error, each.retry_at = parked.reason[:2000], utcnow()
                    s.add(each)
                return
            if join is None:  # added before kaeru kept adds: the current address is all we have
                address = recipient_address(s, change.customer_id)
                if not address:
                    activity.logger.warning(
                        "cannot park a removal from %s: the customer has no address any more",
                        change.audience,
                    )
                    return
                target = self._target(change.audience)
                join = AudienceJoin(
                    key=change.joined_key or change.key,
                    journey_id=change.journey_id,
                    customer_id=change.customer_id,
                    audience=change.audience,
                    provider=target.provider,
                    audience_id=target.audience_id,
                    email_sha256=email_sha256(address),
                )
            if join.left_at is not None:
                return  # a later try did remove it
            join.removal_error, join.retry_at = parked.reason[:2000], utcnow()
            s.add(join)

    def _due(self, limit: int) -> list[AudienceJoin]:
        with session(self.settings.resolved_database_url) as s:
            query = (
                select(AudienceJoin)
                .where(col(AudienceJoin.left_at).is_(None))
                .where(col(AudienceJoin.retry_at) <= utcnow())
                .order_by(col(AudienceJoin.retry_at))
                .limit(limit)
            )
            return list(s.exec(query))

    def _superseded(self, parked: AudienceJoin) -> bool:
        """Close ``parked`` if another open join holds the same member; True if it did.

        Open: not left and not parked itself. The same member: the same provider, audience id
        and hash (Meta matches on the hash), or, in the local store (one row per audience and
        customer), the same audience and customer.
        """
        with session(self.settings.resolved_database_url) as s:
            query = (
                select(AudienceJoin.key)
                .where(AudienceJoin.key != parked.key)
                .where(col(AudienceJoin.left_at).is_(None))
                .where(col(AudienceJoin.retry_at).is_(None))
                .where(AudienceJoin.provider == parked.provider)
                .where(AudienceJoin.audience_id == parked.audience_id)
            )
            if parked.provider == LOCAL:
                query = query.where(AudienceJoin.customer_id == parked.customer_id)
            else:
                query = query.where(AudienceJoin.email_sha256 == parked.email_sha256)
            holder = s.exec(query.limit(1)).first()
            if holder is None:
                return False
            join = s.get(AudienceJoin, parked.key)
            if join is None or join.left_at is not None:
                return True
            join.left_at, join.retry_at = utcnow(), None
            join.removal_error = f"superseded: join {holder} holds the same member, so it stays"
            s.add(join)
            return True

    def _still_parked(self, key: str, reason: str) -> None:
        with session(self.settings.resolved_database_url) as s:
            join = s.get(AudienceJoin, key)
            if join is None:
                return
            join.removal_attempts += 1
            wait = self.settings.audience_sweep_interval * 2 ** min(join.removal_attempts, 16)
            join.retry_at = utcnow() + min(wait, MAX_SWEEP_BACKOFF)
            join.removal_error = reason[:2000]
            s.add(join)

    def _swept(self, join: AudienceJoin) -> None:
        with session(self.settings.resolved_database_url) as s:
            if join.provider == LOCAL:
                set_local_member(s, join.audience, join.customer_id, "", join.journey_id, False)
            join.left_at, join.removal_error, join.retry_at = utcnow(), None, None
            s.add(join)
            record_touchpoint(
                s,
                customer_id=join.customer_id,
                kind="audience_left",
                key=f"{join.key}/swept",
                journey_id=join.journey_id,
                step=f"leave-{join.audience}",
                channel=ADS,
                detail={
                    "audience": join.audience,
                    "provider": join.provider,
                    "audience_id": join.audience_id,
                    "swept": True,
                },
            )

    # ---- Meta ------------------------------------------------------------------------------

    async def meta(self, hashes: list[str], audience_id: str, *, joining: bool) -> None:
        """Add or remove ``hashes`` (at most 10,000, Meta's limit) in one Graph API call.

        Raises:
            ApplicationError: ``AudienceRejected`` (non-retryable) when Meta refuses for good;
                a retryable one when it is busy, after the ``Retry-After`` it asked for.
        """
        s = self.settings
        if not s.meta_access_token:
            raise ApplicationError(
                f"audience {audience_id} is on Meta, but KAERU_META_ACCESS_TOKEN is not set: "
                "set it (and KAERU_META_AUDIENCE_ID) so kaeru can change the audience",
                type=AUDIENCE_REJECTED,
                non_retryable=True,
            )
        count(AD_API_CALLS, "Calls to an ad platform's API", platform="meta")
        try:
            await self._meta_call(hashes, audience_id, joining=joining)
        except Exception:
            count(AD_API_ERRORS, "Ad API calls that failed", platform="meta")
            raise

    async def _meta_call(self, hashes: list[str], audience_id: str, *, joining: bool) -> None:
        s = self.settings
        assert s.meta_access_token is not None
        url = f"{s.meta_graph_url.rstrip('/')}/{audience_id}/users"
        verb = "add shoppers to" if joining else "remove shoppers from"
        body = {
            "payload": {"schema": "EMAIL_SHA256", "data": hashes},
            # In the body, not the query: httpx and proxies log URLs, and this is a secret.
            "access_token": s.meta_access_token.get_secret_value(),
        }
        try:
            response = await self.http.request("POST" if joining else "DELETE", url, json=body)
        except httpx.TransportError as exc:
            raise ApplicationError(
                f"cannot reach the Meta Graph API at {url} to {verb} audience {audience_id} "
                f"({type(exc).__name__}: {exc}); check the network and KAERU_META_GRAPH_URL. "
                "Retrying with backoff",
                type=AUDIENCE_UNAVAILABLE,
            ) from exc

        error = _graph_error(response)
        if response.is_success and error is None:
            answer = _json(response)
            if answer.get("num_invalid_entries"):
                raise ApplicationError(
                    f"Meta did not accept the shopper's email hash for audience {audience_id}: "
                    f"{answer.get('invalid_entry_samples')}; kaeru sends SHA-256 hex of the "
                    "trimmed, lower-cased address, so report this as a bug",
                    type=AUDIENCE_REJECTED,
                    non_retryable=True,
                )
            return

        error = error or {}
        code = error.get("code")
        said = _describe(response, error)
        if (
            response.status_code == 429
            or response.status_code >= 500
            or code in TRANSIENT_GRAPH_CODES
            or error.get("is_transient") is True
        ):
            raise ApplicationError(
                f"Meta is busy and could not {verb} audience {audience_id} ({said}); "
                "retrying with backoff",
                type=AUDIENCE_UNAVAILABLE,
                next_retry_delay=retry_after(response),
            )
        raise ApplicationError(
            f"Meta refused to {verb} audience {audience_id} ({said}). {_fix(code)}",
            type=AUDIENCE_REJECTED,
            non_retryable=True,
        )


def journey_kind_of(change: AudienceChange) -> str:
    """The kind of the journey making ``change`` (its id is ``<kind>-<customer id>``)."""
    return journey_kind(change.journey_id, change.customer_id)


def _join_of(s: Session, change: AudienceChange) -> AudienceJoin | None:
    if change.joined_key is not None:
        return s.get(AudienceJoin, change.joined_key)
    query = (
        select(AudienceJoin)
        .where(AudienceJoin.journey_id == change.journey_id)
        .where(AudienceJoin.audience == change.audience)
        .where(col(AudienceJoin.left_at).is_(None))
        .order_by(col(AudienceJoin.joined_at).desc())
    )
    return s.exec(query).first()


def _queued_joins(s: Session, change: AudienceChange) -> list[AudienceJoin]:
    """The open adds a batched join (``queue_audience_join``) kept: ``<joined key>/<provider>``."""
    if change.joined_key is None:
        return []
    query = (
        select(AudienceJoin)
        .where(col(AudienceJoin.key).startswith(f"{change.joined_key}/", autoescape=True))
        .where(col(AudienceJoin.left_at).is_(None))
    )
    return list(s.exec(query))


def set_local_member(
    s: Session, audience: str, customer_id: str, hashed: str, journey_id: str, joining: bool
) -> None:
    """Add to or remove from the local audience store."""
    member = s.get(AudienceMember, (audience, customer_id))
    if joining and member is None:
        s.add(
            AudienceMember(
                audience=audience,
                customer_id=customer_id,
                email_sha256=hashed,
                journey_id=journey_id,
            )
        )
    elif not joining and member is not None:
        s.delete(member)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _graph_error(response: httpx.Response) -> dict[str, Any] | None:
    error = _json(response).get("error")
    return error if isinstance(error, dict) else None


def _describe(response: httpx.Response, error: dict[str, Any]) -> str:
    """Meta's answer in one line: status, code, subcode, message and trace id."""
    parts = [f"HTTP {response.status_code}"]
    for name in ("code", "error_subcode", "fbtrace_id"):
        if error.get(name) is not None:
            parts.append(f"{name} {error[name]}")
    message = error.get("error_user_msg") or error.get("message") or response.text[:200]
    return ", ".join(parts) + (f": {message}" if message else "")


def _fix(code: Any) -> str:
    if code == 190:
        return (
            "The access token is invalid or expired: create a new system-user token with "
            "ads_management and set KAERU_META_ACCESS_TOKEN"
        )
    if code == 10 or (isinstance(code, int) and 200 <= code <= 299):
        return (
            "The token lacks a permission: grant it ads_management on the ad account that "
            "owns the audience"
        )
    if code == 100:
        return (
            "Check that KAERU_META_AUDIENCE_ID names a customer-list custom audience that "
            "this token's ad account owns, and that its terms are accepted"
        )
    return (
        "See https://developers.facebook.com/docs/graph-api/guides/error-handling for this "
        "code, then fix the KAERU_META_* settings"
    )
