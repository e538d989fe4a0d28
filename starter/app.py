"""The HTTP API: Segment-compatible ingestion, tracking links, the admin read API.

``create_app(settings)`` is the whole wiring: the lifespan migrates the database, loads the
link-signing key and runs the event router; ingestion stores events and wakes the router.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import swagger_ui_bundle
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import Client

from kaeru.credentials import CredentialCache
from kaeru.db import migrate
from kaeru.models import utcnow
from kaeru.settings import Settings
from kaeru.telemetry import NO_TELEMETRY, Telemetry
from starter import (
    admin,
    codec_server,
    consent_api,
    dashboard,
    feedback,
    limits,
    metrics,
    opens_and_clicks,
    privacy,
    recommendations,
    shopify,
    steering,
    unsubscribe,
)
from starter.deps import (
    SERVER,
    WRONG_KEY,
    ApiError,
    SettingsDep,
    Source,
    basic_auth_user,
    error_response,
    key_source,
    router_of,
    unauthorized,
)
from starter.events import (
    Accepted,
    BatchAccepted,
    BatchBody,
    BodyError,
    ErrorBody,
    EventError,
    IdentifyEvent,
    IncomingEvent,
    PageEvent,
    Rejection,
    TrackEvent,
    parse_json,
    read_event,
    value_problem,
)
from starter.ingest import EventStore
from starter.router import Router

log = logging.getLogger("kaeru.api")

_SCHEMAS = (TrackEvent, IdentifyEvent, PageEvent, BatchBody)
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body is not JSON, or not a valid event"},
    401: {"model": ErrorBody, "description": "missing or wrong write key"},
    403: {"model": ErrorBody, "description": "the browser write key may not do this"},
    413: {"model": ErrorBody, "description": "over 32 KB per event or 500 KB per batch"},
    503: {"model": ErrorBody, "description": "KAERU_WRITE_KEY is unset, or storage is down"},
}


def create_app(
    settings: Settings,
    client: Client | None = None,
    *,
    run_router: bool = True,
    telemetry: Telemetry = NO_TELEMETRY,
) -> FastAPI:
    """The API for ``settings``.

    Args:
        settings: loaded once and injected into every endpoint.
        client: a connected Temporal client for the router; None: the router connects with
            :func:`kaeru.temporal.connect` in the background and keeps retrying, so ingestion
            works (stores) while Temporal is down.
        run_router: False serves the API without routing (another process routes).
        telemetry: traces of the requests and of the router's deliveries (kaeru/telemetry.py;
            off by default).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(migrate, settings.resolved_database_url)
        app.state.signing_key = await asyncio.to_thread(opens_and_clicks.load_signing_key, settings)
        if run_router:
            await app.state.router.start()
        try:
            yield
        finally:
            await app.state.router.stop()

    app = FastAPI(
        title="kaeru",
        summary="Marketing automation where every customer journey is a Temporal workflow",
        description=(
            "Ingestion follows the Segment HTTP Tracking API (HTTP Basic auth with the write "
            'key as user name). Errors are `{"code", "message"}`.'
        ),
        version="0.1.0",
        lifespan=lifespan,
        # Served by _install_docs from the package, not from a CDN: /docs works offline.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics.ApiMetrics()
    app.state.router = Router(settings, client, telemetry=telemetry, metrics=app.state.metrics)
    app.state.event_store = EventStore(settings, metrics=app.state.metrics)
    app.state.credentials = CredentialCache(
        settings.resolved_database_url, settings.credentials_cache_ttl
    )
    limits.install(app, settings)
    _install_error_handlers(app)
    _install_openapi(app)
    _install_docs(app)
    app.include_router(_ingestion_routes())
    # Early, before any route with a catch-all path parameter could take /v1/webhooks/...
    app.include_router(shopify.router)
    app.include_router(recommendations.router)
    app.include_router(opens_and_clicks.router)
    app.include_router(unsubscribe.router)
    # Before admin: its GET /v1/customers/{id:path} would swallow .../export.
    app.include_router(privacy.router)
    # Before the admin routes: their /v1/customers/{id:path} would take .../consent.
    app.include_router(consent_api.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    app.include_router(steering.router)
    app.include_router(codec_server.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    telemetry.instrument_app(app)
    return app


# ---- API docs, offline ---------------------------------------------------------------------------

#: Where Swagger UI's own files are served (from the swagger-ui-bundle package).
DOCS_ASSETS = "/docs/assets"


def _install_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's files from the installed package, so it works without
    internet like the rest of the stack (FastAPI's default loads them from a CDN)."""
    app.mount(
        DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets"
    )
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            # Swagger UI would otherwise send the schema to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def docs_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> RedirectResponse:
        # ReDoc has no offline bundle here; the path stays, and leads to the docs that work.
        return RedirectResponse(f"{request.scope.get('root_path', '')}/docs")


# ---- errors --------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(OperationalError)
    async def storage_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.error("database unavailable: %s", exc)
        return error_response(
            503,
            "storage_unavailable",
            "the database is unavailable; retry later (check KAERU_DATABASE_URL)",
        )


# ---- /openapi.json -------------------------------------------------------------------------------


def _install_openapi(app: FastAPI) -> None:
    """Publish the Segment body schemas, which the endpoints read by hand (strict JSON)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        _, definitions = models_json_schema(
            [(model, "validation") for model in _SCHEMAS],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            definitions.get("$defs", {})
        )
        schema["components"]["securitySchemes"] = {
            "writeKey": {
                "type": "http",
                "scheme": "basic",
                "description": "a write key (server or browser) as user name, empty password",
            },
            "operatorToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "KAERU_OPERATOR_TOKEN: the admin API (write keys do not open it)",
            },
            "metricsToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "KAERU_METRICS_TOKEN: /metrics, when set (unset: open)",
            },
        }
        schema["security"] = [{"writeKey": []}]
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if {"admin", "codec"} & set(operation.get("tags", ())):
                    operation["security"] = [{"operatorToken": []}]
                if "operations" in operation.get("tags", ()):
                    operation["security"] = [{"metricsToken": []}, {}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _body_doc(model: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


# ---- ingestion -----------------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (after gzip), never buffering more.

    Its events are spent from the rate limits of the write key (the Basic auth user) and of the
    client address (:mod:`starter.limits`); a caller already over a limit is refused before its
    body is read.

    Raises:
        ApiError: 413 over the limit, 415 for an unknown encoding, 400 for broken gzip, 429
            over a rate limit (nothing is stored; ``Retry-After`` says when to retry).
    """
    front_door = limits.limits_of(request)
    key = basic_auth_user(request)
    front_door.admit_events(request, key, 1, spend=False)
    too_large = ApiError(
        413,
        "payload_too_large",
        f"the body is over {limit} bytes (32 KB per event, 500 KB per batch): send smaller batches",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r}: use gzip")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if encoding == "identity":
        data = bytes(body)
    else:
        inflater = zlib.decompressobj(wbits=31)
        try:
            data = inflater.decompress(bytes(body), limit + 1)
        except zlib.error as exc:
            raise ApiError(400, "invalid_body", f"the gzip body is corrupt: {exc}") from exc
        if len(data) > limit or inflater.unconsumed_tail:
            raise too_large
        if not inflater.eof:
            raise ApiError(400, "invalid_body", "the gzip body is truncated")
    front_door.admit_events(request, key, limits.event_count(data))
    return data


async def _authorized_json(request: Request, settings: Settings, limit: int) -> tuple[Any, Source]:
    """Check the write key (Basic auth, else ``writeKey`` in the body) and parse the body.

    Returns:
        The parsed body and which key it came with.

    Raises:
        ApiError: 401 for a missing or wrong key. A body that carries its key inside may be
            at most one event's size (KAERU_MAX_EVENT_BYTES): anything larger needs Basic
            auth, so nobody can make the API parse a large body without a key.
    """
    user = basic_auth_user(request)
    if user is not None:
        source = await key_source(request, user)
        if source is None:
            raise unauthorized(WRONG_KEY)
        return _parsed(await read_body(request, limit)), source
    small = min(limit, settings.max_event_bytes)
    try:
        body = await read_body(request, small)
    except ApiError as exc:
        if exc.status != 413:
            raise
        raise unauthorized(
            f"a body over {small} bytes needs the write key as the Basic auth user name "
            "(writeKey inside the body is for small bodies only)"
        ) from exc
    try:
        data = parse_json(body)
    except BodyError as exc:
        raise unauthorized("send the write key as the Basic auth user name") from exc
    given = data.get("writeKey") if isinstance(data, dict) else None
    if given is None:
        raise unauthorized("send the write key as the Basic auth user name (or writeKey)")
    source = await key_source(request, given)
    if source is None:
        raise unauthorized(WRONG_KEY)
    return data, source


def _parsed(body: bytes) -> Any:
    try:
        return parse_json(body)
    except BodyError as exc:
        raise ApiError(400, exc.code, exc.message) from exc


async def _store(request: Request, events: list[IncomingEvent]) -> list[tuple[int, EventError]]:
    """Store ``events``; the ones refused at store time, by position."""
    if not events:
        return []
    store: EventStore = request.app.state.event_store
    result = await store.store(events)
    if result.to_route:
        router_of(request).wake()
    return list(result.rejected)


def _read(raw: Any, settings: Settings, source: Source, **options: Any) -> IncomingEvent:
    return read_event(
        raw,
        ad_campaign=settings.ad_campaign,
        source=source,
        trust_browser_orders=settings.trust_browser_orders,
        max_clock_skew=settings.max_clock_skew,
        **options,
    )


def _single(
    event_type: str,
) -> Callable[[Request, Settings], Coroutine[Any, Any, dict[str, bool]]]:
    async def ingest(request: Request, settings: SettingsDep) -> dict[str, bool]:
        data, source = await _counted_request(request, settings, settings.max_event_bytes)
        if not isinstance(data, dict):
            metrics.metrics_of(request).rejected("invalid_event")
            raise ApiError(400, "invalid_event", "the body must be a JSON object (one event)")
        try:
            event = _read(data, settings, source, event_type=event_type)
        except EventError as exc:
            metrics.metrics_of(request).rejected(exc.code)
            raise ApiError(400, exc.code, exc.message) from exc
        for _, refused in await _store(request, [event]):
            raise ApiError(400, refused.code, refused.message)
        return {"success": True}

    ingest.__name__ = f"ingest_{event_type}"
    return ingest


async def _counted_request(request: Request, settings: Settings, limit: int) -> tuple[Any, Source]:
    """:func:`_authorized_json`, counting a request it refuses (``/metrics``)."""
    try:
        return await _authorized_json(request, settings, limit)
    except ApiError as exc:
        metrics.metrics_of(request).request_rejected(exc.code)
        raise


def _batch_problem(data: Any, source: Source, *, imported: bool) -> ApiError | None:
    """Why the body is not a batch this key may send; None if it is one."""
    if imported and source != SERVER:
        return ApiError(
            403,
            "forbidden",
            "/v1/import stores history and needs the server write key (KAERU_WRITE_KEY), not "
            "the browser key",
        )
    if not isinstance(data, dict) or not isinstance(data.get("batch"), list):
        return ApiError(400, "not_a_batch", 'the body must be a JSON object {"batch": [events]}')
    envelope = {key: value for key, value in data.items() if key != "batch"}
    if problem := value_problem(envelope):
        return ApiError(400, "invalid_body", problem)
    return None


async def _ingest_many(request: Request, settings: Settings, *, imported: bool) -> BatchAccepted:
    data, source = await _counted_request(request, settings, settings.max_batch_bytes)
    if (problem := _batch_problem(data, source, imported=imported)) is not None:
        metrics.metrics_of(request).request_rejected(problem.code)
        raise problem
    shared = data.get("context") if isinstance(data.get("context"), dict) else None
    now = utcnow()
    accepted: list[IncomingEvent] = []
    positions: list[int] = []
    rejected: list[Rejection] = []
    for index, raw in enumerate(data["batch"]):
        try:
            event = _read(
                raw,
                settings,
                source,
                shared_context=shared,
                now=now,
                max_bytes=settings.max_event_bytes,
                imported=imported,
            )
        except EventError as exc:
            metrics.metrics_of(request).rejected(exc.code)
            rejected.append(Rejection(index=index, code=exc.code, message=exc.message))
        else:
            accepted.append(event)
            positions.append(index)
    refused = await _store(request, accepted)
    for position, refusal in refused:
        rejected.append(
            Rejection(index=positions[position], code=refusal.code, message=refusal.message)
        )
    rejected.sort(key=lambda rejection: rejection.index)
    if rejected:
        log.info("batch: %d accepted, %d rejected", len(accepted) - len(refused), len(rejected))
    return BatchAccepted(accepted=len(accepted) - len(refused), rejected=rejected)


async def ingest_batch(request: Request, settings: SettingsDep) -> BatchAccepted:
    return await _ingest_many(request, settings, imported=False)


async def ingest_import(request: Request, settings: SettingsDep) -> BatchAccepted:
    """Segment's import path: historical events, stored (profiles, orders) but never routed."""
    return await _ingest_many(request, settings, imported=True)


def _ingestion_routes() -> APIRouter:
    routes = APIRouter(prefix="/v1", tags=["ingestion"], responses=_ERRORS)
    for event_type, model, aliases in (
        ("track", "TrackEvent", ("t",)),
        ("identify", "IdentifyEvent", ("i",)),
        ("page", "PageEvent", ("p",)),
    ):
        endpoint = _single(event_type)
        routes.add_api_route(
            f"/{event_type}",
            endpoint,
            methods=["POST"],
            response_model=Accepted,
            summary=f"Segment {event_type}",
            openapi_extra=_body_doc(model),
        )
        for alias in aliases:
            routes.add_api_route(f"/{alias}", endpoint, methods=["POST"], include_in_schema=False)
    routes.add_api_route(
        "/batch",
        ingest_batch,
        methods=["POST"],
        response_model=BatchAccepted,
        summary="Segment batch: valid events are stored, invalid ones listed by index",
        openapi_extra=_body_doc("BatchBody"),
    )
    routes.add_api_route(
        "/import",
        ingest_import,
        methods=["POST"],
        response_model=BatchAccepted,
        summary="Segment import: historical events, stored but never routed to journeys",
        openapi_extra=_body_doc("BatchBody"),
    )
    return routes
