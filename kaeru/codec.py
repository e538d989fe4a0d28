"""The payload codec: every customer's Temporal payloads encrypted with a key of their own.

Temporal keeps workflow histories (inputs, signals, activity results: names, addresses, carts)
until the namespace's retention. With ``KAERU_CODEC_MASTER_KEY`` set, every payload of a
journey is encrypted with AES-256-GCM under its customer's data key before it leaves the
process, and the data key lives only in our database (``customer_keys``), wrapped by the
master key. Erasing a customer deletes that key (crypto-shredding, :func:`shred`): their
payloads in Temporal can no longer be read by anyone. The row stays as a tombstone without
key or customer id, so such a payload reads as "erased" rather than as an unknown key (which
means another database: an error naming KAERU_DATABASE_URL).

Memo, static summaries and failures' messages go through the codec too (encrypted);
workflow ids and search attributes never do: they hold the customer's visible id in clear
(the id itself, or a keyed pseudonym of an id that is personal data: kaeru/pseudonyms.py).

Which customer a payload belongs to comes from Temporal's serialization context: the
workflow id, ``<kind>-<visible id>`` for a journey, so the data key of a pseudonymous journey
is kept under the pseudonym (erase shreds the keys of the id and of its pseudonym). Payloads
of other workflows (the audience sweeper) and those without a context go through in clear.
Decoding needs only the payload: its metadata names the key (``kaeru-key``). A payload the
codec did not encode (journeys that started before the codec was on, stored histories) is
passed through untouched.

A payload whose key was erased decodes to a readable placeholder (:data:`ERASED_TEXT`, a JSON
string, metadata ``kaeru-erased``), so the Temporal UI shows "erased" instead of an error and
a worker that meets one fails that workflow task, not the process.

Keys are cached per process (bounded LRU, :data:`KEY_CACHE_TTL`): an erased key stops working
at once in the process that erased it and within the TTL in every other process.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverterWithEncodedAttributes,
    PayloadCodec,
    SerializationContext,
    WithSerializationContext,
)

from kaeru.db import session
from kaeru.models import CustomerKey, utcnow
from kaeru.settings import Settings

#: ``encoding`` of a payload this codec encrypted.
ENCODING = b"binary/encrypted"
#: Metadata naming the data key (``customer_keys.key_id``) of an encrypted payload.
KEY_METADATA = "kaeru-key"
#: Metadata of the placeholder an erased customer's payload decodes to.
ERASED_METADATA = "kaeru-erased"
#: What an erased customer's payload decodes to (a JSON string).
ERASED_TEXT = "[erased: this customer's data was deleted; the payload cannot be decrypted]"

#: How long a process trusts a cached data key: an erase reaches other processes within it.
KEY_CACHE_TTL = 60.0
#: Most data keys a process keeps in memory.
KEY_CACHE_SIZE = 4096

NONCE_BYTES = 12


class CodecKeyError(RuntimeError):
    """A data key exists but no configured master key unwraps it (a wrong or missing
    ``KAERU_CODEC_MASTER_KEY`` / ``KAERU_CODEC_MASTER_KEY_PREVIOUS``)."""


def _fingerprint(key: bytes) -> str:
    """The version of a master key: the start of its SHA-256 (not the key, not enough of the
    hash to guess it)."""
    return hashlib.sha256(b"kaeru-codec-master:" + key).hexdigest()[:16]


@dataclass(frozen=True)
class MasterKeys:
    """The master key that wraps data keys, and the previous one that still unwraps them."""

    current: bytes
    previous: bytes | None = None

    @property
    def version(self) -> str:
        return _fingerprint(self.current)

    def wrap(self, data_key: bytes, key_id: str) -> tuple[str, str]:
        """``(wrapped, version)``: the data key encrypted under the current master key."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.current).encrypt(nonce, data_key, key_id.encode())
        return base64.b64encode(nonce + sealed).decode(), self.version

    def unwrap(self, wrapped: str, version: str | None, key_id: str) -> bytes:
        """The data key, unwrapped by the master key of ``version`` (either one if unknown).

        Raises:
            CodecKeyError: neither master key unwraps it.
        """
        raw = base64.b64decode(wrapped)
        candidates = [k for k in (self.current, self.previous) if k is not None]
        candidates.sort(key=lambda k: _fingerprint(k) != version)  # the named one first
        for master in candidates:
            try:
                return AESGCM(master).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], key_id.encode())
            except InvalidTag:
                continue
        raise CodecKeyError(
            f"data key {key_id} was wrapped by master key version {version}, which neither "
            "KAERU_CODEC_MASTER_KEY nor KAERU_CODEC_MASTER_KEY_PREVIOUS is: set the key it was "
            "wrapped with as KAERU_CODEC_MASTER_KEY_PREVIOUS (then run `kaeru codec rotate`)"
        )


