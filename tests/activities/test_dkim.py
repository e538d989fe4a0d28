"""DKIM (RFC 6376): every message signed with the shop's key, verified with ``dkim.verify`` on
the bytes the loopback SMTP server received, against the public key (no DNS: the record is
answered by the test)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import dkim
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.email import EmailActivities
from activities.email.signature import DkimKeyError
from activities.types import SendEmailInput
from kaeru.settings import Settings
from tests.activities.factories import add_customer
from tests.activities.test_email import request
from tests.activities.test_email_headers import order_confirmation
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from worker import activities_for

SELECTOR = "k2026"
DOMAIN = "shop.example"
RECORD_NAME = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def key_file(tmp_path: Path, key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "dkim.pem"
    path.write_bytes(  # PKCS#8, as `openssl genpkey` writes it
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def dns_record(key: rsa.RSAPrivateKey) -> bytes:
    """The TXT record a shop publishes at ``<selector>._domainkey.<domain>``."""
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def verifies(message: bytes, key: rsa.RSAPrivateKey) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == RECORD_NAME
        return dns_record(key)

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def signature_tags(message: bytes) -> dict[str, str]:
    header = re.search(rb"^DKIM-Signature:(.*?)\r\n(?! )", message, re.S | re.M)
    assert header is not None
    text = re.sub(r"\s+", "", header.group(1).decode())
    return dict(tag.split("=", 1) for tag in text.split(";") if tag)


def signing_settings(url: str, port: int, key_file: Path, **more: object) -> Settings:
    return make_settings(
        url,
        smtp_port=port,
        mail_from=f"Kaeru Shop <news@{DOMAIN}>",
        dkim_selector=SELECTOR,
        dkim_domain=DOMAIN,
        dkim_private_key=str(key_file),
        **more,
    )


async def received(settings: Settings, email: SendEmailInput, server: SMTPTestServer) -> bytes:
    await ActivityEnvironment().run(EmailActivities(settings).send_email, email)
    return server.messages[-1].data


async def test_a_marketing_email_is_signed_and_verifies_as_received(
    database_url: str, smtp_server: SMTPTestServer, key_file: Path, key: rsa.RSAPrivateKey
) -> None:
    settings = signing_settings(database_url, smtp_server.port, key_file)
    add_customer(database_url, "c1", "alice@example.com")
    data = await received(settings, request(), smtp_server)

    assert data.startswith(b"DKIM-Signature:")
    assert verifies(data, key)
    tags = signature_tags(data)
    assert (tags["v"], tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "1",
        "rsa-sha256",
        "relaxed/relaxed",
        DOMAIN,
        SELECTOR,
    )
    assert tags["h"].split(":") == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ]


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"\r\nSubject: You left 2 items", b"\r\nSubject: You left 3 items"),
        (
            b"\r\nList-Unsubscribe: <http://kaeru.test/u/",
            b"\r\nList-Unsubscribe: <http://evil.test/u/",
        ),
        (b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click", b"\r\nList-Unsubscribe-Post: x"),
        (b"\r\nTo: alice@example.com", b"\r\nTo: bob@example.com"),
        (b"Frog mug", b"Toad mug"),  # the body
    ],
)
async def test_a_signature_fails_once_a_signed_header_or_the_body_is_altered(
    sqlite_url: str,
    smtp_server: SMTPTestServer,
    key_file: Path,
    key: rsa.RSAPrivateKey,
    before: bytes,
    after: bytes,
) -> None:
    settings = signing_settings(sqlite_url, smtp_server.port, key_file)
    add_customer(sqlite_url, "c1", "alice@example.com")
    data = await received(settings, request(), smtp_server)
    assert before in data
    assert not verifies(data.replace(before, after, 1), key)


async def test_a_transactional_email_is_signed_too(
    database_url: str, smtp_server: SMTPTestServer, key_file: Path, key: rsa.RSAPrivateKey
) -> None:
    settings = signing_settings(database_url, smtp_server.port, key_file)
    add_customer(database_url, "c1", "alice@example.com")
    data = await received(settings, order_confirmation(), smtp_server)
    assert verifies(data, key)
    assert signature_tags(data)["h"].split(":") == ["from", "to", "subject", "date", "message-id"]


async def test_a_retried_send_is_signed_again_and_each_attempt_verifies(
    sqlite_url: str, smtp_server: SMTPTestServer, key_file: Path, key: rsa.RSAPrivateKey
) -> None:
    settings = signing_settings(sqlite_url, smtp_server.port, key_file)
    add_customer(sqlite_url, "c1", "alice@example.com")
    smtp_server.reject_data(451)
    with pytest.raises(ApplicationError):
        await received(settings, request(), smtp_server)
    data = await received(settings, request(), smtp_server)
    [refused] = smtp_server.refused_messages
    assert verifies(refused.data, key) and verifies(data, key)


async def test_a_message_with_non_ascii_text_is_sent_7_bit_clean_and_verifies(
    sqlite_url: str, smtp_server: SMTPTestServer, key_file: Path, key: rsa.RSAPrivateKey
) -> None:
    """A relay without 8BITMIME would recode an 8-bit body on the way, breaking the signature:
    the message leaves quoted-printable."""
    settings = signing_settings(sqlite_url, smtp_server.port, key_file, shop_name="Grenouille Café")
    add_customer(sqlite_url, "c1", "alice@example.com")
    data = await received(settings, request(), smtp_server)
    assert data.isascii()
    assert verifies(data, key)
    text = smtp_server.messages[-1].message.get_body(("plain",))
    assert text is not None and "Grenouille Café" in text.get_content()


async def test_without_dkim_settings_nothing_is_signed(
    sqlite_url: str, smtp_server: SMTPTestServer
) -> None:
    settings = make_settings(sqlite_url, smtp_port=smtp_server.port)
    add_customer(sqlite_url, "c1", "alice@example.com")
    assert b"DKIM-Signature" not in await received(settings, request(), smtp_server)


async def test_an_unreadable_key_stops_the_worker_at_start(sqlite_url: str, tmp_path: Path) -> None:
    missing = signing_settings(sqlite_url, 25, tmp_path / "nowhere.pem")
    async with httpx.AsyncClient() as http:
        with pytest.raises(DkimKeyError, match=r"nowhere\.pem.*cannot be read.*openssl genpkey"):
            activities_for(missing, http)  # what worker.build_worker calls first
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")
    with pytest.raises(DkimKeyError, match="not an unencrypted PEM private key"):
        EmailActivities(signing_settings(sqlite_url, 25, garbage))
    elliptic = tmp_path / "ec.pem"
    elliptic.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(DkimKeyError, match="not an RSA key"):
        EmailActivities(signing_settings(sqlite_url, 25, elliptic))


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"KAERU_DKIM_SELECTOR": SELECTOR}, "KAERU_DKIM_DOMAIN and KAERU_DKIM_PRIVATE_KEY are"),
        ({"KAERU_DKIM_SELECTOR": SELECTOR, "KAERU_DKIM_DOMAIN": DOMAIN}, "PRIVATE_KEY is"),
        ({"KAERU_DKIM_DOMAIN": DOMAIN, "KAERU_DKIM_PRIVATE_KEY": "k.pem"}, "SELECTOR is"),
    ],
)
def test_a_partial_dkim_setting_is_an_error_naming_the_missing_one(
    monkeypatch: pytest.MonkeyPatch, given: dict[str, str], missing: str
) -> None:
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=f"{missing} missing"):
        Settings(_env_file=None)


def test_all_three_dkim_settings_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAERU_DKIM_SELECTOR", SELECTOR)
    monkeypatch.setenv("KAERU_DKIM_DOMAIN", DOMAIN)
    monkeypatch.setenv("KAERU_DKIM_PRIVATE_KEY", "/etc/kaeru/dkim.pem")
    settings = Settings(_env_file=None)
    assert settings.dkim_enabled and settings.dkim_private_key == Path("/etc/kaeru/dkim.pem")
    monkeypatch.setenv("KAERU_DKIM_PRIVATE_KEY", "")
    with pytest.raises(ValidationError, match="PRIVATE_KEY is missing"):
        Settings(_env_file=None)
