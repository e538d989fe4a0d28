"""The one place that knows how to reach Temporal: client factory and search attributes.

The API, the worker and the CLI all connect through :func:`connect`, so the data converter
(with the payload codec of kaeru/codec.py when ``KAERU_CODEC_MASTER_KEY`` is set),
interceptors or TLS apply everywhere at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

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
    tls = tls_config(settings)
    try:
        return await Client.connect(
            target,
            namespace=settings.temporal_namespace,
            api_key=api_key,
            tls=tls if tls is not None else api_key is not None,
            # The payload codec (kaeru/codec.py) when KAERU_CODEC_MASTER_KEY is set: the
            # worker, the router (signal-with-start carries events) and the CLI all get it.
            data_converter=converter(settings),
            runtime=runtime,
        )
    except RuntimeError as exc:
        raise RuntimeError(
            f"cannot reach Temporal at {target} (namespace {settings.temporal_namespace!r}): "
            f"{exc}. {_fix(str(exc), settings, tls is not None)}"
        ) from exc


def _fix(problem: str, settings: Settings, tls: bool) -> str:
    """What to do about a failed connection, read from the core's error text."""
    if "UnknownIssuer" in problem:
        return (
            "Temporal's server certificate is not signed by a CA this machine trusts: set "
            "KAERU_TEMPORAL_TLS_CA to the PEM file of the CA that signed it."
        )
    if "NotValidForName" in problem:
        return (
            "Temporal's server certificate is not issued for the host of "
            "KAERU_TEMPORAL_ADDRESS: set KAERU_TEMPORAL_TLS_SERVER_NAME to the name it is "
            "issued for."
        )
    if tls and settings.temporal_tls_cert is not None:
        return (
            "Check KAERU_TEMPORAL_ADDRESS, and that the namespace accepts the certificate of "
            "KAERU_TEMPORAL_TLS_CERT (its CA is in the namespace's settings)."
        )
    if tls and settings.temporal_api_key is None:
        return (
            "Check KAERU_TEMPORAL_ADDRESS; a server that closes the TLS connection may want a "
            "client certificate: set KAERU_TEMPORAL_TLS_CERT and KAERU_TEMPORAL_TLS_KEY (or "
            "KAERU_TEMPORAL_API_KEY)."
        )
    return "Start it with `kaeru dev`, or set KAERU_TEMPORAL_ADDRESS."


class TemporalTLSError(RuntimeError):
    """A TLS setting names a file that cannot be read or is not PEM; the message says which."""


def tls_config(settings: Settings) -> TLSConfig | None:
    """The TLS of the connection to Temporal: None for plain gRPC (unless an API key asks
    for TLS), else the client certificate (mTLS), the server's CA and name as set.

    Without ``KAERU_TEMPORAL_TLS_CA`` the server certificate is checked against the system's
    trusted roots (Temporal's core uses the OS store), which is what Temporal Cloud needs.

    Raises:
        TemporalTLSError: a file cannot be read or holds no PEM of the kind expected.
    """
    wanted = (
        settings.temporal_tls
        or settings.temporal_tls_cert is not None
        or settings.temporal_tls_ca is not None
        or settings.temporal_tls_server_name is not None
    )
    if not wanted:
        return None
    cert = key = ca = None
    if settings.temporal_tls_cert is not None and settings.temporal_tls_key is not None:
        cert = _pem("KAERU_TEMPORAL_TLS_CERT", settings.temporal_tls_cert, "CERTIFICATE")
        key = _pem("KAERU_TEMPORAL_TLS_KEY", settings.temporal_tls_key, "PRIVATE KEY")
    if settings.temporal_tls_ca is not None:
        ca = _pem("KAERU_TEMPORAL_TLS_CA", settings.temporal_tls_ca, "CERTIFICATE")
    return TLSConfig(
        server_root_ca_cert=ca,
        domain=settings.temporal_tls_server_name,
        client_cert=cert,
        client_private_key=key,
    )


def _pem(variable: str, path: Path, label: str) -> bytes:
    """The PEM file ``path`` names, checked to hold a ``label`` block (``PRIVATE KEY`` also
    matches ``RSA PRIVATE KEY`` and ``EC PRIVATE KEY``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TemporalTLSError(
            f"{variable}={path} cannot be read ({exc.strerror or exc}): give the path of a "
            "readable PEM file"
        ) from exc
    text = data.decode("ascii", errors="replace")
    begins = [line for line in text.splitlines() if line.startswith("-----BEGIN ")]
    if not any(line.endswith(f"{label}-----") for line in begins):
        found = f"it holds {begins[0].strip('-')[6:]}" if begins else "it is not PEM"
        raise TemporalTLSError(
            f"{variable}={path} holds no PEM {label.lower()} ({found}): give a file that "
            f"starts with -----BEGIN {label}-----"
        )
    return data


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