def master_keys(settings: Settings) -> MasterKeys | None:
    """The configured master keys; None when the codec is off (no ``KAERU_CODEC_MASTER_KEY``)."""
    if settings.codec_master_key is None:
        return None
    previous = settings.codec_master_key_previous
    return MasterKeys(
        current=base64.b64decode(settings.codec_master_key.get_secret_value().strip()),
        previous=base64.b64decode(previous.get_secret_value().strip()) if previous else None,
    )


#: A cached decode key: the AES-GCM of a live key, or None for an erased one.
_Cached = tuple[float, Any]


class KeyStore:
    """Customers' data keys in the database, with a bounded, expiring cache.

    Blocking (database calls): the codec calls it from a thread, after a cache miss.
    """

    def __init__(
        self,
        database_url: str,
        masters: MasterKeys,
        *,
        ttl: float = KEY_CACHE_TTL,
        size: int = KEY_CACHE_SIZE,
    ) -> None:
        self.database_url = database_url
        self.masters = masters
        self.ttl = ttl
        self.size = size
        self._lock = threading.Lock()
        #: customer id → (expiry, (key id, AESGCM)) for encoding.
        self._by_customer: OrderedDict[str, _Cached] = OrderedDict()
        #: key id → (expiry, AESGCM or None when erased) for decoding.
        self._by_key: OrderedDict[str, _Cached] = OrderedDict()

    # ---- cache -------------------------------------------------------------------------------

    def _get(self, cache: OrderedDict[str, _Cached], name: str) -> tuple[bool, Any]:
        with self._lock:
            found = cache.get(name)
            if found is None or found[0] < time.monotonic():
                cache.pop(name, None)
                return False, None
            cache.move_to_end(name)
            return True, found[1]

    def _put(self, cache: OrderedDict[str, _Cached], name: str, value: Any) -> None:
        with self._lock:
            cache[name] = (time.monotonic() + self.ttl, value)
            cache.move_to_end(name)
            while len(cache) > self.size:
                cache.popitem(last=False)

    def cached_for_customer(self, customer_id: str) -> tuple[str, AESGCM] | None:
        hit, value = self._get(self._by_customer, customer_id)
        return value if hit else None

    def cached_by_id(self, key_id: str) -> tuple[bool, AESGCM | None]:
        """``(hit, key)``: a hit with key None is an erased key."""
        return self._get(self._by_key, key_id)

    def forget(self, customer_id: str, key_id: str | None) -> None:
        """Drop a customer's key from this process's cache (the erase calls it)."""
        with self._lock:
            self._by_customer.pop(customer_id, None)
            if key_id is not None:
                self._by_key.pop(key_id, None)

    # ---- database ----------------------------------------------------------------------------

    def key_for(self, customer_id: str) -> tuple[str, AESGCM]:
        """The customer's key id and key, created (and kept wrapped) on first use."""
        cached = self.cached_for_customer(customer_id)
        if cached is not None:
            return cached
        for _ in range(3):
            with session(self.database_url) as s:
                row = s.get(CustomerKey, customer_id)
                if row is not None and row.wrapped_key is not None:
                    key = self._unwrap(row)
                    break
                if row is None:
                    data_key = AESGCM.generate_key(bit_length=256)
                    key_id = secrets.token_hex(12)
                    wrapped, version = self.masters.wrap(data_key, key_id)
                    s.add(
                        CustomerKey(
                            customer_id=customer_id,
                            key_id=key_id,
                            wrapped_key=wrapped,
                            key_version=version,
                        )
                    )
                    try:
                        s.commit()
                    except IntegrityError:
                        s.rollback()  # another process created it at the same moment
                        continue
                    row = CustomerKey(customer_id=customer_id, key_id=key_id)
                    key = AESGCM(data_key)
                    break
        else:
            raise RuntimeError(f"could not create or read a data key in {self.database_url}")
        value = (row.key_id, key)
        self._put(self._by_customer, customer_id, value)
        self._put(self._by_key, row.key_id, key)
        return value

    def key_by_id(self, key_id: str) -> AESGCM | None:
        """The data key named ``key_id``; None when it was erased (crypto-shredded).

        Raises:
            CodecKeyError: no such key in this database, or the configured master keys cannot
                unwrap it.
        """
        hit, cached = self.cached_by_id(key_id)
        if hit:
            return cached
        with session(self.database_url) as s:
            row = s.exec(select(CustomerKey).where(CustomerKey.key_id == key_id)).first()
        if row is None:
            raise CodecKeyError(
                f"no data key {key_id} in the database at {safe_label(self.database_url)}: "
                "the payload was written with another database; set KAERU_DATABASE_URL to it"
            )
        key = self._unwrap(row) if row.wrapped_key is not None else None
        self._put(self._by_key, key_id, key)
        return key

    def _unwrap(self, row: CustomerKey) -> AESGCM:
        assert row.wrapped_key is not None
        return AESGCM(self.masters.unwrap(row.wrapped_key, row.key_version, row.key_id))

    def rotate(self, batch: int = 500) -> int:
        """Rewrap every live data key not wrapped by the current master key; how many.

        Raises:
            CodecKeyError: a key that neither master key unwraps (nothing after it changes).
        """
        version, done = self.masters.version, 0
        while True:
            with session(self.database_url) as s:
                rows = s.exec(
                    select(CustomerKey)
                    .where(col(CustomerKey.wrapped_key).is_not(None))
                    .where(
                        (col(CustomerKey.key_version) != version)
                        | col(CustomerKey.key_version).is_(None)
                    )
                    .limit(batch)
                ).all()
                for row in rows:
                    data_key = self.masters.unwrap(
                        row.wrapped_key or "", row.key_version, row.key_id
                    )
                    row.wrapped_key, row.key_version = self.masters.wrap(data_key, row.key_id)
                    s.add(row)
            done += len(rows)
            if len(rows) < batch:
                return done


