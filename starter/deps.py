"""Plumbing shared by every endpoint: settings, write-key auth, `{code, message}` errors."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

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


def configured_write_key(settings: Settings) -> str:
    """The write key, or a 503 saying how to set it."""
    if not settings.write_key:
        raise ApiError(
            503,
            "not_configured",
            "ingestion is disabled because no write key is set: set KAERU_WRITE_KEY to the "
            "key your event sources send, and restart the API",
        )
    return settings.write_key


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


async def require_write_key(request: Request, settings: SettingsDep) -> None:
    """Dependency of the admin endpoints: Basic auth with the write key (async: no thread)."""
    expected = configured_write_key(settings)
    user = basic_auth_user(request)
    if user is None:
        raise unauthorized("send the write key as the Basic auth user name")
    if not key_matches(user, expected):
        raise unauthorized("wrong write key")


WriteKey = Depends(require_write_key)
