"""Google Ads Customer Match: add and remove members of a CRM user list.

Members change through an offline user data job, as Google asks: create the job (type
``CUSTOMER_MATCH_USER_LIST``, naming the user list and the shopper's consent), add its
operations (``create`` or ``remove``, each one ``hashedEmail``), then run it. Google matches the
job's members over the following hours; kaeru counts a member as changed once the job runs.

The email is normalised as Google's Customer Match guide says (trimmed, lower-cased, and for
``gmail.com`` / ``googlemail.com`` without dots before the ``@``), then SHA-256 hex.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from temporalio.exceptions import ApplicationError

from activities.metrics import count
from activities.types import AUDIENCE_REJECTED
from kaeru.metric_names import AD_API_CALLS, AD_API_ERRORS
from kaeru.models import utcnow
from kaeru.settings import Settings

GOOGLE = "google"
#: ApplicationError type of retryable Google Ads failures (as Meta's: the audience is busy).
AUDIENCE_UNAVAILABLE = "AudienceUnavailable"
#: gRPC status names in Google's REST error answers that mean "later".
TRANSIENT_STATUSES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL", "ABORTED"})
#: An offline user data job in these states has run (or is running): never run it again.
RAN = frozenset({"RUNNING", "SUCCESS"})
_GMAIL = frozenset({"gmail.com", "googlemail.com"})
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")


def google_email_sha256(address: str) -> str:
    """SHA-256 hex of the address normalised as Google Customer Match asks."""
    local, _, domain = address.strip().lower().rpartition("@")
    if domain in _GMAIL:
        local = local.replace(".", "")
    return hashlib.sha256(f"{local}@{domain}".encode()).hexdigest()


def configured(settings: Settings) -> bool:
    """True when every Google Ads setting Customer Match needs is set."""
    s = settings
    return bool(
        s.google_ads_developer_token
        and s.google_ads_access_token
        and s.google_ads_customer_id
        and s.google_ads_user_list_id
    )


class GoogleCustomerMatch:
    """The Google Ads REST calls of one batch, with settings and HTTP client injected."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.http = http

    @property
    def customer(self) -> str:
        return (self.settings.google_ads_customer_id or "").replace("-", "")

    def user_list(self, user_list_id: str) -> str:
        """The user list's resource name, as the job names it."""
        return f"customers/{self.customer}/userLists/{user_list_id}"

    async def create_job(self, user_list_id: str) -> str:
        """Create an offline user data job for the user list; returns its resource name."""
        body = {
            "job": {
                "type": "CUSTOMER_MATCH_USER_LIST",
                "customerMatchUserListMetadata": {
                    "userList": self.user_list(user_list_id),
                    # kaeru only adds shoppers with marketing consent (activities/ads.py).
                    "consent": {"adUserData": "GRANTED", "adPersonalization": "GRANTED"},
                },
            }
        }
        answer = await self._post(f"customers/{self.customer}/offlineUserDataJobs:create", body)
        name = answer.get("resourceName")
        if not isinstance(name, str) or not name:
            raise ApplicationError(
                f"Google Ads created no offline user data job (answer {answer!r}); check "
                "KAERU_GOOGLE_ADS_API_URL points at the Google Ads REST API",
                type=AUDIENCE_REJECTED,
                non_retryable=True,
            )
        return name

    async def status(self, job: str) -> str:
        """The job's status: ``PENDING``, ``RUNNING``, ``SUCCESS`` or ``FAILED``."""
        answer = await self._call("GET", job, None)
        return str(answer.get("status", ""))

    async def add_and_run(self, job: str, hashes: list[str], *, joining: bool) -> None:
        """Add one operation per member to ``job``, then run it."""
        verb = "create" if joining else "remove"
        operations = [{verb: {"userIdentifiers": [{"hashedEmail": h}]}} for h in hashes]
        await self._post(f"{job}:addOperations", {"operations": operations})
        await self._post(f"{job}:run", {})

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        count(AD_API_CALLS, "Calls to an ad platform's API", platform="google")
        try:
            return await self._request(method, path, body)
        except Exception:
            count(AD_API_ERRORS, "Ad API calls that failed", platform="google")
            raise

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        s = self.settings
        assert s.google_ads_developer_token is not None and s.google_ads_access_token is not None
        headers = {
            "Authorization": f"Bearer {s.google_ads_access_token.get_secret_value()}",
            "developer-token": s.google_ads_developer_token.get_secret_value(),
        }
        if s.google_ads_login_customer_id:
            headers["login-customer-id"] = s.google_ads_login_customer_id.replace("-", "")
        url = f"{s.google_ads_api_url.rstrip('/')}/{path}"
        try:
            response = await self.http.request(method, url, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise ApplicationError(
                f"cannot reach the Google Ads API at {url} ({type(exc).__name__}: {exc}); check "
                "the network and KAERU_GOOGLE_ADS_API_URL. Retrying with backoff",
                type=AUDIENCE_UNAVAILABLE,
            ) from exc
        answer = _json(response)
        if response.is_success:
            return answer
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        assert isinstance(error, dict)
        status = str(error.get("status", ""))
        said = _describe(response, error)
        if response.status_code in (429, 500, 502, 503, 504) or status in TRANSIENT_STATUSES:
            raise ApplicationError(
                f"Google Ads is busy ({said}); retrying",
                type=AUDIENCE_UNAVAILABLE,
                next_retry_delay=retry_after(response, error),
            )
        raise ApplicationError(
            f"Google Ads refused the Customer Match change ({said}). {_fix(status, said)}",
            type=AUDIENCE_REJECTED,
            non_retryable=True,
        )


def retry_after(response: httpx.Response, error: dict[str, Any] | None = None) -> timedelta | None:
    """The wait the server asked for: ``Retry-After`` (seconds or an HTTP date), else the
    ``retryDelay`` of a Google ``RetryInfo`` detail; None if it asked for none."""
    header = response.headers.get("retry-after", "").strip()
    if header.isdigit():
        return timedelta(seconds=int(header))
    if header:
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(when - utcnow(), timedelta(seconds=1))
    for detail in (error or {}).get("details") or []:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        found = _DURATION.match(delay) if isinstance(delay, str) else None
        if found:
            return timedelta(seconds=float(found.group(1)))
    return None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _describe(response: httpx.Response, error: dict[str, Any]) -> str:
    """Google's answer in one line: HTTP status, gRPC status, the Google Ads error codes."""
    parts = [f"HTTP {response.status_code}"]
    if error.get("status"):
        parts.append(str(error["status"]))
    codes: list[str] = []
    for detail in error.get("details") or []:
        for failure in detail.get("errors") or [] if isinstance(detail, dict) else []:
            code = failure.get("errorCode") if isinstance(failure, dict) else None
            if isinstance(code, dict):
                codes.extend(f"{k}={v}" for k, v in code.items())
    if codes:
        parts.append(", ".join(codes))
    message = error.get("message") or response.text[:200]
    return "; ".join(parts) + (f": {message}" if message else "")


def _fix(status: str, said: str) -> str:
    if "CUSTOMER_NOT_ALLOWLISTED_FOR_THIS_FEATURE" in said:
        return (
            "Since April 2026 Google lets only allowlisted accounts change Customer Match lists "
            "through offline user data jobs: ask Google to allowlist "
            "KAERU_GOOGLE_ADS_CUSTOMER_ID, or unset the KAERU_GOOGLE_ADS_* settings"
        )
    if status == "UNAUTHENTICATED":
        return (
            "The OAuth access token is invalid or expired: refresh it and set "
            "KAERU_GOOGLE_ADS_ACCESS_TOKEN"
        )
    if status == "PERMISSION_DENIED":
        return (
            "Check KAERU_GOOGLE_ADS_DEVELOPER_TOKEN is approved, and that the token's user can "
            "reach KAERU_GOOGLE_ADS_CUSTOMER_ID (set KAERU_GOOGLE_ADS_LOGIN_CUSTOMER_ID to the "
            "manager account if it goes through one)"
        )
    return (
        "Check that KAERU_GOOGLE_ADS_USER_LIST_ID names a CRM-based Customer Match list of "
        "KAERU_GOOGLE_ADS_CUSTOMER_ID whose terms are accepted"
    )
