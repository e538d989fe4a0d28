"""A real SMTP server on loopback (aiosmtpd) that tests can script.

In a test, in the test's own event loop::

    async with SMTPTestServer() as server:
        settings = make_settings(url, smtp_port=server.port)
        server.reject_recipient("gone@example.com", 550)
        ...
        assert len(server.messages) == 1

From another process (a worker-crash test), as a spool that writes each message to a file::

    python -m tests.support.smtp --port 2525 --spool /tmp/spool

It prints ``listening on 127.0.0.1:<port>`` once it accepts connections (``--port 0`` picks a
free port), writes every accepted message to ``<spool>/<n>.eml`` and, while the file
``<spool>/stall`` exists, holds its answer to DATA: the message is received and written,
the client is still waiting for the reply, which is the window a crash test needs.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import TracebackType
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"


@dataclass
class ReceivedMessage:
    """One message the server accepted (or, while stalled, received)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    message: EmailMessage = field(repr=False)


class _Handler:
    """aiosmtpd hooks: refuse what the test asks to refuse, keep the rest."""

    def __init__(self, server: SMTPTestServer) -> None:
        self.server = server

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = self.server.refused_recipients.get(address.lower())
        if reply is not None:
            return reply
        await self.server.hold("RCPT")
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        received = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            message=email.message_from_bytes(data, policy=email.policy.default),
        )
        if self.server.data_refusals:
            self.server.refused_messages.append(received)
            code = self.server.data_refusals.pop(0)
            await self.server.hold("DATA")  # a stall holds a refusal as it holds an acceptance
            return _REPLIES.get(code, f"{code} Refused")
        self.server.keep(received)
        await self.server.hold("DATA")
        return "250 Message accepted for delivery"


class _Session(SMTP):
    """aiosmtpd's SMTP session, able to hang up on the DATA command before its ``354``."""

    def __init__(self, owner: SMTPTestServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self.owner = owner

    async def smtp_DATA(self, arg: str) -> None:
        if self.owner.data_hangups:
            self.owner.data_hangups -= 1
            self.owner.hung_up += 1
            assert self.transport is not None
            self.transport.close()  # nothing of the message has been sent: it cannot arrive
            return
        await super().smtp_DATA(arg)


_REPLIES = {
    450: "450 4.2.0 Mailbox temporarily unavailable, try again later",
    451: "451 4.3.0 Local error in processing, try again later",
    452: "452 4.3.1 Insufficient system storage",
    550: "550 5.1.1 Recipient address rejected: user unknown",
    554: "554 5.7.1 Message rejected as spam",
}


class SMTPTestServer:
    """An SMTP server on 127.0.0.1 with an ephemeral port. Use it as an async context manager.

    Args:
        port: 0 picks a free port.
        spool: if set, every accepted message is also written to ``<spool>/<n>.eml`` and
            ``<spool>/stall`` holds the DATA reply while it exists.
        credentials: if set, AUTH PLAIN/LOGIN is offered (without TLS) and must match.
    """

    def __init__(
        self,
        port: int = 0,
        spool: Path | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.requested_port = port
        self.spool = spool
        self.credentials = credentials
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        #: Messages whose data arrived but which were refused (see :meth:`reject_data`).
        self.refused_messages: list[ReceivedMessage] = []
        self.refused_recipients: dict[str, str] = {}
        self.data_refusals: list[int] = []
        #: How many more DATA commands to answer by hanging up, before the 354 (see
        #: :meth:`hang_up_on_data`), and how many were.
        self.data_hangups = 0
        self.hung_up = 0
        self.connections = 0
        #: Set while a reply is being held (so a test can act inside the window).
        self.stalled = asyncio.Event()
        #: How many sessions are being held right now.
        self.holding = 0
        self._stall_at = "DATA"
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None

    # ---- scripting ------------------------------------------------------------------------

    def reject_recipient(self, address: str, code: int = 550, reply: str | None = None) -> None:
        """Answer RCPT TO ``address`` with ``code``: 550 (permanent) or 450 (temporary).

        ``reply`` replaces the whole reply line, e.g. ``"554 5.7.1 Relay access denied"``.
        """
        self.refused_recipients[address.lower()] = reply or _REPLIES.get(code, f"{code} Refused")

    def accept_recipient(self, address: str) -> None:
        self.refused_recipients.pop(address.lower(), None)

    def reject_data(self, code: int = 554, times: int = 1) -> None:
        """Answer the next ``times`` messages, after their data, with ``code`` (451 or 554)."""
        self.data_refusals.extend([code] * times)

    def hang_up_on_data(self, times: int = 1) -> None:
        """Close the connection on the next ``times`` DATA commands, before answering ``354``.

        The client has sent nothing of the message yet, so the server provably holds nothing.
        """
        self.data_hangups += times

    def stall(self, at: str = "DATA") -> None:
        """Hold every reply to ``at`` until :meth:`release`.

        ``DATA``: after the whole message is received (and kept, or refused), before the reply.
        ``RCPT``: before the recipient is answered, when the server holds nothing yet.
        """
        self._stall_at = at
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    # ---- internals --------------------------------------------------------------------------

    def keep(self, received: ReceivedMessage) -> None:
        self.messages.append(received)
        if self.spool is not None:
            number = len(list(self.spool.glob("*.eml"))) + 1
            partial = self.spool / f"{number}.eml.part"
            partial.write_bytes(received.data)
            partial.rename(self.spool / f"{number}.eml")  # a reader never sees half a file

    async def hold(self, command: str) -> None:
        flag = self.spool / "stall" if self.spool is not None and command == "DATA" else None

        def held() -> bool:
            stalled = not self._open.is_set() and command == self._stall_at
            return stalled or (flag is not None and flag.exists())

        if not held():
            return
        self.holding += 1
        self.stalled.set()
        try:
            while held():
                try:
                    await asyncio.wait_for(self._open.wait(), timeout=0.05)
                except TimeoutError:
                    continue
        finally:
            self.holding -= 1
            if not self.holding:
                self.stalled.clear()

    def _login(self, mechanism: str, login: bytes, password: bytes) -> bool:
        return self.credentials is not None and (login, password) == (
            self.credentials[0].encode(),
            self.credentials[1].encode(),
        )

    def _protocol(self) -> SMTP:
        self.connections += 1
        return _Session(
            self,
            hostname="smtp.kaeru.test",
            ident="kaeru test SMTP",
            loop=asyncio.get_running_loop(),
            # AUTH is offered without TLS only when the test asks for it (loopback only).
            auth_require_tls=self.credentials is None,
            auth_callback=self._login,
        )

    async def start(self) -> SMTPTestServer:
        if self.spool is not None:
            self.spool.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, HOST, self.requested_port
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> SMTPTestServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def _serve(port: int, spool: Path) -> None:
    server = await SMTPTestServer(port, spool).start()
    print(f"listening on {HOST}:{server.port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A loopback SMTP server that spools .eml files")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--spool", type=Path, required=True, help="directory for <n>.eml files")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port, args.spool))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
