"""A real HTTP server on loopback shaped like Meta's Graph API custom-audience users endpoint.

``POST`` / ``DELETE`` ``/{version}/{audience_id}/users`` with ``payload`` =
``{"schema": "EMAIL_SHA256", "data": ["<64 hex>", ...]}`` and ``access_token`` (query, body or
``Authorization: Bearer``) add or remove members, and answer as Meta does::

    {"audience_id", "session_id", "num_received", "num_invalid_entries", "invalid_entry_samples"}

Errors use Graph's error object (``{"error": {"message", "type", "code", ...}}``). A test can
script the next answers with :meth:`GraphAPIServer.answer_next` and the canned answers below.

    with GraphAPIServer() as graph:
        settings = make_settings(url, meta_graph_url=graph.url, meta_access_token=graph.token,
                                 meta_audience_id=graph.audience_id)
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

HOST = "127.0.0.1"
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Answer:
    """A scripted answer: an HTTP status and a JSON body (a dict) or plain text."""

    status: int
    body: dict[str, Any] | str
    headers: dict[str, str] = field(default_factory=dict)


def graph_error(status: int, code: int, message: str, **extra: Any) -> Answer:
    error = {"message": message, "type": "OAuthException", "code": code, **extra}
    error.setdefault("fbtrace_id", "A" + secrets.token_hex(5))
    return Answer(status, {"error": error})


INVALID_PARAMETER = graph_error(400, 100, "(#100) Invalid parameter", error_subcode=1870034)
BAD_TOKEN = graph_error(400, 190, "Invalid OAuth access token - Cannot parse access token")
RATE_LIMITED = graph_error(429, 4, "(#4) Application request limit reached", is_transient=True)
SERVER_ERROR = Answer(500, "Internal Server Error")
#: Graph's own throttling of custom-audience calls: HTTP 400, but transient by its code.
AUDIENCE_THROTTLED = graph_error(
    400, 80003, "(#80003) There have been too many calls to this ad-account.", error_subcode=2446079
)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = field(default=None)


class GraphAPIServer:
    """The fake Graph API, served by uvicorn in a background thread on an ephemeral port."""

    def __init__(self, token: str = "test-meta-token", audience_id: str = "23850000000000001"):
        self.token = token
        self.audience_id = audience_id
        self.members: dict[str, set[str]] = {audience_id: set()}
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self._script: list[Answer] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to use as ``KAERU_META_GRAPH_URL``."""
        return f"http://{HOST}:{self.port}/v21.0"

    def answer_next(self, *answers: Answer) -> None:
        """Answer the next requests with ``answers``, in order, instead of handling them."""
        with self._lock:
            self._script.extend(answers)

    def member_hashes(self, audience_id: str | None = None) -> set[str]:
        with self._lock:
            return set(self.members.get(audience_id or self.audience_id, set()))

    # ---- the endpoint -----------------------------------------------------------------------

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{version}/{audience_id}/users", methods=["POST", "DELETE"])
        async def users(version: str, audience_id: str, request: Request) -> Response:
            body = await _body(request)
            with self._lock:
                self.requests.append(
                    RecordedRequest(
                        method=request.method,
                        path=request.url.path,
                        query=dict(request.query_params),
                        headers=dict(request.headers),
                        body=body,
                    )
                )
                scripted = self._script.pop(0) if self._script else None
                answer = scripted or self._handle(request, audience_id, body)
            if isinstance(answer.body, str):
                return PlainTextResponse(
                    answer.body, status_code=answer.status, headers=answer.headers
                )
            return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

        return app

    def _handle(self, request: Request, audience_id: str, body: dict[str, Any]) -> Answer:
        if _token(request, body) != self.token:
            return BAD_TOKEN
        if audience_id not in self.members:
            return graph_error(
                400,
                100,
                f"Unsupported {request.method.lower()} request. Object with ID '{audience_id}' "
                "does not exist, cannot be loaded due to missing permissions, or does not "
                "support this operation.",
                error_subcode=33,
            )
        payload = body.get("payload")
        if isinstance(payload, str):
            try:
                payload = json.loads(payload)
            except ValueError:
                payload = None
        if not isinstance(payload, dict):
            return graph_error(400, 100, "(#100) The parameter payload is required")
        schema = payload.get("schema")
        if schema not in ("EMAIL_SHA256", "EMAIL", ["EMAIL_SHA256"], ["EMAIL"]):
            return graph_error(400, 100, f"(#100) Invalid schema: {schema!r}")
        data = payload.get("data")
        if not isinstance(data, list) or not data:
            return graph_error(400, 100, "(#100) The parameter data is required")
        entries = [x[0] if isinstance(x, list) and len(x) == 1 else x for x in data]
        valid = [x for x in entries if isinstance(x, str) and _HASH.match(x)]
        invalid = [x for x in entries if not (isinstance(x, str) and _HASH.match(x))]
        members = self.members[audience_id]
        if request.method == "POST":
            members.update(valid)
        else:
            members.difference_update(valid)
        return Answer(
            200,
            {
                "audience_id": audience_id,
                "session_id": str(secrets.randbelow(10**18)),
                "num_received": len(entries),
                "num_invalid_entries": len(invalid),
                "invalid_entry_samples": {str(x): "Invalid format" for x in invalid[:5]},
            },
        )

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> GraphAPIServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        # A thread, not a task: uvicorn in the main thread would take over SIGINT.
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake Graph API did not start within 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> GraphAPIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


async def _body(request: Request) -> dict[str, Any]:
    """The request's parameters, whether sent as JSON or as a form (as Meta's SDKs do)."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}
    # Parsed by hand: FastAPI's form parsing needs python-multipart, which kaeru does not ship.
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    return {key: values[-1] for key, values in form.items()}


def _token(request: Request, body: dict[str, Any]) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith(("bearer ", "oauth ")):
        return auth.split(" ", 1)[1].strip()
    token = request.query_params.get("access_token") or body.get("access_token")
    return token if isinstance(token, str) else None
