"""The admin API of a remote kaeru deployment (``KAERU_API_URL``), as the CLI calls it: the
operator token of ``KAERU_OPERATOR_TOKEN`` instead of database and Temporal credentials."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from kaeru.settings import Settings

#: Seconds a call may take: a cancel waits up to 10 s on the server for the journey to end.
TIMEOUT = 30.0


class RemoteError(Exception):
    """The API cannot be reached or refused; the message says why and what to do."""


def journey_path(workflow_id: str, action: str) -> str:
    return f"/v1/admin/journeys/{quote(workflow_id, safe='')}/{action}"


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1: a request to it never leaves this machine."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_plain_http(base: str) -> None:
    """Refuse to send the operator token anywhere but HTTPS or this machine.

    Raises:
        RemoteError: ``base`` is not ``https://`` and its host is not loopback.
    """
    parts = urlsplit(base)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and is_loopback(parts.hostname or ""):
        return
    raise RemoteError(
        f"KAERU_API_URL={base} is not an https:// URL: the operator token would cross the "
        "network in clear, readable by anyone on the path. Give the deployment's https:// "
        "address (http:// only for 127.0.0.1, ::1 or localhost, e.g. an SSH tunnel)"
    )


def admin_call(
    settings: Settings, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Call ``path`` of the admin API at ``KAERU_API_URL`` and return its JSON answer.

    Raises:
        RemoteError: no token, an unreachable URL, or an error answer (its message).
    """
    base = (settings.api_url or "").rstrip("/")
    token = settings.operator_token.get_secret_value() if settings.operator_token else ""
    if not token:
        raise RemoteError(
            f"KAERU_API_URL is set ({base}) but KAERU_OPERATOR_TOKEN is not: set it to the "
            "deployment's operator token"
        )
    refuse_plain_http(base)
    try:
        answer = httpx.request(
            method,
            base + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT,
        )
    except httpx.HTTPError as exc:
        raise RemoteError(
            f"cannot reach the kaeru API at KAERU_API_URL={base} ({exc or type(exc).__name__}): "
            "check the URL and that the API runs"
        ) from exc
    try:
        found: Any = answer.json()
    except ValueError:
        found = None
    if answer.is_error:
        message = found.get("message") if isinstance(found, dict) else None
        raise RemoteError(
            f"the kaeru API at {base} refused ({answer.status_code}): "
            f"{message or answer.text[:200] or answer.reason_phrase}"
        )
    if not isinstance(found, dict):
        raise RemoteError(
            f"the kaeru API at {base} answered {path} with something that is not JSON: is "
            "KAERU_API_URL the base URL of a kaeru API?"
        )
    return found
