"""Headless Chromium driven over the DevTools protocol: navigate, type, read the DOM after the
page's scripts ran, take screenshots. Only what the dashboard's browser tests need.

Debian's ``chromium`` package is the browser (``.ci/run`` installs it where it is missing). On a
machine without it :func:`chromium_or_skip` fails the test with the install command when
``CI=true`` (CI must run the browser tests), and otherwise skips it with that reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

#: Names the browser goes by on Debian and elsewhere.
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MISSING = (
    "headless Chromium is missing, so the dashboard's browser tests cannot run: install "
    "Debian's chromium package (as root: apt-get update && apt-get install -y chromium); "
    ".ci/run installs it on CI"
)


def chromium_or_skip() -> str:
    """The browser's path; without one, a failure on CI and a skip (with the fix) elsewhere."""
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(MISSING)
    pytest.skip(MISSING)


class Tab:
    """One page of the browser, spoken to over its DevTools WebSocket."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its answer (events in between are dropped)."""
        number = next(self.ids)
        await self.socket.send(json.dumps({"id": number, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        answer = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll until ``expression`` is truthy in the page (after a navigation, a script)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            with contextlib.suppress(RuntimeError):  # the page is still being replaced
                value = await self.evaluate(expression)
                if value:
                    return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r} in the browser")
            await asyncio.sleep(0.1)

    async def open(self, url: str, ready: str = "true") -> str:
        """Go to ``url``, wait for the load and for ``ready``; the DOM as the browser has it."""
        await self.call("Page.navigate", url=url)
        await self.wait_for(
            f"document.readyState === 'complete' && location.href === {json.dumps(url)}"
        )
        await self.wait_for(ready)
        dom: str = await self.evaluate("document.documentElement.outerHTML")
        return dom

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page at ``path``."""
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@asynccontextmanager
async def headless_chromium(binary: str, profile: Path) -> AsyncIterator[Tab]:
    """A headless Chromium with a fresh profile, and its first tab."""
    process = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        f"--user-data-dir={profile}",
        "--window-size=1280,1600",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        port = None
        seen: list[str] = []
        while port is None:
            line = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
            if not line:
                raise RuntimeError(f"Chromium exited before it listened: {''.join(seen)}")
            seen.append(line)
            if found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line):
                port = int(found.group(1))
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        [page] = [t for t in targets if t["type"] == "page"]
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as socket:
            tab = Tab(socket)
            await tab.call("Page.enable")
            yield tab
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
