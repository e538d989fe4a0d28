"""The codec server (starter/codec_server.py): Temporal's remote codec protocol, behind the
operator token, with CORS for the Temporal UI. Real app over ASGI, both databases."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import uuid
from typing import Any

import httpx
import pytest
from google.protobuf.json_format import MessageToDict
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import WorkflowSerializationContext
from temporalio.testing import WorkflowEnvironment

from kaeru.codec import ENCODING, ERASED_METADATA, ERASED_TEXT, codec_for, shred
from kaeru.db import session
from kaeru.settings import Settings
from kaeru.temporal import journey_kinds
from starter.app import create_app
from starter.codec_server import SESSION_COOKIE, SESSION_TTL, session_cookie
from tests.conftest import BIN, make_settings
from tests.starter.conftest import OPERATOR, asgi_client, uvicorn_server
from tests.support.codec import codec_client, new_master_key

UI = "http://localhost:8233"
TOKEN = "test-operator-token"
TEMPORAL = str(BIN / "temporal")
HEADERS = {**OPERATOR, "X-Namespace": "default"}


def clear(value: Any) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def body_of(*payloads: Payload) -> dict[str, Any]:
    return MessageToDict(Payloads(payloads=list(payloads)))


def values(answer: httpx.Response) -> list[Any]:
    return [json.loads(base64.b64decode(p["data"])) for p in answer.json()["payloads"]]


async def sealed(settings: Settings, value: Any, workflow_id: str = "welcome-c-7") -> Payload:
    codec = codec_for(settings, journey_kinds(settings))
    assert codec is not None
    context = WorkflowSerializationContext(namespace="default", workflow_id=workflow_id)
    [payload] = await codec.with_context(context).encode([clear(value)])
    assert payload.metadata["encoding"] == ENCODING
    return payload


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url, codec_master_key=new_master_key())


@pytest.fixture
async def api(settings: Settings) -> Any:
    async with asgi_client(create_app(settings, run_router=False)) as client:
        yield client


async def test_decode_reads_what_the_codec_encrypted_and_passes_the_rest(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    payload = await sealed(settings, {"email": "cy@example.com"})

    answer = await api.post(
        "/codec/decode", json=body_of(payload, clear("as it was")), headers=HEADERS
    )

    assert answer.status_code == 200, answer.text
    assert values(answer) == [{"email": "cy@example.com"}, "as it was"]


async def test_an_erased_customer_decodes_to_nothing_readable(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    payload = await sealed(settings, {"email": "cy@example.com"})
    with session(settings.resolved_database_url) as s:
        key_id = shred(s, "c-7")
    codec = codec_for(settings, journey_kinds(settings))
    assert codec is not None and key_id is not None
    codec.keys.forget("c-7", key_id)  # as the erase does in its process

    answer = await api.post("/codec/decode", json=body_of(payload), headers=HEADERS)

    assert answer.status_code == 200
    assert values(answer) == [ERASED_TEXT]
    [meta] = [p["metadata"] for p in answer.json()["payloads"]]
    assert base64.b64decode(meta[ERASED_METADATA]) == key_id.encode()
    assert b"cy@example.com" not in answer.content


async def test_encode_without_a_workflow_passes_through(api: httpx.AsyncClient) -> None:
    answer = await api.post("/codec/encode", json=body_of(clear(1)), headers=HEADERS)
    assert answer.status_code == 200
    assert values(answer) == [1]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Basic dGVzdC13cml0ZS1rZXk6"},  # the write key opens nothing here
    ],
)
async def test_the_operator_token_is_needed(
    api: httpx.AsyncClient, settings: Settings, headers: dict[str, str]
) -> None:
    payload = await sealed(settings, "secret")
    answer = await api.post(
        "/codec/decode", json=body_of(payload), headers={**headers, "Origin": UI}
    )
    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthorized"
    assert b"secret" not in answer.content
    # The UI can read why: the answer carries the CORS headers.
    assert answer.headers["access-control-allow-origin"] == UI


async def test_cors_preflight_for_the_ui_needs_no_token(api: httpx.AsyncClient) -> None:
    preflight = {
        "Origin": UI,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-namespace",
    }
    for path in ("/codec/decode", "/codec/encode"):
        answer = await api.options(path, headers=preflight)
        assert answer.status_code == 204
        assert answer.headers["access-control-allow-origin"] == UI
        assert "POST" in answer.headers["access-control-allow-methods"]
        allowed = answer.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type", "x-namespace"} <= {
            h.strip() for h in allowed.split(",")
        }


async def test_an_unknown_origin_gets_no_cors(api: httpx.AsyncClient) -> None:
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    answer = await api.options("/codec/decode", headers=evil)
    assert answer.status_code == 403
    assert "access-control-allow-origin" not in answer.headers
    posted = await api.post(
        "/codec/decode", json=body_of(clear(1)), headers={**HEADERS, "Origin": evil["Origin"]}
    )
    assert "access-control-allow-origin" not in posted.headers


async def test_cors_origins_are_a_setting(database_url: str) -> None:
    settings = make_settings(
        database_url,
        codec_master_key=new_master_key(),
        codec_cors_origins="https://temporal.shop.example, http://localhost:8080",
    )
    async with asgi_client(create_app(settings, run_router=False)) as api:
        for origin, allowed in (
            ("https://temporal.shop.example", True),
            ("http://localhost:8080", True),
            (UI, False),
        ):
            answer = await api.options(
                "/codec/decode", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
            )
            assert ("access-control-allow-origin" in answer.headers) is allowed


async def test_another_namespace_is_refused(api: httpx.AsyncClient) -> None:
    answer = await api.post(
        "/codec/decode", json=body_of(clear(1)), headers={**OPERATOR, "X-Namespace": "shop-b"}
    )
    assert answer.status_code == 404
    assert "'default'" in answer.json()["message"]


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'{"payloads": [{"data": 5}]}', b'{"payloads": "x"}']
)
async def test_a_bad_body_is_a_clear_400(api: httpx.AsyncClient, body: bytes) -> None:
    answer = await api.post(
        "/codec/decode", content=body, headers={**HEADERS, "Content-Type": "application/json"}
    )
    assert answer.status_code == 400
    assert answer.json()["code"] == "invalid_payloads"
    assert "payloads" in answer.json()["message"]


async def test_a_key_from_another_database_is_a_clear_503(api: httpx.AsyncClient) -> None:
    alien = Payload(metadata={"encoding": ENCODING, "kaeru-key": b"0123abcd"}, data=b"x" * 40)
    answer = await api.post("/codec/decode", json=body_of(alien), headers=HEADERS)
    assert answer.status_code == 503
    assert answer.json()["code"] == "codec_key_unavailable"
    assert "KAERU_DATABASE_URL" in answer.json()["message"]


async def test_with_the_codec_off_the_server_says_so(database_url: str) -> None:
    async with asgi_client(create_app(make_settings(database_url), run_router=False)) as api:
        answer = await api.post("/codec/decode", json=body_of(clear(1)), headers=HEADERS)
    assert answer.status_code == 503
    assert "KAERU_CODEC_MASTER_KEY" in answer.json()["message"]


async def test_the_temporal_cli_reads_payloads_through_the_codec_server(
    dev_server_env: WorkflowEnvironment, sqlite_url: str
) -> None:
    """`temporal workflow show --codec-endpoint ... --codec-auth 'Bearer ...'` as documented:
    a journey's input is encrypted in Temporal and readable through the codec server.

    On the dev server: a journey started on the shared time-skipping server with no worker
    left its clock stuck for every later test ("Timeout expired"), even once terminated."""
    settings = make_settings(sqlite_url, codec_master_key=new_master_key())
    client = codec_client(dev_server_env.client, settings)
    journey_id = f"welcome-c-{uuid.uuid4().hex[:8]}"
    # No worker needed: the start event holds the encrypted input.
    handle = await client.start_workflow(
        "Welcome", {"customer_id": "cy@example.com"}, id=journey_id, task_queue="nobody"
    )
    address = dev_server_env.client.service_client.config.target_host
    try:
        async with uvicorn_server(create_app(settings, run_router=False)) as base:

            def show(*codec: str) -> str:
                return subprocess.run(
                    [
                        TEMPORAL,
                        "workflow",
                        "show",
                        "-w",
                        journey_id,
                        "--address",
                        address,
                        "-o",
                        "json",
                        *codec,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                ).stdout

            raw = await asyncio.to_thread(show)
            read = await asyncio.to_thread(
                show, "--codec-endpoint", f"{base}/codec", "--codec-auth", f"Bearer {TOKEN}"
            )
    finally:
        await handle.terminate("test over")
    assert started_input(raw) == (b"binary/encrypted", None)
    assert started_input(read) == (b"json/plain", {"customer_id": "cy@example.com"})


def started_input(shown: str) -> tuple[bytes, Any]:
    """The encoding and (if JSON) the value of the input ``temporal workflow show`` printed."""
    events = json.loads(shown)["events"]
    [payload] = events[0]["workflowExecutionStartedEventAttributes"]["input"]["payloads"]
    encoding = base64.b64decode(payload["metadata"]["encoding"])
    data = base64.b64decode(payload["data"])
    return encoding, json.loads(data) if encoding == b"json/plain" else None


# ---- the Temporal UI: a browser signs in once, then sends the cookie -----------------------------


async def test_a_browser_signs_in_and_the_ui_decodes_with_the_cookie(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    payload = await sealed(settings, {"email": "cy@example.com"})
    form = await api.get("/codec/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert "http://kaeru.test/codec/" in form.text  # the endpoint to give the UI

    wrong = await api.post("/codec/login", data={"token": "not-it"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    signed = await api.post("/codec/login", data={"token": TOKEN})
    assert signed.status_code == 200
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/codec" in cookie
    assert TOKEN not in signed.headers["set-cookie"]

    # As the UI sends it: X-Namespace, its origin, credentials (the cookie), no token.
    answer = await api.post(
        "/codec/decode",
        json=body_of(payload),
        headers={"X-Namespace": "default", "Origin": UI},
        cookies={SESSION_COOKIE: signed.cookies[SESSION_COOKIE]},
    )
    assert answer.status_code == 200, answer.text
    assert values(answer) == [{"email": "cy@example.com"}]
    assert answer.headers["access-control-allow-credentials"] == "true"


@pytest.mark.parametrize(
    "cookie",
    [
        "123.abc",  # forged
        session_cookie(TOKEN, now=time.time() - SESSION_TTL - 1),  # expired
        session_cookie("an-older-operator-token"),  # signed with another token
    ],
    # Ids that do not hold the clock: pytest-xdist's workers must collect the same tests.
    ids=["forged", "expired", "another-token"],
)
async def test_a_bad_or_old_cookie_opens_nothing(
    api: httpx.AsyncClient, settings: Settings, cookie: str
) -> None:
    payload = await sealed(settings, "secret")
    answer = await api.post(
        "/codec/decode",
        json=body_of(payload),
        headers={"X-Namespace": "default"},
        cookies={SESSION_COOKIE: cookie},
    )
    assert answer.status_code == 401
    assert b"secret" not in answer.content
