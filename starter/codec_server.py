"""The codec server: Temporal's remote codec protocol, so operators read payloads in the
Temporal UI and the ``temporal`` CLI.

``POST /codec/decode`` and ``POST /codec/encode`` take and answer ``{"payloads": [...]}``, each
payload as protobuf JSON (metadata values and data base64), with the ``X-Namespace`` header.
They need the operator token (``Authorization: Bearer <KAERU_OPERATOR_TOKEN>``): the CLI sends
it with ``temporal workflow show --codec-endpoint http://localhost:8000/codec --codec-auth
'Bearer <token>'``. Browsers call it from the origins of ``KAERU_CODEC_CORS_ORIGINS`` (the
Temporal UI's); the preflight (``OPTIONS``) needs no token, as browsers send none.

Decoding needs no workflow id: each encrypted payload names its key. An erased customer's
payloads decode to a placeholder that says so (kaeru/codec.py), never to their data. Encoding
has no workflow id either, so what the UI encodes (a signal typed there) goes in clear.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from kaeru.codec import CodecKeyError, CustomerCodec, codec_for
from kaeru.settings import Settings
from kaeru.temporal import journey_kinds
from starter.deps import ApiError, error_response, require_operator

router = APIRouter(prefix="/codec", tags=["codec"])

#: Headers the UI and the CLI send with a codec request.
ALLOWED_HEADERS = "Authorization, Content-Type, X-Namespace"


def _origins(settings: Settings) -> set[str]:
    return {o.strip().rstrip("/") for o in settings.codec_cors_origins.split(",") if o.strip()}


def _cors(request: Request, settings: Settings) -> dict[str, str]:
    """CORS headers for ``request``'s origin, if it is allowed (none otherwise)."""
    origin = request.headers.get("origin")
    if origin is None or origin.rstrip("/") not in _origins(settings):
        return {"Vary": "Origin"}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "POST, OPTIONS",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        # The UI's "include credentials" option sends cookies; harmless otherwise.
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }


def _codec(request: Request, settings: Settings) -> CustomerCodec:
    codec: CustomerCodec | None = getattr(request.app.state, "codec", None)
    if codec is None:
        codec = codec_for(settings, journey_kinds(settings))
        if codec is None:
            raise ApiError(
                503,
                "not_configured",
                "the payload codec is off, so payloads are in clear and need no codec server: "
                "set KAERU_CODEC_MASTER_KEY to encrypt them",
            )
        request.app.state.codec = codec
    return codec


async def _payloads(request: Request) -> Payloads:
    try:
        body = json.loads(await request.body())
        if not isinstance(body, dict):
            raise ValueError("not an object")
        return ParseDict(body, Payloads(), ignore_unknown_fields=True)
    except (ValueError, ParseError, RecursionError) as exc:
        raise ApiError(
            400,
            "invalid_payloads",
            f'the body must be {{"payloads": [{{"metadata": {{...}}, "data": "<base64>"}}]}} as '
            f"Temporal's codec protocol sends it ({exc})",
        ) from exc


async def _answer(request: Request, decode: bool) -> Response:
    settings: Settings = request.app.state.settings
    headers = _cors(request, settings)
    try:
        await require_operator(request, settings)
        namespace = request.headers.get("x-namespace")
        if namespace is not None and namespace != settings.temporal_namespace:
            raise ApiError(
                404,
                "unknown_namespace",
                f"this codec server serves namespace {settings.temporal_namespace!r}, not "
                f"{namespace!r}: point the UI or CLI of that namespace at its own kaeru",
            )
        codec = _codec(request, settings)
        payloads = await _payloads(request)
        try:
            if decode:
                done = await codec.decode(payloads.payloads)
            else:
                done = await codec.encode(payloads.payloads)
        except CodecKeyError as exc:
            raise ApiError(503, "codec_key_unavailable", str(exc)) from exc
    except ApiError as err:
        return error_response(err.status, err.code, err.message, {**headers, **(err.headers or {})})
    body: dict[str, Any] = MessageToDict(Payloads(payloads=done))
    body.setdefault("payloads", [])
    return JSONResponse(body, headers=headers)


@router.post("/decode")
async def decode(request: Request) -> Response:
    """Decode payloads (Temporal's codec protocol): what kaeru encrypted is decrypted, an
    erased customer's reads as erased, anything else comes back as it was."""
    return await _answer(request, decode=True)


@router.post("/encode")
async def encode(request: Request) -> Response:
    """Encode payloads (Temporal's codec protocol). Without a workflow id there is no customer
    to encrypt for: they come back as they were."""
    return await _answer(request, decode=False)


@router.options("/decode", include_in_schema=False)
@router.options("/encode", include_in_schema=False)
async def preflight(request: Request) -> Response:
    """The browser's CORS preflight: no token (browsers send none), only the origin check."""
    settings: Settings = request.app.state.settings
    headers = _cors(request, settings)
    status = 204 if "Access-Control-Allow-Origin" in headers else 403
    return Response(status_code=status, headers=headers)
