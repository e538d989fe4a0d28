"""``/docs`` works offline: Swagger UI's files come from the app itself, never from a CDN."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx

from starter.app import create_app
from tests.conftest import make_settings
from tests.starter.conftest import asgi_client, uvicorn_server

ASSET = re.compile(r"""(?:src|href|url)\s*[=:]\s*["']([^"']+)["']""")


async def test_docs_and_every_asset_they_reference_come_from_the_app(database_url: str) -> None:
    app = create_app(make_settings(database_url), run_router=False)
    async with uvicorn_server(app) as base, httpx.AsyncClient() as http:
        page = await http.get(f"{base}/docs")
        assert page.status_code == 200, page.text
        links = ASSET.findall(page.text)
        assets = [link for link in links if not link.startswith("#")]
        assert any(a.endswith(".js") for a in assets) and any(a.endswith(".css") for a in assets)
        assert "/openapi.json" in links
        elsewhere = re.findall(r"https?://[^\s\"'<>]+", page.text)
        assert elsewhere == [], f"/docs reaches other hosts: {elsewhere}"
        # Swagger UI would otherwise ask validator.swagger.io about the schema.
        assert '"validatorUrl": null' in page.text
        for asset in assets:
            url = urljoin(f"{base}/docs", asset)
            assert urlsplit(url).netloc == urlsplit(base).netloc, url
            answer = await http.get(url)
            assert answer.status_code == 200, f"{asset}: {answer.status_code}"
            assert answer.content, asset


async def test_redoc_which_needed_a_cdn_leads_to_the_offline_docs(database_url: str) -> None:
    async with asgi_client(create_app(make_settings(database_url), run_router=False)) as api:
        answer = await api.get("/redoc")
        assert answer.status_code in (302, 307), answer.text
        assert answer.headers["location"] == "/docs"
        redirect = await api.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and "http" not in redirect.text
