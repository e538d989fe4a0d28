"""The test SMTP server's process mode, which worker-crash tests drive from outside."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def spool_server(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    spool = tmp_path / "spool"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.smtp",
        "--port",
        "0",
        "--spool",
        str(spool),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = (await asyncio.wait_for(process.stdout.readline(), timeout=20)).decode()
    assert line.startswith("listening on 127.0.0.1:"), line
    try:
        yield int(line.rsplit(":", 1)[1]), spool
    finally:
        process.terminate()
        await process.wait()


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "shop@kaeru.test", "alice@example.com", subject
    msg.set_content("hello")
    return msg


async def test_spools_messages_and_holds_data_while_the_stall_flag_exists(
    spool_server: tuple[int, Path],
) -> None:
    port, spool = spool_server

    await aiosmtplib.send(message("first"), hostname="127.0.0.1", port=port, timeout=10)
    assert b"Subject: first" in (spool / "1.eml").read_bytes()

    (spool / "stall").touch()
    held = asyncio.create_task(
        aiosmtplib.send(message("second"), hostname="127.0.0.1", port=port, timeout=10)
    )
    for _ in range(200):  # the server writes the message, then holds its answer
        if (spool / "2.eml").exists():
            break
        await asyncio.sleep(0.05)
    assert b"Subject: second" in (spool / "2.eml").read_bytes()
    await asyncio.sleep(0.3)
    assert not held.done()

    (spool / "stall").unlink()
    errors, _ = await asyncio.wait_for(held, timeout=10)
    assert errors == {}
