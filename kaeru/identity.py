"""Who an event is about, and when two ids may become one customer: the rules, without I/O.

An ``identify`` naming both a ``userId`` and an ``anonymousId`` merges the anonymous id into
the user: later events that carry only the anonymous id are the user's. The browser key is
public (anyone can name any customer with it), so a merge through it may never move what a
known customer has (their email, their history) to another address: it may merge an
anonymous id only into a user that has no email address yet, and never an anonymous id that
already belongs to another user. The server key is the shop itself: its merges always hold.
Pure, so workflow code may import it inside the sandbox.
"""

from __future__ import annotations

from typing import Any

from email_validator import EmailNotValidError, validate_email
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

#: ApplicationError type of a message or audience step for a customer without an address.
NO_EMAIL_ADDRESS = "NoEmailAddress"

#: What ingestion stores for the anonymous id of a merge (properties ``{"into": userId}``):
#: the anonymous id's journeys end (outcome ``merged``).
IDENTITY_MERGED = "Identity Merged"


#: How the message ids of a merge's events begin (reserved: a sender may not use it).
MERGE_ID_PREFIX = "merge:"


def merge_id(identify_message_id: str, part: str) -> str:
    """The message id of an event a merge stores: deterministic, so a resent identify (the
    same messageId) merges once."""
    return f"{MERGE_ID_PREFIX}{identify_message_id}:{part}"


def merge_refusal(
    *, trusted: bool, already_into: str | None, into: str, into_has_email: bool
) -> str | None:
    """Why an ``identify`` may not merge its anonymous id into ``into``; None if it may.

    Args:
        trusted: the identify came with the server key.
        already_into: the user the anonymous id was merged into before (None: never).
        into: the identify's ``userId``.
        into_has_email: that user already has an email address.
    """
    if trusted:
        return None
    if already_into is not None and already_into != into:
        return (
            "not merged: this anonymousId already belongs to another customer, and the "
            "browser key may not move it; send the identify with the server write key"
        )
    if into_has_email:
        return (
            "not merged: the userId already has an email address, and the browser key may "
            "not move an anonymous shopper's history to a known customer; send the identify "
            "with the server write key"
        )
    return None


# ---- email addresses ---------------------------------------------------------------------------


def _validated(value: Any) -> Any:
    if not isinstance(value, str):
        raise EmailNotValidError("it is not a string")
    # A strict addr-spec: no display name, no quoted local part, no IP literal, no list.
    return validate_email(value.strip(), check_deliverability=False)


def email_problem(value: Any) -> str | None:
    """Why ``value`` is not a single deliverable-looking address, or None if it is one."""
    try:
        _validated(value)
    except EmailNotValidError as exc:
        return str(exc)
    return None


def normalise_email(value: Any) -> str | None:
    """The address in normal form (domain in lower case), or None if it is not one (no DNS)."""
    try:
        normalized: str = _validated(value).normalized
    except EmailNotValidError:
        return None
    return normalized


def email_key(address: str) -> str:
    """The form addresses are matched by (suppressions, ad audiences' SHA-256): trimmed and
    lower-cased, so ``Ann@Example.com`` and ``ann@example.com `` are one person."""
    return address.strip().lower()


def no_email_address(customer_id: str, what: str) -> ApplicationError:
    """The non-retryable error of a step that needs the customer's address and has none.

    Args:
        customer_id: the customer.
        what: what could not be done, e.g. ``"the cart_email email cannot be sent"``.
    """
    return ApplicationError(
        f"customer {customer_id!r} has no known email address, so {what}; send an identify "
        "call with traits.email for this customer",
        type=NO_EMAIL_ADDRESS,
        non_retryable=True,
        # An expected end (a guest order, a shopper never identified), not a fault: the
        # worker logs it at DEBUG, without a traceback, and metrics do not count it failed.
        category=ApplicationErrorCategory.BENIGN,
    )
