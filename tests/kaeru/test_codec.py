"""The payload codec (kaeru/codec.py): a data key per customer, wrapped by the master key.

Real databases (SQLite and PostgreSQL) and a real time-skipping Temporal server: a journey
runs with the codec on and its stored history is read raw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from sqlmodel import select
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.client import WorkflowHistory
from temporalio.converter import WorkflowSerializationContext
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from kaeru.codec import (
    ENCODING,
    ERASED_METADATA,
    ERASED_TEXT,
    KEY_METADATA,
    CodecKeyError,
    CustomerCodec,
    KeyStore,
    codec_for,
    customer_of_workflow,
    key_store,
    master_keys,
    shred,
)
from kaeru.db import migrate, session
from kaeru.models import Customer, CustomerKey
from kaeru.settings import Settings
from kaeru.temporal import connect, converter
from tests.conftest import make_settings
from tests.kaeru.test_cli import assert_clear_failure, clean_environment, kaeru
from tests.support.codec import CodecEnv, as_text, codec_client, history_payloads, new_master_key
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import DAY, SHOE, Shopper
from worker import PASSTHROUGH, build_worker, workflows
from workflows.cart_abandonment import CartAbandonment

__all__ = ["clean_environment"]  # the CLI tests' fixture: no KAERU_ variable leaks in

KINDS = ("cart-abandonment", "cart", "welcome")
CART_JOURNEY = "cart-abandonment-c-42"


def context(workflow_id: str) -> WorkflowSerializationContext:
    return WorkflowSerializationContext(namespace="default", workflow_id=workflow_id)


def codec(settings: Settings) -> CustomerCodec:
    found = codec_for(settings, KINDS)
    assert found is not None
    return found


def clear(value: Any) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def with_key(database_url: str, key: str, previous: str | None = None) -> Settings:
    return make_settings(database_url, codec_master_key=key, codec_master_key_previous=previous)


# ---- settings ---------------------------------------------------------------------------------


def test_codec_is_off_without_a_master_key(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url)
    assert codec_for(settings, KINDS) is None
    assert converter(settings).payload_codec is None


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode()])
def test_a_master_key_must_be_32_bytes_of_base64(sqlite_url: str, value: str) -> None:
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        make_settings(sqlite_url, codec_master_key=value)


def test_the_workflow_id_names_the_customer() -> None:
    customer_of = customer_of_workflow(KINDS)
    assert customer_of("cart-abandonment-c-42") == "c-42"  # the longest kind wins over "cart"
    assert customer_of("cart-me@shop.test") == "me@shop.test"
    assert customer_of("kaeru-audience-sweeper") is None
    assert customer_of("welcome-") is None


# ---- encode and decode ------------------------------------------------------------------------


async def test_a_journeys_payload_is_encrypted_and_decodes(database_url: str) -> None:
    payload = clear({"email": "ann@shop.test"})
    settings = with_key(database_url, new_master_key())
    journey = codec(settings).with_context(context(CART_JOURNEY))

    [sealed] = await journey.encode([payload])

    assert sealed.metadata["encoding"] == ENCODING
    assert b"ann@shop.test" not in sealed.data
    with session(database_url) as s:
        row = s.get(CustomerKey, "c-42")
    assert row is not None and sealed.metadata[KEY_METADATA] == row.key_id.encode()
    assert row.wrapped_key is not None and row.key_version is not None
    assert await journey.decode([sealed]) == [payload]
    # No context decodes it too (the key id is in the payload): the codec server has none.
    assert await codec(settings).decode([sealed]) == [payload]


async def test_one_key_per_customer(sqlite_url: str) -> None:
    settings = with_key(sqlite_url, new_master_key())
    first = codec(settings).with_context(context("cart-abandonment-c-1"))
    second = codec(settings).with_context(context("welcome-c-1"))
    other = codec(settings).with_context(context("welcome-c-2"))
    [a], [b], [c] = [await x.encode([clear(1)]) for x in (first, second, other)]
    assert a.metadata[KEY_METADATA] == b.metadata[KEY_METADATA] != c.metadata[KEY_METADATA]


async def test_what_it_did_not_encode_passes_through(sqlite_url: str) -> None:
    settings = with_key(sqlite_url, new_master_key())
    payload = clear({"cart": ["shoe"]})
    # A clear payload (a journey from before the codec was on) decodes as it is.
    assert await codec(settings).with_context(context(CART_JOURNEY)).decode([payload]) == [payload]
    # Not a journey, or no context at all: nothing to know the customer by, sent in clear.
    sweeper = codec(settings).with_context(context("kaeru-audience-sweeper"))
    assert await sweeper.encode([payload]) == [payload]
    assert await codec(settings).encode([payload]) == [payload]


async def test_a_payload_under_an_unknown_key_is_an_error(sqlite_url: str) -> None:
    sealed = Payload(metadata={"encoding": ENCODING, KEY_METADATA: b"feedface"}, data=b"x" * 40)
    with pytest.raises(CodecKeyError, match="KAERU_DATABASE_URL"):
        await codec(with_key(sqlite_url, new_master_key())).decode([sealed])


async def test_a_wrong_master_key_names_the_fix(sqlite_url: str) -> None:
    [sealed] = (
        await codec(with_key(sqlite_url, new_master_key()))
        .with_context(context(CART_JOURNEY))
        .encode([clear(1)])
    )
    with pytest.raises(CodecKeyError, match="KAERU_CODEC_MASTER_KEY_PREVIOUS"):
        await codec(with_key(sqlite_url, new_master_key())).decode([sealed])


async def test_an_altered_payload_does_not_decode(sqlite_url: str) -> None:
    journey = codec(with_key(sqlite_url, new_master_key())).with_context(context(CART_JOURNEY))
    [sealed] = await journey.encode([clear(1)])
    sealed.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    with pytest.raises(CodecKeyError, match="altered"):
        await journey.decode([sealed])


# ---- crypto-shredding and the caches ------------------------------------------------------------


async def test_an_erased_key_decodes_to_a_placeholder(database_url: str) -> None:
    settings = with_key(database_url, new_master_key())
    journey = codec(settings).with_context(context(CART_JOURNEY))
    [sealed] = await journey.encode([clear({"email": "ann@shop.test"})])
    with session(database_url) as s:
        key_id = shred(s, "c-42")
    assert key_id is not None
    journey.keys.forget("c-42", key_id)

    [erased] = await journey.decode([sealed])

    assert json.loads(erased.data) == ERASED_TEXT
    assert erased.metadata[ERASED_METADATA] == key_id.encode()
    with session(database_url) as s:
        rows = s.exec(select(CustomerKey)).all()
    # The tombstone keeps no key and no customer id.
    assert [(r.customer_id, r.wrapped_key, r.erased_at is not None) for r in rows] == [
        (f"erased-{key_id}", None, True)
    ]
    # The customer comes back: a new key, and the old payloads stay unreadable.
    [again] = await journey.encode([clear(2)])
    assert again.metadata[KEY_METADATA] != key_id.encode()
    assert await journey.decode([again]) == [clear(2)]


async def test_other_processes_stop_using_an_erased_key_within_the_ttl(sqlite_url: str) -> None:
    settings = with_key(sqlite_url, new_master_key())
    masters = master_keys(settings)
    assert masters is not None
    customer_of = customer_of_workflow(KINDS)
    erasing = CustomerCodec(KeyStore(sqlite_url, masters), customer_of, "c-42")
    # Another process (a worker) that has the key cached.
    other = CustomerCodec(KeyStore(sqlite_url, masters, ttl=0.5), customer_of, "c-42")
    [sealed] = await other.encode([clear(1)])
    with session(sqlite_url) as s:
        shred(s, "c-42")

    assert await erasing.decode([sealed]) != [clear(1)]  # at once where the erase ran
    assert await other.decode([sealed]) == [clear(1)]  # still cached over there...
    await asyncio.sleep(0.6)
    [erased] = await other.decode([sealed])  # ...but only until the TTL ends
    assert ERASED_METADATA in erased.metadata


def test_the_cache_is_bounded(sqlite_url: str) -> None:
    masters = master_keys(with_key(sqlite_url, new_master_key()))
    assert masters is not None
    keys = KeyStore(sqlite_url, masters, size=3)
    for n in range(5):
        keys.key_for(f"c-{n}")
    assert [keys.cached_for_customer(f"c-{n}") is not None for n in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


# ---- rotation ---------------------------------------------------------------------------------


async def test_rotation_keeps_old_payloads_readable(database_url: str) -> None:
    old, new = new_master_key(), new_master_key()
    journey = codec(with_key(database_url, old)).with_context(context(CART_JOURNEY))
    [sealed] = await journey.encode([clear("before the rotation")])

    rotating = codec(with_key(database_url, new, previous=old))
    # During the grace period: the old key still unwraps.
    assert await rotating.decode([sealed]) == [clear("before the rotation")]
    assert rotating.keys.rotate() == 1
    assert rotating.keys.rotate() == 0  # idempotent

    # After it, the new key alone reads the old payloads; the old key alone no longer does.
    assert await codec(with_key(database_url, new)).decode([sealed]) == [
        clear("before the rotation")
    ]
    key_store.cache_clear()  # a process started with the old key alone
    with pytest.raises(CodecKeyError):
        await codec(with_key(database_url, old)).decode([sealed])


# ---- a journey with the codec on --------------------------------------------------------------


@pytest.fixture
async def codec_shopper(time_skipping_env: WorkflowEnvironment, sqlite_url: str) -> Any:
    async with SMTPTestServer() as smtp:
        settings = make_settings(sqlite_url, smtp_port=smtp.port, codec_master_key=new_master_key())
        client = codec_client(time_skipping_env.client, settings)
        env = cast(WorkflowEnvironment, CodecEnv(time_skipping_env, client))
        async with httpx.AsyncClient() as http, build_worker(client, settings, http):
            shopper = Shopper(env, sqlite_url, smtp, settings.task_queue)
            with session(sqlite_url) as s:
                s.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
            yield shopper, settings
            with contextlib.suppress(RPCError):
                await shopper.handle.terminate("test over")


async def test_a_journey_runs_with_the_codec_and_its_history_is_encrypted(
    codec_shopper: tuple[Shopper, Settings], time_skipping_env: WorkflowEnvironment
) -> None:
    shopper, settings = codec_shopper
    await shopper.cart("Product Added", **SHOE)
    await shopper.skip(DAY + 60)
    [email] = await shopper.wait_for_emails(1)
    assert "Trail Shoe" in email.get_body(("plain",)).get_content()
    await shopper.purchase("o-9")
    assert await shopper.outcome() == "purchased"
    assert (await shopper.status()).step == "ended"  # a query decodes too

    # Raw, as Temporal stores it (a client without the codec).
    raw = time_skipping_env.client.get_workflow_handle(shopper.journey_id)
    history = await raw.fetch_history()
    payloads = history_payloads(history)
    assert len(payloads) > 10
    clear_ones = [path for path, p in payloads if p.metadata.get("encoding") != ENCODING]
    assert clear_ones == []
    text = as_text(payloads)
    for secret in (shopper.email.encode(), b"Trail Shoe", b"o-9", shopper.customer_id.encode()):
        assert secret not in text
    # The same history through the codec reads as it was.
    decoded = await converter(settings).payload_codec.decode(  # type: ignore[union-attr]
        [p for _, p in payloads]
    )
    assert b"Trail Shoe" in b"".join(p.data for p in decoded)


HISTORIES = sorted((Path(__file__).parents[1] / "replay" / "histories").glob("*.json"))


@pytest.mark.parametrize("path", HISTORIES[:: max(1, len(HISTORIES) // 8)], ids=lambda p: p.stem)
async def test_a_stored_clear_history_replays_with_the_codec_on(
    path: Path, sqlite_url: str
) -> None:
    workflow_id = path.stem.partition("@")[2] or path.stem
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
        data_converter=converter(with_key(sqlite_url, new_master_key())),
    )
    await replayer.replay_workflow(WorkflowHistory.from_json(workflow_id, path.read_text()))


def test_every_kind_is_known_to_the_codec() -> None:
    """The codec finds the kinds itself (disabled journeys may still be running)."""
    found = converter(make_settings("sqlite://", codec_master_key=new_master_key())).payload_codec
    assert isinstance(found, CustomerCodec)
    assert found.customer_of(f"{CartAbandonment.kind}-c-1") == "c-1"


async def test_every_client_connects_with_the_codec(
    time_skipping_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    """The worker, the router and the CLI connect through kaeru.temporal.connect."""
    address = time_skipping_env.client.service_client.config.target_host
    on = await connect(with_key(sqlite_url, new_master_key()), address)
    off = await connect(make_settings(sqlite_url), address)
    assert isinstance(on.data_converter.payload_codec, CustomerCodec)
    assert off.data_converter.payload_codec is None


# ---- kaeru codec rotate -----------------------------------------------------------------------


def test_cli_rotate_rewraps_every_key(tmp_path: Path, clean_environment: None) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    old, new = new_master_key(), new_master_key()
    masters = master_keys(with_key(url, old))
    assert masters is not None
    for n in range(3):
        KeyStore(url, masters).key_for(f"c-{n}")

    result = kaeru(
        "codec",
        "rotate",
        KAERU_DATABASE_URL=url,
        KAERU_CODEC_MASTER_KEY=new,
        KAERU_CODEC_MASTER_KEY_PREVIOUS=old,
    )

    assert result.exit_code == 0, result.output
    assert "Rewrapped 3 data key(s)" in result.stdout
    renewed = master_keys(with_key(url, new))
    assert renewed is not None
    with session(url) as s:
        assert {row.key_version for row in s.exec(select(CustomerKey))} == {renewed.version}
    KeyStore(url, renewed).key_for("c-0")  # the new key alone unwraps them now


def test_cli_rotate_needs_the_old_key(tmp_path: Path, clean_environment: None) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    migrate(url)
    masters = master_keys(with_key(url, new_master_key()))
    assert masters is not None
    KeyStore(url, masters).key_for("c-0")

    no_key = kaeru("codec", "rotate", KAERU_DATABASE_URL=url)
    assert_clear_failure(no_key, "KAERU_CODEC_MASTER_KEY is unset")
    wrong = kaeru(
        "codec", "rotate", KAERU_DATABASE_URL=url, KAERU_CODEC_MASTER_KEY=new_master_key()
    )
    assert_clear_failure(wrong, "KAERU_CODEC_MASTER_KEY_PREVIOUS")
    bad = kaeru("codec", "rotate", KAERU_DATABASE_URL=url, KAERU_CODEC_MASTER_KEY="short")
    assert_clear_failure(bad, "KAERU_CODEC_MASTER_KEY", "32 bytes")
    assert "short" not in bad.stderr  # a secret is never echoed


async def test_a_failures_message_is_encrypted_too(sqlite_url: str) -> None:
    """An activity's error may name the customer ("no email address for ..."): with the codec,
    its message and stack trace travel encrypted in the failure's encoded attributes."""
    converter_on = converter(with_key(sqlite_url, new_master_key()))
    journey = converter_on.with_context(context(CART_JOURNEY))
    failure = Failure()

    await journey.encode_failure(ApplicationError("no email address for ann@shop.test"), failure)

    assert "ann@shop.test" not in failure.message
    assert failure.encoded_attributes.metadata["encoding"] == ENCODING
    decoded = await journey.decode_failure(failure)
    assert "ann@shop.test" in str(decoded)
