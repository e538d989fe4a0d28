"""DKIM signatures (RFC 6376) of every message, with the shop's key.

With ``KAERU_DKIM_SELECTOR``, ``KAERU_DKIM_DOMAIN`` and ``KAERU_DKIM_PRIVATE_KEY`` set, each
message's final bytes are signed just before SMTP: rsa-sha256, relaxed/relaxed, ``h=`` over
From, To, Subject, Date, Message-ID and, on marketing messages, List-Unsubscribe and
List-Unsubscribe-Post. A retried send composes its message again (a new Date) and signs what it
sends, so every attempt's bytes carry their own valid signature.

The key is read when the worker starts (:class:`Signer`'s constructor): an unreadable or
wrong key file stops the worker with the fix, rather than failing the first send.
"""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kaeru.settings import Settings

#: The headers the signature covers, in ``h=`` order, when the message has them.
SIGNED_HEADERS = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
#: The smallest RSA key receivers accept (RFC 8301: at least 1024 bits, 2048 advised).
MIN_KEY_BITS = 1024


class DkimKeyError(RuntimeError):
    """``KAERU_DKIM_PRIVATE_KEY`` cannot be used; the message says why and what to do."""


def read_key(path: Path) -> bytes:
    """The PEM of the RSA private key at ``path``, checked.

    Raises:
        DkimKeyError: the file cannot be read, or holds no usable RSA private key.
    """
    fix = (
        "make a key with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "
        "dkim.pem`, publish its public half as <selector>._domainkey.<domain> (see the "
        "README), and point KAERU_DKIM_PRIVATE_KEY at the file; or unset the three "
        "KAERU_DKIM_* settings to send unsigned"
    )
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(
            f"KAERU_DKIM_PRIVATE_KEY={str(path)!r} cannot be read ({exc.strerror or exc}): {fix}"
        ) from None
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(
            f"KAERU_DKIM_PRIVATE_KEY={str(path)!r} is not an unencrypted PEM private key "
            f"({exc}): {fix}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise DkimKeyError(
            f"KAERU_DKIM_PRIVATE_KEY={str(path)!r} is not an RSA key (kaeru signs rsa-sha256, "
            f"which every receiver checks): {fix}"
        )
    if key.key_size < MIN_KEY_BITS:
        raise DkimKeyError(
            f"KAERU_DKIM_PRIVATE_KEY={str(path)!r} is a {key.key_size}-bit key; receivers "
            f"ignore signatures by keys under {MIN_KEY_BITS} bits: {fix}"
        )
    # PKCS#8 or traditional, dkimpy reads the traditional (PKCS#1) form.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


class Signer:
    """Signs messages with the configured DKIM key; :meth:`of` gives None when DKIM is off."""

    def __init__(self, selector: str, domain: str, key_pem: bytes) -> None:
        self.selector = selector.strip().encode()
        self.domain = domain.strip().encode()
        self.key_pem = key_pem

    @classmethod
    def of(cls, settings: Settings) -> Signer | None:
        """The signer of ``settings``, its key read now; None without the DKIM settings.

        Raises:
            DkimKeyError: the key file is unreadable or unusable.
        """
        if settings.dkim_private_key is None:
            return None
        key = read_key(settings.dkim_private_key)
        return cls(settings.dkim_selector, settings.dkim_domain, key)

    def sign(self, message: bytes) -> bytes:
        """``message`` (CRLF line ends, as SMTP sends it) with its DKIM-Signature prepended."""
        present = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(message)
        headers = [name.encode() for name in SIGNED_HEADERS if name in present]
        signature: bytes = dkim.sign(
            message,
            self.selector,
            self.domain,
            self.key_pem,
            include_headers=headers,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=b"rsa-sha256",
            linesep=b"\r\n",
        )
        return signature + message
