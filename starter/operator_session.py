"""Browser sign-in with an operator token: a signed, expiring cookie instead of the token.

Browsers cannot send ``Authorization: Bearer`` on their own, so an operator types
``KAERU_OPERATOR_TOKEN`` into a login form once; the answer sets an HttpOnly cookie holding only
an expiry and an HMAC of it keyed by the token. Nothing is stored server-side; a new operator
token signs every browser out. Each use (the codec server, the dashboard) signs with its own
``purpose``, so one's cookie never opens the other.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError

from kaeru.credentials import BOOTSTRAP, OPERATOR, Account
from kaeru.settings import Settings
from starter.deps import ApiError, credentials_of, key_matches

#: How long a sign-in lasts.
SESSION_TTL = 8 * 3600


def operator_token(settings: Settings) -> str:
    """The configured operator token, or ``""`` when none is set."""
    return settings.operator_token.get_secret_value() if settings.operator_token else ""


def _mac(token: str, purpose: str, expires: int) -> str:
    return hmac.new(token.encode(), f"{purpose}:{expires}".encode(), hashlib.sha256).hexdigest()


def session_cookie(token: str, purpose: str, now: float | None = None) -> str:
    """The cookie value of a sign-in with ``token``: its expiry, signed with the token."""
    expires = int((now or time.time()) + SESSION_TTL)
    return f"{expires}.{_mac(token, purpose, expires)}"


def signed_in(request: Request, settings: Settings, cookie: str, purpose: str) -> bool:
    """True when ``request`` carries an unexpired ``cookie`` signed with today's token."""
    token = operator_token(settings)
    expires, _, mac = request.cookies.get(cookie, "").partition(".")
    if not token or not expires.isdigit() or int(expires) < time.time():
        return False
    return key_matches(mac, _mac(token, purpose, int(expires)))


# ---- accounts of ``kaeru operators`` ---------------------------------------------------------
#
# An account's cookie names it and is signed with a key made of the server's secret key
# (``KAERU_SECRET_KEY``, the API's ``app.state.signing_key``) and its token's SHA-256 (the server
# keeps no token): ``<expiry>.<mac>.<name>``. The stored hash alone (a database dump, a backup)
# does not make a cookie: that takes the secret key too. When KAERU_SECRET_KEY is unset, the
# key kaeru generated is kept in the database (``app_secrets``), and a reader of the whole
# database could still forge one: set KAERU_SECRET_KEY. Revoking the account ends its cookies
# within KAERU_CREDENTIALS_CACHE_TTL; changing KAERU_SECRET_KEY ends every account's.

_ACCOUNT_COOKIE = b"kaeru-operator-cookie\0"


def _account_mac(account: Account, purpose: str, expires: int, server_key: bytes) -> str:
    if not server_key:
        raise ValueError("an account cookie needs the server's secret key")
    key = hmac.new(server_key, _ACCOUNT_COOKIE + account.token_hash.encode(), hashlib.sha256)
    message = f"{purpose}:{account.name}:{expires}".encode()
    return hmac.new(key.digest(), message, hashlib.sha256).hexdigest()


def server_key_of(request: Request) -> bytes:
    """The key account cookies are signed with: the API's secret key (``KAERU_SECRET_KEY``, or
    the one generated and kept in the database), loaded when the API starts."""
    key = getattr(request.app.state, "signing_key", b"")
    return key if isinstance(key, bytes) else b""


def account_cookie(
    account: Account, purpose: str, server_key: bytes, now: float | None = None
) -> str:
    """The cookie value of a sign-in with an account's token (``KAERU_OPERATOR_TOKEN``'s is
    :func:`session_cookie`), signed with ``server_key`` (:func:`server_key_of`)."""
    if not account.token_hash:
        raise ValueError("the bootstrap operator signs in with session_cookie")
    expires = int((now or time.time()) + SESSION_TTL)
    return f"{expires}.{_account_mac(account, purpose, expires, server_key)}.{account.name}"


async def signed_in_as(
    request: Request, settings: Settings, cookie: str, purpose: str
) -> Account | None:
    """The operator of an unexpired cookie: the bootstrap one or an unrevoked account.

    Raises:
        ApiError: 503 when the accounts cannot be read (the database is down).
    """
    value = request.cookies.get(cookie, "")
    if value.count(".") < 2:
        bootstrap = signed_in(request, settings, cookie, purpose)
        return Account(BOOTSTRAP, OPERATOR) if bootstrap else None
    expires, mac, name = value.split(".", 2)
    server_key = server_key_of(request)
    if not expires.isdigit() or int(expires) < time.time() or not server_key:
        return None
    try:
        account = (await credentials_of(request).current()).operator_named(name)
    except SQLAlchemyError as exc:
        raise ApiError(
            503, "unavailable", "cannot read the operator accounts from the database; try again"
        ) from exc
    if account is None:
        return None
    if not key_matches(mac, _account_mac(account, purpose, int(expires), server_key)):
        return None
    return account
