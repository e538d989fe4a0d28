"""Plumbing shared by every endpoint: settings, write-key and operator auth, error answers.

Two kinds of write key (README, "Trust model"): the server key (``KAERU_WRITE_KEY``) is
trusted; the browser key (``KAERU_BROWSER_WRITE_KEY``) ships inside shops' web pages, so it is
public and what it may do is limited (:mod:`starter.events`). Neither opens the admin API,
which needs the operator token (``KAERU_OPERATOR_TOKEN``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from kaeru.settings import Settings

if TYPE_CHECKING:
    from starter.router import Router


class ApiError(Exception):
    """An error answer: ``{"code": ..., "message": ...}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


async def _settings(request: Request) -> Settings:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread
    # hop per request to read one attribute.
    settings: Settings = request.app.state.settings
    return settings


def router_of(request: Request) -> Router:
    """The event router of this API process (to wake it after storing an event)."""
    router: Router = request.app.state.router
    return router


#: The deployment's settings, loaded once by ``create_app``.
SettingsDep = Annotated[Settings, Depends(_settings)]


#: Which key an event came with: ``server`` (trusted) or ``browser`` (public, limited).
Source = Literal["server", "browser"]
SERVER: Source = "server"
BROWSER: Source = "browser"


def configured_write_key(settings: Settings) -> str:
    """The server write key, or a 503 saying how to set it."""
    if settings.write_key is None or not settings.write_key.get_secret_value():
        raise ApiError(
            503,
            "not_configured",
            "ingestion is disabled because no write key is set: set KAERU_WRITE_KEY to the "
            "key your event sources send, and restart the API",
        )
    return settings.write_key.get_secret_value()


def source_of_key(given: Any, settings: Settings) -> Source | None:
    """Which kind of key ``given`` is, or None if it is neither (compared in constant time)."""
    if key_matches(given, configured_write_key(settings)):
        return SERVER
    browser = settings.browser_write_key
    if (
        browser is not None
        and browser.get_secret_value()
        and key_matches(given, browser.get_secret_value())
    ):
        return BROWSER
    return None


def unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Basic realm="kaeru"'}
    )


def basic_auth_user(request: Request) -> str | None:
    """The user name of an ``Authorization: Basic`` header; None without a header.

    Raises:
        ApiError: 401 for a header that is not readable Basic auth.
    """
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "basic":
        raise unauthorized("use HTTP Basic auth with the write key as the user name")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise unauthorized("the Authorization header is not valid Basic auth") from exc
    return decoded.partition(":")[0]


def key_matches(given: Any, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


async def require_operator(request: Request, settings: SettingsDep) -> None:
    """Dependency of the admin endpoints: ``Authorization: Bearer <KAERU_OPERATOR_TOKEN>``.

    Write keys never open them: they are public (the browser key ships in web pages), and the
    admin API answers personal data.
    """
    token = settings.operator_token.get_secret_value() if settings.operator_token else ""
    if not token:
        raise ApiError(
            503,
            "not_configured",
            "the admin API is disabled because no operator token is set: set "
            "KAERU_OPERATOR_TOKEN to a long random secret and restart the API",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_matches(given.strip(), token):
        raise ApiError(
            401,
            "unauthorized",
            "the admin API needs the operator token: send Authorization: Bearer "
            "<KAERU_OPERATOR_TOKEN> (a write key does not open it)",
            headers={"WWW-Authenticate": 'Bearer realm="kaeru-admin"'},
        )


Operator = Depends(require_operator)