def shred(s: Session, customer_id: str) -> str | None:
    """Crypto-shred the customer's data key in ``s``'s transaction; its key id, or None if the
    customer had none.

    The row stays as a tombstone (so their payloads decode as erased, not as an unknown key),
    without the key and without the customer id: ``customer_id`` becomes ``erased-<key id>``.
    Call :meth:`KeyStore.forget` after the commit so this process stops at once.
    """
    row = s.get(CustomerKey, customer_id)
    if row is None:
        return None
    key_id = row.key_id
    s.delete(row)
    s.flush()
    s.add(CustomerKey(customer_id=f"erased-{key_id}", key_id=key_id, erased_at=utcnow()))
    return key_id


def safe_label(url: str) -> str:
    """A database URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def customer_of_workflow(kinds: Iterable[str]) -> Callable[[str], str | None]:
    """A function from a workflow id to its customer id (``<kind>-<customer id>``), None for a
    workflow that is not a journey. The longest matching kind wins (``cart`` and
    ``cart-abandonment`` both may exist)."""
    prefixes = sorted((f"{kind}-" for kind in kinds), key=len, reverse=True)

    def customer_of(workflow_id: str) -> str | None:
        for prefix in prefixes:
            if workflow_id.startswith(prefix) and len(workflow_id) > len(prefix):
                return workflow_id[len(prefix) :]
        return None

    return customer_of


def erased_payload(key_id: str) -> Payload:
    """What an erased customer's payload decodes to: a JSON string saying so."""
    return Payload(
        metadata={"encoding": b"json/plain", ERASED_METADATA: key_id.encode()},
        data=f'"{ERASED_TEXT}"'.encode(),
    )


