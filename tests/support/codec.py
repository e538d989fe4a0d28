"""Helpers for tests of the payload codec: master keys, a client with the codec, and every
payload of a stored history, read raw (as Temporal keeps it)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from kaeru.holds import HOLDS_HEADER
from kaeru.settings import Settings
from kaeru.temporal import converter


def new_master_key() -> str:
    """A fresh ``KAERU_CODEC_MASTER_KEY`` value."""
    return base64.b64encode(os.urandom(32)).decode()


def codec_client(client: Client, settings: Settings) -> Client:
    """``client`` (its connection, namespace and interceptors) with the data converter that
    ``settings`` ask for, as :func:`kaeru.temporal.connect` builds it."""
    config = client.config()
    config["data_converter"] = converter(settings)
    return Client(**config)


class CodecEnv:
    """A time-skipping environment whose client has the codec: ``Shopper`` drives it."""

    def __init__(self, env: WorkflowEnvironment, client: Client) -> None:
        self.env = env
        self.client = client

    async def sleep(self, duration: timedelta) -> None:
        await self.env.sleep(duration)


def _payloads(message: Message, path: str) -> Iterator[tuple[str, Payload]]:
    if isinstance(message, Payload):
        yield path, message
        return
    for descriptor, value in message.ListFields():
        name = f"{path}.{descriptor.name}"
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    yield from _payloads(item, f"{name}[{key}]")
        elif isinstance(value, Message):
            yield from _payloads(value, name)
        else:  # a repeated field of messages
            for index, item in enumerate(value):
                yield from _payloads(item, f"{name}[{index}]")


def history_payloads(history: WorkflowHistory) -> list[tuple[str, Payload]]:
    """Every payload of ``history`` with where it is, but search attributes (never encoded:
    the server indexes them) and the patch markers' data (the SDK's core writes a
    ``workflow.patched`` marker itself, outside the payload codec: it holds the patch id, a name
    in kaeru's code, never customer data), and kaeru's ``kaeru-holds`` activity header (a flag,
    ``1``, that the kill switch reads on the worker: the SDK does not run headers through the
    codec)."""
    found: list[tuple[str, Payload]] = []
    for index, event in enumerate(history.events):
        for path, payload in _payloads(event, f"event[{index}]"):
            if (
                ".search_attributes." not in path
                and "details[patch-data]" not in path
                and f"header.fields[{HOLDS_HEADER}]" not in path
            ):
                found.append((path, payload))
    return found


def as_text(payloads: list[tuple[str, Payload]]) -> bytes:
    """The raw bytes of every payload, to search for what must not be there."""
    return b"\n".join(p.data + b"".join(p.metadata.values()) for _, p in payloads)


def payload_json(payload: Payload) -> Any:
    return json.loads(payload.data)
