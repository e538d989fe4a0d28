"""Email addresses: the stored recipient, the forms suppressions use, and masking for histories.

Nothing kaeru puts into a workflow history (results, error messages) holds a full address:
:func:`mask_address` shows ``a***@example.com`` instead.
"""

from __future__ import annotations

import hashlib
import re
from email.utils import parseaddr

from aiosmtplib.email import quote_address
from sqlmodel import Session

from kaeru.models import Customer

#: RFC 5321's limit on a forward path, less its angle brackets.
MAX_ADDRESS = 254

# Anything that looks like an address, in a server's reply or an error message.
_ADDRESS = re.compile(r"[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+")


def recipient_address(session: Session, customer_id: str) -> str:
    """The address a message to ``customer_id`` goes to (as last identified), or ``""``."""
    customer = session.get(Customer, customer_id)
    return ((customer.email if customer else None) or "").strip()


def normalise_address(address: str) -> str:
    """The form of an address that suppressions are keyed and looked up by."""
    return address.strip().lower()


def mask_address(address: str) -> str:
    """``alice@example.com`` as ``a***@example.com``: what histories and errors may show."""
    local, at, domain = normalise_address(address).rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


def scrub(text: str) -> str:
    """``text`` with every address in it masked (a server's reply may quote the recipient)."""
    return _ADDRESS.sub(lambda m: mask_address(m.group(0)), text)


def message_id_for(key: str, mail_from: str) -> str:
    """The ``Message-ID`` of the message with idempotency key ``key``: the same on every try."""
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "kaeru.localhost"
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@{domain}>"


def unusable_because(address: str) -> str | None:
    """Why SMTP cannot carry ``address`` exactly as stored, or None when it can."""
    if not address.isascii():
        return "non-ASCII addresses need SMTPUTF8, which kaeru lacks"
    if len(address) > MAX_ADDRESS:
        return f"longer than {MAX_ADDRESS} characters"
    try:
        quoted = quote_address(address)
    except ValueError as exc:  # characters no SMTP mailbox may hold
        return str(exc)
    if quoted != f"<{address}>":
        # "root,victim@example.com" would go to <root>, the To header to both.
        return "SMTP would read it as another address"
    return None
