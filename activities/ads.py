"""Ad audiences: put a shopper into a retargeting audience and take them out again.

Two providers, chosen by settings: Meta Custom Audiences when ``KAERU_META_ACCESS_TOKEN`` and
``KAERU_META_AUDIENCE_ID`` are set, otherwise the local audience store (``audience_members``),
which ``kaeru dev`` uses and a shop can export. Both only ever see the SHA-256 of the
normalised email address. Adding and removing are set operations, so a retry is always safe.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.types import AUDIENCE_REJECTED, NO_EMAIL_ADDRESS, AudienceChange, AudienceResult
from kaeru.db import session
from kaeru.journal import email_of, record_touchpoint
from kaeru.models import AudienceMember
from kaeru.settings import Settings

LOCAL = "local"
META = "meta"

#: Graph API error codes that mean "later", whatever the HTTP status: unknown / service
#: errors, throttling of the app, user, page or ad account, and custom-audience throttling.
TRANSIENT_GRAPH_CODES = frozenset({1, 2, 4, 17, 32, 341, 613, 80003})

#: ApplicationError type of retryable Graph API failures, to tell them apart in the UI.
AUDIENCE_UNAVAILABLE = "AudienceUnavailable"


def email_sha256(address: str) -> str:
    """The hash ad platforms match on: SHA-256 hex of the trimmed, lower-cased address."""
    return hashlib.sha256(address.strip().lower().encode()).hexdigest()


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
        """Add the customer to ``change.audience`` (idempotent).

        Raises:
            ApplicationError: ``NoEmailAddress`` or ``AudienceRejected`` (non-retryable), or a
                retryable one when the ad platform is busy or unreachable.
        """
        return await self._change(change, joining=True)

    @activity.defn(name="remove_from_audience")
    async def remove_from_audience(self, change: AudienceChange) -> AudienceResult:
        """Remove the customer from ``change.audience`` (idempotent); errors as for adding."""
        return await self._change(change, joining=False)

    async def _change(self, change: AudienceChange, *, joining: bool) -> AudienceResult:
        hashed = email_sha256(await asyncio.to_thread(self._email, change))
        if self.provider == META:
            audience_id = self.settings.meta_audience_id
            assert audience_id is not None
            await self._meta(change, hashed, audience_id, joining=joining)
            result = AudienceResult(provider=META, audience_id=audience_id)
        else:
            result = AudienceResult(provider=LOCAL, audience_id=change.audience)
        await asyncio.to_thread(self._record, change, hashed, result, joining)
        return result

    def _email(self, change: AudienceChange) -> str:
        with session(self.settings.resolved_database_url) as s:
            address = (email_of(s, change.customer_id) or "").strip()
        if not address:
            raise ApplicationError(
                f"customer {change.customer_id!r} has no known email address, so they cannot "
                f"join or leave the {change.audience} audience; send an identify call with "
                "traits.email for this customer",
                type=NO_EMAIL_ADDRESS,
                non_retryable=True,
            )
        return address

    def _record(
        self, change: AudienceChange, hashed: str, result: AudienceResult, joining: bool
    ) -> None:
        """Update the local store (for the local provider) and the touchpoint, in one go."""
        with session(self.settings.resolved_database_url) as s:
            if result.provider == LOCAL:
                member = s.get(AudienceMember, (change.audience, change.customer_id))
                if joining and member is None:
                    s.add(
                        AudienceMember(
                            audience=change.audience,
                            customer_id=change.customer_id,
                            email_sha256=hashed,
                            journey_id=change.journey_id,
                        )
                    )
                elif not joining and member is not None:
                    s.delete(member)
            record_touchpoint(
                s,
                customer_id=change.customer_id,
                kind="audience_joined" if joining else "audience_left",
                key=change.key,
                journey_id=change.journey_id,
                step=change.step,
                detail={
                    "audience": change.audience,
                    "provider": result.provider,
                    "audience_id": result.audience_id,
                },
            )

    # ---- Meta ------------------------------------------------------------------------------

    async def _meta(
        self, change: AudienceChange, hashed: str, audience_id: str, *, joining: bool
    ) -> None:
        s = self.settings
        url = f"{s.meta_graph_url.rstrip('/')}/{audience_id}/users"
        verb = "add the shopper to" if joining else "remove the shopper from"
        body = {
            "payload": {"schema": "EMAIL_SHA256", "data": [hashed]},
            # In the body, not the query: httpx and proxies log URLs, and this is a secret.
            "access_token": s.meta_access_token.get_secret_value() if s.meta_access_token else "",
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
            )
        raise ApplicationError(
            f"Meta refused to {verb} audience {audience_id} ({said}). {_fix(code)}",
            type=AUDIENCE_REJECTED,
            non_retryable=True,
        )


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
