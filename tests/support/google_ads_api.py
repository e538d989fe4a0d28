"""A real HTTP server on loopback shaped like the Google Ads REST API's offline user data jobs.

``POST /{version}/customers/{cid}/offlineUserDataJobs:create`` (a ``CUSTOMER_MATCH_USER_LIST``
job naming ``customers/{cid}/userLists/{id}``) answers ``{"resourceName"}``;
``POST /{version}/{job}:addOperations`` takes ``create`` / ``remove`` operations of
``hashedEmail`` identifiers; ``POST /{version}/{job}:run`` runs the job (applied at once here);
``GET /{version}/{job}`` answers the job with its ``status``. Requests need
``Authorization: Bearer <token>`` and ``developer-token``. Errors are Google's REST error
objects (``{"error": {"code", "message", "status", "details": [GoogleAdsFailure]}}``). A test
scripts the next answers with :meth:`GoogleAdsServer.answer_next`.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

HOST = "127.0.0.1"
VERSION = "v26"
_HASH = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GoogleAnswer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def google_error(
    http: int, status: str, message: str, error_code: dict[str, str], **headers: str
) -> GoogleAnswer:
    """An error answer as Google Ads' REST interface sends it."""
    failure = {
        "@type": f"type.googleapis.com/google.ads.googleads.{VERSION}.errors.GoogleAdsFailure",
        "errors": [{"errorCode": error_code, "message": message}],
        "requestId": "req-" + str(time.monotonic_ns()),
    }
    body = {"error": {"code": http, "message": message, "status": status, "details": [failure]}}
    return GoogleAnswer(http, body, dict(headers))


BAD_TOKEN = google_error(
    401,
    "UNAUTHENTICATED",
    "Request is missing required authentication credential.",
    {"authenticationError": "OAUTH_TOKEN_INVALID"},
)
BAD_DEVELOPER_TOKEN = google_error(
    401,
    "UNAUTHENTICATED",
    "The developer token is not valid.",
    {"authenticationError": "DEVELOPER_TOKEN_INVALID"},
)


def rate_limited(retry_after: int) -> GoogleAnswer:
    return google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Too many requests. Retry in a while.",
        {"quotaError": "RESOURCE_EXHAUSTED"},
        **{"Retry-After": str(retry_after)},
    )


@dataclass
class GoogleRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Job:
    user_list: str
    status: str = "PENDING"
    operations: list[dict[str, Any]] = field(default_factory=list)


class GoogleAdsServer:
    """The fake Google Ads API, served by uvicorn in a background thread."""

    def __init__(
        self,
        customer_id: str = "1234567890",
        user_list_id: str = "987654321",
        access_token: str = "test-google-access-token",
        developer_token: str = "test-developer-token",
    ) -> None:
        self.customer_id = customer_id
        self.user_list_id = user_list_id
        self.access_token = access_token
        self.developer_token = developer_token
        self.members: set[str] = set()
        self.jobs: dict[str, Job] = {}
        self.requests: list[GoogleRequest] = []
        self.port = 0
        self._script: list[GoogleAnswer] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to use as ``KAERU_GOOGLE_ADS_API_URL``."""
        return f"http://{HOST}:{self.port}/{VERSION}"

    def settings(self) -> dict[str, object]:
        """The ``KAERU_GOOGLE_ADS_*`` settings that point kaeru here."""
        return {
            "google_ads_api_url": self.url,
            "google_ads_access_token": self.access_token,
            "google_ads_developer_token": self.developer_token,
            "google_ads_customer_id": self.customer_id,
            "google_ads_user_list_id": self.user_list_id,
        }

    def answer_next(self, *answers: GoogleAnswer) -> None:
        with self._lock:
            self._script.extend(answers)

    def runs(self) -> list[GoogleRequest]:
        return [r for r in self.requests if r.path.endswith(":run")]

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/{version}/{path:path}", methods=["GET", "POST"])
        async def call(version: str, path: str, request: Request) -> Response:
            body = await request.json() if request.method == "POST" else None
            with self._lock:
                self.requests.append(
                    GoogleRequest(request.method, path, dict(request.headers), body)
                )
                scripted = self._script.pop(0) if self._script else None
                answer = scripted or self._handle(request, path, body)
            return JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)

        return app

    def _handle(self, request: Request, path: str, body: Any) -> GoogleAnswer:
        if request.headers.get("authorization") != f"Bearer {self.access_token}":
            return BAD_TOKEN
        if request.headers.get("developer-token") != self.developer_token:
            return BAD_DEVELOPER_TOKEN
        prefix = f"customers/{self.customer_id}/offlineUserDataJobs"
        if path == f"{prefix}:create":
            return self._create(body)
        job_name, _, verb = path.partition(":")
        job = self.jobs.get(job_name)
        if job is None:
            return google_error(
                404,
                "NOT_FOUND",
                f"Resource {job_name} was not found.",
                {"requestError": "NOT_FOUND"},
            )
        if request.method == "GET":
            return GoogleAnswer(200, {"resourceName": job_name, "status": job.status})
        if job.status != "PENDING":
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "The job is not in PENDING state.",
                {"offlineUserDataJobError": "INVALID_JOB_STATUS"},
            )
        if verb == "addOperations":
            return self._add(job, body)
        if verb == "run":
            job.status = "SUCCESS"
            for operation in job.operations:
                for kind, data in operation.items():
                    hashed = data["userIdentifiers"][0]["hashedEmail"]
                    (self.members.add if kind == "create" else self.members.discard)(hashed)
            return GoogleAnswer(200, {"name": f"customers/{self.customer_id}/operations/1"})
        return google_error(404, "NOT_FOUND", f"no method {verb}", {"requestError": "NOT_FOUND"})

    def _create(self, body: Any) -> GoogleAnswer:
        job = body.get("job", {}) if isinstance(body, dict) else {}
        user_list = job.get("customerMatchUserListMetadata", {}).get("userList")
        wanted = f"customers/{self.customer_id}/userLists/{self.user_list_id}"
        if job.get("type") != "CUSTOMER_MATCH_USER_LIST" or user_list != wanted:
            return google_error(
                400,
                "INVALID_ARGUMENT",
                f"Invalid user list {user_list!r}.",
                {"offlineUserDataJobError": "INVALID_USER_LIST_ID"},
            )
        name = f"customers/{self.customer_id}/offlineUserDataJobs/{len(self.jobs) + 1}"
        self.jobs[name] = Job(user_list=user_list)
        return GoogleAnswer(200, {"resourceName": name})

    def _add(self, job: Job, body: Any) -> GoogleAnswer:
        operations = body.get("operations") if isinstance(body, dict) else None
        if not isinstance(operations, list) or not operations:
            return google_error(
                400, "INVALID_ARGUMENT", "operations required", {"requestError": "EMPTY_OPERATIONS"}
            )
        for operation in operations:
            kinds = [k for k in ("create", "remove") if k in operation]
            ids = operation[kinds[0]].get("userIdentifiers", []) if len(kinds) == 1 else []
            if len(ids) != 1 or not _HASH.match(str(ids[0].get("hashedEmail", ""))):
                return google_error(
                    400,
                    "INVALID_ARGUMENT",
                    "The SHA256 encoded value is malformed.",
                    {"collectionSizeError": "INVALID_SHA256_FORMAT"},
                )
        job.operations.extend(operations)
        return GoogleAnswer(200, {})

    def start(self) -> GoogleAdsServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake Google Ads API did not start within 10 s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)

    def __enter__(self) -> GoogleAdsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
