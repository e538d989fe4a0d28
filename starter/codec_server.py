"""The codec server: Temporal's remote codec protocol, so operators read payloads in the
Temporal UI and the ``temporal`` CLI.

``POST /codec/decode`` and ``POST /codec/encode`` take and answer ``{"payloads": [...]}``, each
payload as protobuf JSON (metadata values and data base64), with the ``X-Namespace`` header.
They need the operator token:

- the ``temporal`` CLI sends it as a header: ``temporal workflow show --codec-endpoint
  http://localhost:8000/codec --codec-auth 'Bearer <KAERU_OPERATOR_TOKEN>'``;
- the Temporal UI cannot: it sends ``Authorization: Bearer`` only with the access token of its
  own OIDC login (``passAccessToken``, and only to an https endpoint), never a static token. It
  can send cookies (``includeCredentials``): an operator signs in once at ``/codec/login`` with
  the token, which sets a signed, HttpOnly, SameSite=Lax cookie for :data:`SESSION_TTL`; then
  the UI's codec endpoint is ``<KAERU_PUBLIC_URL>/codec/`` (with the trailing slash: the UI
  resolves ``decode`` against it) with "include cross-origin credentials" on. Lax: the cookie
  travels only from the same site (``localhost:8233`` and ``localhost:8000`` are one site).

Browsers call it from the origins of ``KAERU_CODEC_CORS_ORIGINS`` (the Temporal UI's); the
preflight (``OPTIONS``) needs no token, as browsers send none.

Decoding needs no workflow id: each encrypted payload names its key. An erased customer's
payloads decode to a placeholder that says so (kaeru/codec.py), never to their data. Encoding
has no workflow id either, so what the UI encodes (a signal typed there) goes in clear.
"""

from __future__ import annotations

import html
import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from temporalio.api.common.v1 import Payloads

from kaeru.codec import CodecKeyError, CustomerCodec, codec_for
from kaeru.settings import Settings
from kaeru.temporal import journey_kinds
from starter import operator_session
from starter.deps import ApiError, error_response, key_matches, require_operator

router = APIRouter(prefix="/codec", tags=["codec"])

#: Headers the UI and the CLI send with a codec request.
ALLOWED_HEADERS = "Authorization, Authorization-Extras, Content-Type, X-Namespace"
#: The cookie of a browser signed in at /codec/login, and how long it lasts.
SESSION_COOKIE = "kaeru_codec"
SESSION_TTL = operator_session.SESSION_TTL
#: What the cookie's signature is for (the dashboard signs its own with another purpose).
_PURPOSE = "kaeru-codec"


def session_cookie(token: str, now: float | None = None) -> str:
    """The cookie value of a sign-in with ``token``: its expiry, signed with the token (so a new
    operator token signs every browser out)."""
    return operator_session.session_cookie(token, _PURPOSE, now)


def _signed_in(request: Request, settings: Settings) -> bool:
    return operator_session.signed_in(request, settings, SESSION_COOKIE, _PURPOSE)


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
        if not _signed_in(request, settings):
            await require_operator(request)
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


_LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>kaeru codec server</title></head><body style="font-family:sans-serif;max-width:40em">
<h1>Read kaeru's payloads in the Temporal UI</h1><p>{message}</p>
<form method="post" action="login"><label>Operator token
<input type="password" name="token" autocomplete="off" required></label>
<button>Sign in for {hours} hours</button></form>
<p>Then, in the Temporal UI's codec server settings, set the endpoint to
<code>{endpoint}</code> and switch on <em>include cross-origin credentials</em>.</p>
</body></html>"""


def _login_page(settings: Settings, message: str, status: int = 200) -> HTMLResponse:
    endpoint = settings.public_url.rstrip("/") + "/codec/"
    return HTMLResponse(
        _LOGIN.format(
            message=html.escape(message), hours=SESSION_TTL // 3600, endpoint=html.escape(endpoint)
        ),
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


@router.get("/login", include_in_schema=False)
async def login_form(request: Request) -> Response:
    """The sign-in page for browsers (the Temporal UI sends cookies, not a token)."""
    return _login_page(request.app.state.settings, "Sign in with KAERU_OPERATOR_TOKEN.")


@router.post("/login", include_in_schema=False)
async def login(request: Request) -> Response:
    """Check the operator token from the form and set the session cookie."""
    settings: Settings = request.app.state.settings
    token = settings.operator_token.get_secret_value() if settings.operator_token else ""
    if not token:
        return _login_page(
            settings, "No operator token is set: set KAERU_OPERATOR_TOKEN and restart.", 503
        )
    given = parse_qs((await request.body()).decode("utf-8", "replace")).get("token", [""])[0]
    if not key_matches(given.strip(), token):
        return _login_page(settings, "That is not the operator token; try again.", 401)
    answer = _login_page(settings, f"Signed in for {SESSION_TTL // 3600} hours.")
    answer.set_cookie(
        SESSION_COOKIE,
        session_cookie(token),
        max_age=SESSION_TTL,
        path="/codec",
        httponly=True,
        samesite="lax",
        secure=urlsplit(settings.public_url).scheme == "https",
    )
    return answer