def is_encrypted(payload: Payload) -> bool:
    """Whether ``payload`` was encrypted by this codec."""
    return payload.metadata.get("encoding") == ENCODING and KEY_METADATA in payload.metadata


class CustomerCodec(PayloadCodec, WithSerializationContext):
    """Encrypts the payloads of one customer's workflows with their data key.

    Without a context (or for a workflow that is not a journey) it encodes nothing; it
    decodes whatever it encrypted, under any context, and passes everything else through.
    """

    def __init__(
        self,
        keys: KeyStore,
        customer_of: Callable[[str], str | None],
        customer_id: str | None = None,
    ) -> None:
        self.keys = keys
        self.customer_of = customer_of
        self.customer_id = customer_id

    def with_context(self, context: SerializationContext) -> Self:
        workflow_id = getattr(context, "workflow_id", None)
        customer_id = self.customer_of(workflow_id) if isinstance(workflow_id, str) else None
        return type(self)(self.keys, self.customer_of, customer_id)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        if self.customer_id is None or not payloads:
            return list(payloads)
        found = self.keys.cached_for_customer(self.customer_id)
        if found is None:
            found = await asyncio.to_thread(self.keys.key_for, self.customer_id)
        key_id, key = found
        return [_seal(p, key_id, key) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        decoded = []
        for payload in payloads:
            if not is_encrypted(payload):
                decoded.append(payload)
                continue
            key_id = payload.metadata[KEY_METADATA].decode()
            hit, key = self.keys.cached_by_id(key_id)
            if not hit:
                key = await asyncio.to_thread(self.keys.key_by_id, key_id)
            decoded.append(erased_payload(key_id) if key is None else _open(payload, key_id, key))
        return decoded


def _seal(payload: Payload, key_id: str, key: AESGCM) -> Payload:
    nonce = os.urandom(NONCE_BYTES)
    sealed = key.encrypt(nonce, payload.SerializeToString(), key_id.encode())
    return Payload(
        metadata={"encoding": ENCODING, KEY_METADATA: key_id.encode()}, data=nonce + sealed
    )


def _open(payload: Payload, key_id: str, key: AESGCM) -> Payload:
    try:
        clear = key.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
    except InvalidTag as exc:
        raise CodecKeyError(
            f"a payload under data key {key_id} does not decrypt: it was altered, or the key "
            "was replaced; restore customer_keys from the database it was written with"
        ) from exc
    return Payload.FromString(clear)


def codec_for(settings: Settings, kinds: Iterable[str]) -> CustomerCodec | None:
    """The codec these settings ask for; None when ``KAERU_CODEC_MASTER_KEY`` is unset.

    ``kinds``: every journey kind, switched on or off (a disabled journey may still be
    running): :func:`kaeru.temporal.journey_kinds`.
    """
    masters = master_keys(settings)
    if masters is None:
        return None
    return CustomerCodec(
        key_store(settings.resolved_database_url, masters), customer_of_workflow(kinds)
    )


@lru_cache(maxsize=8)
def key_store(database_url: str, masters: MasterKeys) -> KeyStore:
    """The process's one key store per database and master keys: the API's router, its codec
    server and an erase share its cache, so an erase there forgets the key for all of them."""
    return KeyStore(database_url, masters)


def data_converter(settings: Settings, kinds: Iterable[str]) -> DataConverter:
    """Temporal's default converter, with the codec when these settings switch it on.

    With the codec, failures' messages and stack traces are encoded too (they may name the
    customer: "no email address for ..."), so they are encrypted like every other payload.
    """
    codec = codec_for(settings, kinds)
    if codec is None:
        return DataConverter.default
    return DataConverter(
        payload_codec=codec, failure_converter_class=DefaultFailureConverterWithEncodedAttributes
    )
