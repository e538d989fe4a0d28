"""The one place that knows how to reach Temporal: client factory and search attributes.

The API, the worker and the CLI all connect through :func:`connect`, so the data converter
(with the payload codec of kaeru/codec.py when ``KAERU_CODEC_MASTER_KEY`` is set),
interceptors or TLS apply everywhere at once.
"""

from __future__ import annotations

import asyncio

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from kaeru.codec import data_converter
from kaeru.search_attributes import SEARCH_ATTRIBUTES
from kaeru.settings import Settings


def journey_kinds(settings: Settings) -> list[str]:
    """Every journey kind (switched on or off): the codec finds customers by them.

    The registry is imported here, not at the top: it imports the journeys and their kit,
    which only the codec needs (to tell a payload's customer by its workflow id).
    """
    from kaeru.journeys import discover

    return [journey.kind for journey in discover(settings.journey_modules)]


def converter(settings: Settings) -> DataConverter:
    """The data converter of every client: the payload codec when KAERU_CODEC_MASTER_KEY is
    set (kaeru/codec.py), else Temporal's default."""
    if settings.codec_master_key is None:
        return DataConverter.default
    return data_converter(settings, journey_kinds(settings))


async def connect(
    settings: Settings, address: str | None = None, *, runtime: Runtime | None = None
) -> Client:
    """Connect to the configured Temporal namespace.

    ``runtime``: the worker's (:func:`kaeru.worker_metrics.worker_runtime`, which serves its
    metrics); None: the SDK's default runtime.

    Raises:
        RuntimeError: Temporal cannot be reached; the message says which setting to check.
    """
    target = address or settings.resolved_temporal_address
    api_key = settings.temporal_api_key.get_secret_value() if settings.temporal_api_key else None
    try:
        return await Client.connect(
            target,
            namespace=settings.temporal_namespace,
            api_key=api_key,
            tls=settings.temporal_tls or api_key is not None,
            # The payload codec (kaeru/codec.py) when KAERU_CODEC_MASTER_KEY is set: the
            # worker, the router (signal-with-start carries events) and the CLI all get it.
            data_converter=converter(settings),
            runtime=runtime,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot reach Temporal at {target} (namespace {settings.temporal_namespace!r}): "
            f"{exc}. Start it with `kaeru dev`, or set KAERU_TEMPORAL_ADDRESS."
        ) from exc


async def missing_search_attributes(client: Client, namespace: str) -> list[str]:
    """Names of kaeru's search attributes that the namespace does not define yet."""
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    return [key.name for key in SEARCH_ATTRIBUTES if key.name not in listed.custom_attributes]


async def ensure_search_attributes(client: Client, namespace: str, timeout: float = 30.0) -> None:
    """Register kaeru's search attributes and wait until the server lists them.

    Raises:
        RuntimeError: the server refused (on Temporal Cloud, add them in the namespace settings).
    """
    try:
        missing = await missing_search_attributes(client, namespace)
    except RPCError as exc:
        if exc.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        # The time-skipping test server cannot list attributes; adding is all it knows.
        await _add(client, namespace, [key.name for key in SEARCH_ATTRIBUTES])
        return
    if missing:
        await _add(client, namespace, missing)
    deadline = asyncio.get_running_loop().time() + timeout
    while await missing_search_attributes(client, namespace):
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"search attributes {missing} were not registered in {timeout}s")
        await asyncio.sleep(0.2)


async def _add(client: Client, namespace: str, names: list[str]) -> None:
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=namespace,
                search_attributes=dict.fromkeys(names, IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD),
            )
        )
    except RPCError as exc:
        if exc.status == RPCStatusCode.ALREADY_EXISTS:
            return
        raise RuntimeError(
            f"could not add search attributes {names} to namespace {namespace!r}: {exc}. "
            "On a managed Temporal (Cloud), add them as Keyword attributes in the namespace "
            "settings yourself."
        ) from exc
