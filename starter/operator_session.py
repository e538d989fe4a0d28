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

from kaeru.credentials import BOOTSTRAP, OPERATOR, Account
from kaeru.settings import Settings
from starter.deps import credentials_of, key_matches

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
# An account's cookie names it and is signed with its token's SHA-256 (the server keeps no
# token): ``<expiry>.<mac>.<name>``. Revoking the account ends its cookies within
# KAERU_CREDENTIALS_CACHE_TTL; a reader of the database could forge one, but such a reader
# already reads all the dashboard shows.


def _account_mac(account: Account, purpose: str, expires: int) -> str:
    message = f"{purpose}:{account.name}:{expires}".encode()
    return hmac.new(account.token_hash.encode(), message, hashlib.sha256).hexdigest()


def account_cookie(account: Account, purpose: str, now: float | None = None) -> str:
    """The cookie value of a sign-in with an account's token (``KAERU_OPERATOR_TOKEN``'s is
    :func:`session_cookie`)."""
    if not account.token_hash:
        raise ValueError("the bootstrap operator signs in with session_cookie")
    expires = int((now or time.time()) + SESSION_TTL)
    return f"{expires}.{_account_mac(account, purpose, expires)}.{account.name}"


async def signed_in_as(
    request: Request, settings: Settings, cookie: str, purpose: str
) -> Account | None:
    """The operator of an unexpired cookie: the bootstrap one or an unrevoked account."""
    value = request.cookies.get(cookie, "")
    if value.count(".") < 2:
        bootstrap = signed_in(request, settings, cookie, purpose)
        return Account(BOOTSTRAP, OPERATOR) if bootstrap else None
    expires, mac, name = value.split(".", 2)
    if not expires.isdigit() or int(expires) < time.time():
        return None
    account = (await credentials_of(request).current()).operator_named(name)
    if account is None or not key_matches(mac, _account_mac(account, purpose, int(expires))):
        return None
    return account
