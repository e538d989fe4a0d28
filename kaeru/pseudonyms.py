"""Keyed pseudonyms of customer ids where Temporal shows them in clear.

Workflow ids, search attributes and memo are never encrypted by the payload codec, and a
journey's customer id is in all three. Many shops use the email address (or a phone number)
as ``userId``: such an id would stay readable in Temporal's visibility store after an erase.
So a journey shows its *visible id* there: the customer id itself, or ``p_`` and 32 hex digits
(128 bits) of HMAC-SHA256 of it under the app's pseudonym key (``app_secrets``), as
``KAERU_PSEUDONYMOUS_IDS`` says:

* ``auto`` (the default): ids that look like personal data (an email address, a phone
  number) and ids that look like a pseudonym themselves (so a clear id can never be mistaken
  for, or collide with, someone's pseudonym) are pseudonymised; the rest stays clear.
* ``always``: every id is pseudonymised.
* ``never``: every id stays clear.

The workflow's input and payloads still carry the clear customer id (the codec encrypts them
when it is on): the pseudonym only makes visibility unreadable, it does not hide payloads.

:func:`visible_customer_id` and the rest of this module are pure (no I/O); only
:func:`pseudonym_key` and :func:`read_visible_ids` read the key from the database.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

from sqlmodel import Session

from kaeru.db import session as db_session
from kaeru.settings import Settings
from kaeru.tracking_tokens import generated_secret

AUTO = "auto"
ALWAYS = "always"
NEVER = "never"
Mode = Literal["auto", "always", "never"]
MODES = (AUTO, ALWAYS, NEVER)

#: The app secret that keys every pseudonym of a customer id (erase's ``anon-`` ones too).
PSEUDONYM_SECRET = "customer-pseudonym-key"
#: Where a visible id starts when it is a pseudonym.
PREFIX = "p_"
#: Hex digits of the HMAC kept: 128 bits, no collision among any shop's customers.
DIGITS = 32
#: Keeps these pseudonyms apart from erase's ``anon-`` ones made with the same key.
_DOMAIN = b"kaeru-visible-customer-id\0"

_PSEUDONYM = re.compile(rf"{PREFIX}[0-9a-f]{{{DIGITS}}}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_PHONE_SEPARATORS = re.compile(r"[\s\-.()/]")
_PHONE = re.compile(r"\+?\d{7,15}")
_SUFFIX = re.compile(rf"-{PREFIX}[0-9a-f]{{{DIGITS}}}\Z")


def pseudonym_key(s: Session) -> bytes:
    """The app's pseudonym key: generated once and kept in ``app_secrets``. May commit."""
    return generated_secret(s, PSEUDONYM_SECRET)


def read_visible_ids(settings: Settings) -> VisibleIds:
    """How journeys show customer ids under ``settings`` (``KAERU_PSEUDONYMOUS_IDS``, the
    pseudonym key from its database). Blocking; may commit (the key's first use)."""
    with db_session(settings.resolved_database_url) as s:
        return VisibleIds(pseudonym_key(s), settings.pseudonymous_ids)


def is_pseudonym(value: str) -> bool:
    """Whether ``value`` has the shape of a visible id that is a pseudonym."""
    return _PSEUDONYM.fullmatch(value) is not None


def looks_personal(customer_id: str) -> bool:
    """Whether ``auto`` pseudonymises ``customer_id``: an email address, a phone number, or
    an id shaped like a pseudonym.

    A phone number is 7 to 15 digits that start with ``+`` or ``0`` or are written with
    separators (spaces, dashes, dots, brackets): a bare run of digits is a database's id
    (Shopify's customer ids are 13 digits) and stays clear.
    """
    if _EMAIL.fullmatch(customer_id) or is_pseudonym(customer_id):
        return True
    digits = _PHONE_SEPARATORS.sub("", customer_id)
    if _PHONE.fullmatch(digits) is None:
        return False
    return digits[0] in "+0" or digits != customer_id


def pseudonym_of(customer_id: str, key: bytes) -> str:
    """The pseudonym of ``customer_id`` under ``key`` (whatever the mode)."""
    digest = hmac.new(key, _DOMAIN + customer_id.encode(), hashlib.sha256).hexdigest()
    return PREFIX + digest[:DIGITS]


def visible_customer_id(customer_id: str, key: bytes, mode: str) -> str:
    """What Temporal shows of ``customer_id`` (workflow id, search attribute, memo).

    Raises:
        ValueError: ``mode`` is not ``auto``, ``always`` or ``never``.
    """
    if mode == NEVER:
        return customer_id
    if mode == ALWAYS or (mode == AUTO and looks_personal(customer_id)):
        return pseudonym_of(customer_id, key)
    if mode == AUTO:
        return customer_id
    raise ValueError(f"pseudonymous ids mode {mode!r} is not one of auto, always or never")


def journey_kind(journey_id: str, customer_id: str) -> str:
    """The kind of the journey ``journey_id`` of ``customer_id``: its id is ``<kind>-<customer
    id>`` or ``<kind>-<pseudonym>``; empty if it is neither."""
    suffix = f"-{customer_id}"
    if journey_id.endswith(suffix) and len(journey_id) > len(suffix):
        return journey_id.removesuffix(suffix)
    found = _SUFFIX.search(journey_id)
    return journey_id[: found.start()] if found is not None and found.start() > 0 else ""


@dataclass(frozen=True)
class VisibleIds:
    """The pseudonym key and ``KAERU_PSEUDONYMOUS_IDS``: what a process needs to name
    journeys in Temporal."""

    key: bytes
    mode: str = AUTO

    def visible(self, customer_id: str) -> str:
        """The id new journeys of ``customer_id`` show (:func:`visible_customer_id`)."""
        return visible_customer_id(customer_id, self.key, self.mode)

    def workflow_ids(self, kind: str, customer_id: str) -> tuple[str, str | None]:
        """``(new, before)``: the workflow id a new journey of ``kind`` gets, and the clear one
        a journey started before its id was pseudonymised may still run under (None when the
        customer id stays clear)."""
        visible = self.visible(customer_id)
        clear = f"{kind}-{customer_id}"
        return f"{kind}-{visible}", (clear if visible != customer_id else None)

    def every_id(self, customer_id: str) -> list[str]:
        """Every id ``customer_id``'s journeys may show, whatever the mode was when they
        started: the id itself and its pseudonym (erase and export look under both)."""
        return [customer_id, pseudonym_of(customer_id, self.key)]
