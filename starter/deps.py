"""Plumbing shared by every endpoint: settings, write-key and operator auth, error answers.

Two kinds of write key (README, "Trust model"): the server key (``KAERU_WRITE_KEY``) is
trusted; the browser key (``KAERU_BROWSER_WRITE_KEY``) ships inside shops' web pages, so it is
public and what it may do is limited (:mod:`starter.events`); ``kaeru keys create`` makes more
of either kind, kept hashed in the database (:mod:`kaeru.credentials`). None opens the admin
API, which needs an operator token: ``KAERU_OPERATOR_TOKEN`` (the bootstrap operator) or an
account's (``kaeru operators add``), whose role ``read-only`` may only read.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from kaeru.credentials import BOOTSTRAP, OPERATOR, Account, CredentialCache, digest
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


def credentials_of(request: Request) -> CredentialCache:
    """The database's write keys and operator accounts, cached (KAERU_CREDENTIALS_CACHE_TTL)."""
    cache: CredentialCache = request.app.state.credentials
    return cache


def env_source_of_key(given: Any, settings: Settings) -> Source | None:
    """Which kind of key of the settings ``given`` is (compared in constant time), or None."""
    for kind, secret in ((SERVER, settings.write_key), (BROWSER, settings.browser_write_key)):
        if secret is not None and secret.get_secret_value():
            if key_matches(given, secret.get_secret_value()):
                return kind
    return None


async def key_source(request: Request, given: Any) -> Source | None:
    """Which kind of write key ``given`` is: a key of the settings (``KAERU_WRITE_KEY``,
    ``KAERU_BROWSER_WRITE_KEY``) or an unrevoked key of ``kaeru keys``; None for neither.

    Raises:
        ApiError: 503 when no server key exists at all (ingestion is not set up).
    """
    settings: Settings = request.app.state.settings
    found = env_source_of_key(given, settings)
    if found is not None:
        return found
    try:
        managed = await credentials_of(request).current()
    except SQLAlchemyError as exc:
        raise ApiError(
            503, "unavailable", "cannot read the write keys from the database; try again"
        ) from exc
    has_env_key = settings.write_key is not None and bool(settings.write_key.get_secret_value())
    if not has_env_key and not managed.has_server_key:
        raise ApiError(
            503,
            "not_configured",
            "ingestion is disabled because no write key is set: create one with `kaeru keys "
            "create NAME` (or set KAERU_WRITE_KEY) and send it from your event sources",
        )
    if not isinstance(given, str):
        return None
    kind = managed.keys.get(digest(given))
    return None if kind is None else (BROWSER if kind == "browser" else SERVER)


#: The answer to a key that is no write key, or a revoked one.
WRONG_KEY = (
    "wrong write key: it is not KAERU_WRITE_KEY, KAERU_BROWSER_WRITE_KEY or an unrevoked key of "
    "`kaeru keys list` (a revoked key is refused)"
)


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


def _admin_unauthorized(message: str) -> ApiError:
    return ApiError(
        401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="kaeru-admin"'}
    )


async def account_of_token(request: Request, given: str) -> Account | None:
    """The operator whose token ``given`` is (``KAERU_OPERATOR_TOKEN`` or an unrevoked account
    of ``kaeru operators``), or None.

    Raises:
        ApiError: 503 when there is no operator at all (no token, no account).
    """
    settings: Settings = request.app.state.settings
    token = settings.operator_token.get_secret_value() if settings.operator_token else ""
    if token and key_matches(given, token):
        return Account(BOOTSTRAP, OPERATOR)
    try:
        managed = await credentials_of(request).current()
    except SQLAlchemyError as exc:
        raise ApiError(
            503, "unavailable", "cannot read the operator accounts from the database; try again"
        ) from exc
    if not token and not managed.operators:
        raise ApiError(
            503,
            "not_configured",
            "the admin API is disabled because no operator token is set: set "
            "KAERU_OPERATOR_TOKEN to a long random secret and restart the API, or make an "
            "account with `kaeru operators add NAME --role operator`",
        )
    return managed.operators.get(digest(given)) if given else None


async def require_reader(request: Request) -> Account:
    """Dependency of the admin endpoints that only read: ``Authorization: Bearer <token>`` of
    any operator (role ``read-only`` or ``operator``); also kept as ``request.state.operator``.

    Write keys never open them: they are public (the browser key ships in web pages), and the
    admin API answers personal data.
    """
    known = getattr(request.state, "operator", None)
    if isinstance(known, Account):
        return known
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    account = await account_of_token(request, given.strip() if scheme.lower() == "bearer" else "")
    if account is None:
        raise _admin_unauthorized(
            "the admin API needs the operator token or an account's: send Authorization: "
            "Bearer <token> with KAERU_OPERATOR_TOKEN or the token `kaeru operators add` "
            "printed (a write key does not open it; a revoked token no longer does)"
        )
    request.state.operator = account
    return account


def forbidden_unless_operator(account: Account) -> None:
    """403 for a ``read-only`` account."""
    if account.role != OPERATOR:
        raise ApiError(
            403,
            "forbidden",
            f"operator {account.name!r} has the role {account.role!r}, which may only read: "
            "this needs the role operator (ask for it: `kaeru operators add NAME --role "
            "operator`)",
        )


async def require_operator(request: Request) -> Account:
    """Dependency of the admin endpoints that change something: the token of an operator of
    the role ``operator`` (``KAERU_OPERATOR_TOKEN`` is one); 403 for a ``read-only`` one."""
    account = await require_reader(request)
    forbidden_unless_operator(account)
    return account


async def require_admin(request: Request) -> Account:
    """The admin routers' own dependency: a read (GET, HEAD, OPTIONS) needs any operator, any
    other method the role ``operator``; so a new route that changes something is safe by
    default."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await require_reader(request)
    return await require_operator(request)


def api_actor(request: Request) -> str:
    """The audit log's actor of this request's operator (``api:<name>``); after the auth."""
    account = getattr(request.state, "operator", None)
    return account.actor if isinstance(account, Account) else "api:unknown"


#: The role ``operator`` is required: for routes that change something.
Operator = Depends(require_operator)
#: Any operator, ``read-only`` too: for routes that only read.
Reader = Depends(require_reader)
#: By method: reads need ``Reader``, everything else ``Operator`` (the admin routers use it).
Admin = Depends(require_admin)
