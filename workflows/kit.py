"""The journey kit: what every journey shares, so a new journey is one small class.

A journey receives the customer's events through one signal (``event``), waits with
:meth:`Journey.within` and :meth:`Journey.pause` (which also end it at once on a purchase),
touches the world only through activities named by string, and keeps operators informed
through search attributes, memo, current details and the ``status`` query.

This module runs inside the workflow sandbox: it imports nothing that does I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Generic, TypeVar, cast

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributePair,
    TypedSearchAttributes,
)
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.types import (
        ALREADY_PURCHASED,
        NO_EMAIL_ADDRESS,
        NOT_CONSENTED,
        UNDELIVERABLE,
        AudienceChange,
        AudienceResult,
        AudienceTargets,
        ConversionInput,
        CouponInfo,
        EntryClaim,
        EntryClaimResult,
        EntryPlan,
        IssueCouponInput,
        JourneyEntryInput,
        JourneyEntryResult,
        ParkRemoval,
        ReserveSendInput,
        ReserveSendResult,
        SendEmailInput,
        SendEmailResult,
    )
    from activities.types import DROP as DROP
    from activities.types import REFUSED as REFUSED
    from activities.types import SEND as SEND
    from kaeru.commerce import ORDER_COMPLETED as ORDER_COMPLETED
    from kaeru.commerce import order_total_of
    from kaeru.consent import CONSENT_WITHDRAWN as CONSENT_WITHDRAWN
    from kaeru.consent import EMAIL as EMAIL_CHANNEL
    from kaeru.holds import GLOBAL as GLOBAL_SWITCH
    from kaeru.holds import (
        HELD_BY_KILL_SWITCH,
        KILL_SWITCH,
        OUTSIDE_ACTIVITIES,
        PAUSE_SIGNAL,
        PAUSED,
        RELEASE_JOURNEY,
        RESUME_SIGNAL,
        PauseJourney,
        ResumeJourney,
    )
    from kaeru.identity import IDENTITY_MERGED as IDENTITY_MERGED
    from kaeru.machine_opens import ALL_LINKS_SAME_SECOND, APPLE_MPP, SCANNER_UA
    from kaeru.metric_names import JOURNEYS_ENDED, JOURNEYS_STARTED
    from kaeru.search_attributes import CUSTOMER_ID, HELD, OUTCOME, SEARCH_ATTRIBUTES, STEP
    from kaeru.variants import HOLDOUT, Experiment, assign, held_out

T = TypeVar("T")
#: A journey's settings dataclass (see :func:`setting`).
S = TypeVar("S")

__all__ = ["CUSTOMER_ID", "OUTCOME", "SEARCH_ATTRIBUTES", "STEP"]

EVENT_SIGNAL = "event"
#: The message was not sent: one on the same topic went to the customer lately (the email
#: activity's status; the journey decides what to do without it).
SKIPPED = "skipped"
#: ``workflow.patched`` ids, each naming a change to running journeys (docs/writing-a-journey.md).
OPENS_NEED_MESSAGE_KEY = "opens-need-message-key"
#: An activity's final failure no longer overrides a purchase the journey already received.
PURCHASE_WINS = "purchase-always-wins"
#: Events that arrive while a journey ends start the customer's next journey.
HAND_OVER_LATE_EVENTS = "late-events-start-the-next-journey"
#: A removal from an audience that fails for good is parked for the audience sweeper.
PARK_FAILED_REMOVALS = "park-failed-audience-removals"
#: Audience joins and leaves are queued for the audience flusher's batches (every configured
#: provider: Meta, Google Customer Match, or the local store), and a join waits until the
#: flush applied it; before this patch each join and leave was one call to one provider.
BATCHED_AUDIENCES = "batched-audiences"
#: Opens and clicks the tracking endpoint judged a machine's are not counted, and a human one
#: of a message with two or more links is counted once no burst verdict came.
MACHINE_OPENS_NOT_COUNTED = "machine-opens-not-counted"
#: How long after a human open or click of a message with two or more links the journey
#: counts it: the verdict on a scanner's burst (every link within one second) is stored at
#: its last link and routed right behind the first, well within this.
MACHINE_VERDICT_WAIT = timedelta(seconds=10)
#: Who fetched, for the story, by the tracking endpoint's reason (kaeru/machine_opens.py).
MACHINE_REASONS = {
    APPLE_MPP: "Apple Mail Privacy Protection",
    SCANNER_UA: "a link scanner",
    ALL_LINKS_SAME_SECOND: "a scanner following every link at once",
}
#: A ``Marketing Consent Withdrawn`` for the journey's channel (email) and kind ends a
#: marketing journey ``unsubscribed``; before this patch the kit left the event to the journey.
CONSENT_ENDS_JOURNEYS = "consent-withdrawal-ends-marketing-journeys"
#: A journey the router started records its entry (one ``journey_entered`` touchpoint with its
#: version and arm), takes its experiments' arms (a promoted winner, if any) and, when the
#: kind's holdout takes the customer, ends ``holdout`` at once having sent nothing.
JOURNEY_ENTERED = "journey-entered"
#: The outcome of a marketing journey whose customer unsubscribed (or may not be marketed to).
UNSUBSCRIBED = "unsubscribed"
#: A marketing message asks the send gate (``reserve_send``: consent, frequency caps,
#: priority, quiet hours) for a slot before ``send_email``.
SEND_GATE = "send-gate"
#: An outside step the kill switch held, or one after an operator's pause, waits for a
#: ``resume`` and then runs again with the same input (kaeru/holds.py); before this patch a
#: journey had no hold.
HOLDS = "hold-before-outside-steps"
#: A step the kill switch held tries again after this if no ``resume`` came (a journey the
#: release missed: held as the switch went off), then after twice as long, up to
#: :data:`HOLD_RECHECK_MAX`: each try is an activity attempt and a timer.
HOLD_RECHECK = timedelta(minutes=1)
HOLD_RECHECK_MAX = timedelta(hours=1)
#: Stored by ingestion for the anonymous customer an identify merged into a known one
#: (properties ``{"into": <customer id>}``): every journey of the anonymous one ends ``merged``.
IDENTIFY = "identify"
AD_CLICKED = "Ad Clicked"
EMAIL_OPENED = "Email Opened"
EMAIL_LINK_CLICKED = "Email Link Clicked"

#: How far after a converted order the next generation's orders count (seconds): "after" it
#: even where a stored time rounds to the microsecond.
ORDER_AFTER = 0.001
#: Temporary failures retry with backoff; what retrying cannot fix is non-retryable.
RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)
#: How long a message step keeps retrying a down SMTP server before the journey gives up.
SEND_DEADLINE = timedelta(hours=12)
#: A worker that dies mid-activity is noticed within this, and the activity runs again.
HEARTBEAT = timedelta(seconds=10)
#: How long a marketing message may wait for a send slot (frequency caps, quiet hours) before
#: it is dropped, unless the journey says otherwise (``send_message(stale_after=...)``). Two
#: days: with the default caps (1 a day, 3 a week) a message waits at most a day and a night
#: when one other journey took the day's slot, and what the shopper did two days ago is the
#: oldest thing a reminder may still be about.
STALE_AFTER = timedelta(days=2)
#: The priority of a journey kind that declares none (``Journey.priority``).
DEFAULT_PRIORITY = 50
#: How long the journey's end tries to take the shopper out of an audience before it parks
#: the removal for the audience sweeper (which retries it later): short, so a platform that
#: is down does not keep the events that came meanwhile from the customer's next journey.
REMOVAL_DEADLINE = timedelta(minutes=10)
#: Events other than orders kept for the next journey while one ends; past it, what the next
#: journey does not need goes first, then the journey collapses its own (the cart's), and
#: only then the oldest go (said in the story). An ``Order Completed`` is never dropped.
MAX_HELD_EVENTS = 20


@dataclass
class JourneyEvent:
    """One stored customer event, as the router delivers it. ``seq`` orders a customer's events."""

    seq: int
    name: str
    message_id: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class Purchase:
    order_id: str
    value_minor: int
    currency: str
    coupon: str | None
    occurred_at: datetime


@dataclass
class JourneyResult:
    outcome: str
    last_step: str
    order_id: str | None = None
    coupon_code: str | None = None


@dataclass
class JourneyStatus:
    """What the ``status`` query answers: where the journey is and how it got there."""

    journey_id: str
    customer_id: str
    step: str
    outcome: str | None
    waiting_for: str | None
    waiting_until: datetime | None
    story: list[str]
    details: dict[str, Any] = field(default_factory=dict)
    #: What holds it before its next outside step: ``kill-switch``, ``paused`` or None.
    held: str | None = None


class JourneyExit(Exception):
    """Raised inside a journey to end it with ``outcome`` (purchase, emptied cart, bounce...)."""

    def __init__(self, outcome: str) -> None:
        super().__init__(outcome)
        self.outcome = outcome


@dataclass(frozen=True)
class Reentry:
    """A journey kind's re-entry rule, enforced by the kit when a journey starts.

    ``Reentry(every=7 * 86400)``: at most once per customer per 7 days; ``Reentry()``: once
    ever. A refused start ends at once with outcome ``not_reentered`` and sends nothing.
    """

    every: float | None = None


def setting(description: str, duration: bool = False, *, name: str | None = None) -> dict[str, Any]:
    """Field metadata that makes a journey-settings dataclass field a ``KAERU_<PREFIX>_<FIELD>``
    setting: ``delay: float = field(default=3600.0, metadata=setting("...", duration=True))``.

    Args:
        description: what the setting means (the settings table shows it).
        duration: the value is seconds, read as seconds (``86400``) or ISO 8601 (``P1D``).
        name: the variable's part after the prefix, when not the field's name upper-cased.

    Fields without it are fixed in code, not settings. A settings dataclass may define
    ``check(self)`` raising ``ValueError`` to refuse values (the reader names the variable).
    """
    return {"kaeru_setting": description, "duration": duration, "name": name}


@dataclass
class JourneyInput:
    """The input of a journey that uses the kit's ``@workflow.init`` (most journeys).

    ``settings`` is the journey's settings dataclass as a dict (the kit turns it back into
    ``settings_class``); the rest is the kit's carried state (continue-as-new, hand-over).
    """

    customer_id: str
    settings: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    pending: list[JourneyEvent] = field(default_factory=list)
    last_seq: int = 0
    story: list[str] = field(default_factory=list)
    started_at: float | None = None
    orders_until: float | None = None
    #: What the journey carries over a continue-as-new (:meth:`Journey.carry`), as a dict.
    carried: dict[str, Any] | None = None
    #: The kind's send priority when the router started it (``KAERU_<PREFIX>_PRIORITY``);
    #: None: the class's ``priority``.
    priority: int | None = None
    #: How the journey enters (holdout, experiments), set by the router and handed to the
    #: next generation; None: it records no entry (a run a continue-as-new started).
    entry: EntryPlan | None = None
    #: The experiments' arms a continue-as-new carries (None: not entered in this way).
    arms: dict[str, str] | None = None


def message_name(step: str) -> str:
    """A message step as a person names it in a story: ``cart_email`` reads "the cart email"."""
    words = step.replace("_", " ").strip()
    return f"the {words}" if words.endswith("email") else f"the {words} email"


def counted(n: int, noun: str) -> str:
    """``counted(1, "item")`` is "1 item", ``counted(2, "item")`` "2 items"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def purchase_from(event: JourneyEvent) -> Purchase:
    """Read a Segment ``Order Completed`` event as ingestion does. Bad amounts count as zero."""
    order = order_total_of(event.properties, event.message_id)
    return Purchase(
        order_id=order.order_id,
        value_minor=order.total_minor or 0,
        currency=order.currency,
        coupon=order.coupon,
        occurred_at=event.occurred_at,
    )


def _found_order(error: ApplicationError) -> Purchase | None:
    """The order an ``AlreadyPurchased`` error names in its details (activities/email.py),
    or None when it names none (an older worker) or names it in a shape not understood."""
    details = error.details
    found = details[0] if details else None
    if not isinstance(found, dict):
        return None
    try:
        return Purchase(
            order_id=str(found["order_id"]),
            value_minor=int(found["total_minor"]),
            currency=str(found["currency"]),
            coupon=found.get("coupon") if isinstance(found.get("coupon"), str) else None,
            occurred_at=datetime.fromtimestamp(float(found["completed_at"]), UTC),
        )
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return None


class _DroppedAfterHold(Exception):
    """The send gate, asked again after a hold, dropped the message (stale)."""


class _HeldByKillSwitch(Exception):
    """An outside step the kill switch held (it did not act): ``Journey.call`` waits."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _held_reason(error: ApplicationError) -> str:
    """What the operator said turning the switch on, from a ``KillSwitchHeld`` error."""
    details = error.details
    found = details[0] if details else None
    scope = found.get("scope") if isinstance(found, dict) else None
    reason = found.get("reason") if isinstance(found, dict) else None
    which = "global" if scope == GLOBAL_SWITCH else str(scope or "a")
    return f"{which} switch" + (f": {reason}" if reason else "")


class Journey(Generic[S]):
    """Base of every journey workflow. A subclass declares the class attributes below, a
    ``@workflow.run`` that returns ``await self.run_journey(self.steps)``, and ``steps()``.

    The registry (kaeru/journeys.py) finds every subclass with ``@workflow.defn`` in the
    ``workflows`` package and in ``KAERU_JOURNEY_MODULES``: the worker, the router and the
    settings table come from these attributes.
    """

    #: Prefix of the workflow id: ``<kind>-<customer id>``.
    kind: ClassVar[str]
    #: What operators read (the router's logs, the settings table).
    label: ClassVar[str] = ""
    #: Events that start this journey when none is live (signal-with-start).
    starts_on: ClassVar[frozenset[str]] = frozenset()
    #: An ``identify`` starts it when one of these traits is in its ``changed_traits``
    #: (``{"email"}``: a new subscriber, or one whose address changed).
    starts_on_traits: ClassVar[frozenset[str]] = frozenset()
    #: Events that only reach a live journey (an ad click, a product view).
    listens_to: ClassVar[frozenset[str]] = frozenset()
    #: An ``Order Completed`` ends it ``purchased`` (False for a journey one starts).
    ends_on_purchase: ClassVar[bool] = True
    #: Events that end it, with the outcome each ends it with (browse abandonment:
    #: ``{"Product Added": "carted"}``).
    exits_on: ClassVar[Mapping[str, str]] = {}
    #: Its settings dataclass: fields with :func:`setting` metadata are ``KAERU_<PREFIX>_*``.
    settings_class: ClassVar[type[Any] | None] = None
    #: The settings' prefix; None: ``kind`` upper-cased, ``-`` as ``_``.
    settings_prefix: ClassVar[str | None] = None
    #: Whether ``KAERU_<PREFIX>_ENABLED`` defaults to true. A disabled journey is never
    #: started; its events still reach a live one, so it ends properly.
    enabled_by_default: ClassVar[bool] = True
    #: Its re-entry rule; None: a customer may enter again as soon as the last one ended.
    reentry: ClassVar[Reentry | None] = None
    #: Sends only transactional messages (an order confirmation): marketing consent does not
    #: apply, and a withdrawal of consent neither reaches nor ends it.
    transactional: ClassVar[bool] = False

    #: Its place when the customer's marketing messages compete for the frequency cap: a
    #: lower number goes first. ``KAERU_<PREFIX>_PRIORITY`` overrides it (kaeru/journeys.py),
    #: for journeys started after the change (it travels in the journey's input).
    priority: ClassVar[int] = DEFAULT_PRIORITY
    #: The version of its behaviour, recorded with each entry so funnels split by it: bump it
    #: when a change alters what the journey does (its messages, waits or branches).
    version: ClassVar[str] = "1"
    #: Its experiments (kaeru/variants.py): name → :class:`~kaeru.variants.Experiment` on one
    #: message step each. ``KAERU_<PREFIX>_EXPERIMENTS`` names those that run.
    experiments: ClassVar[Mapping[str, Experiment]] = {}

    settings: S

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A journey that starts on events must say how its next generation starts: checked
        when the class is defined (the worker's import), not at a journey's end, where a
        missing method would fail every workflow task of a journey already running."""
        super().__init_subclass__(**kwargs)
        steps: set[str] = set()
        for name, experiment in cls.experiments.items():
            experiment.check(name)
            if experiment.step in steps:
                raise TypeError(
                    f"{cls.__name__} has two experiments on step {experiment.step!r}: one "
                    "experiment per message step (give one experiment more variants instead)"
                )
            steps.add(experiment.step)
        if (
            (cls.starts_on or cls.starts_on_traits)
            and cls.next_journey is Journey.next_journey
            and cls.__init__ is not Journey.__init__
        ):
            raise TypeError(
                f"{cls.__name__} starts on {sorted(cls.starts_on)} but does not define "
                "next_journey(events): return its input for the next generation (see "
                "docs/writing-a-journey.md)"
            )

    @workflow.init
    def __init__(self, start: JourneyInput) -> None:
        """The kit's start for journeys that take a :class:`JourneyInput`: sets up the kit's
        state and ``self.settings`` (an instance of ``settings_class``), then calls
        :meth:`restore` with what a continue-as-new carried."""
        self._begin(
            start.customer_id,
            start.last_seq,
            start.story,
            generation=start.generation,
            started_at=start.started_at,
            pending=start.pending,
            orders_until=start.orders_until,
            priority=start.priority,
            entry=start.entry,
            arms=start.arms,
            continued=start.carried is not None,
        )
        cls = type(self).settings_class
        self.settings = cast(S, cls(**start.settings) if cls is not None else None)
        self._settings_dict = dict(start.settings)
        if start.carried is not None:
            self.restore(start.carried)

    def carry(self) -> dict[str, Any]:
        """What a continue-as-new carries of this journey's own state (JSON-ready)."""
        return {}

    def restore(self, carried: dict[str, Any]) -> None:
        """Take back what :meth:`carry` gave, in the run a continue-as-new started."""

    @classmethod
    def start_input(cls, customer_id: str, settings: Any) -> Any:
        """The input the router starts this journey with (``settings``: its settings
        dataclass, read from ``KAERU_<PREFIX>_*``). Journeys with their own input override it."""
        values = dataclasses.asdict(settings) if settings is not None else {}
        return JourneyInput(customer_id=customer_id, settings=values)

    def _begin(
        self,
        customer_id: str,
        last_seq: int = 0,
        story: list[str] | None = None,
        *,
        generation: int = 0,
        started_at: float | None = None,
        pending: list[JourneyEvent] | None = None,
        orders_until: float | None = None,
        priority: int | None = None,
        entry: EntryPlan | None = None,
        arms: dict[str, str] | None = None,
        continued: bool = False,
    ) -> None:
        """Set up the kit's state. Call it from the journey's ``@workflow.init``.

        Args:
            customer_id: whose journey this is.
            last_seq: the newest ``seq`` already taken (a continued run carries it).
            story: the story so far (a continued run carries it).
            generation: how many journeys of this workflow id ended and handed events on to
                a next one (0 for a journey the router started); part of every key.
            started_at: when the events that started the journey happened (epoch seconds).
            pending: events handed over by the journey that ended before this one, taken
                before any other.
            orders_until: when the newest order an earlier generation converted happened
                (epoch seconds): orders until then do not stop this journey's emails.
            priority: the send priority its input carries; None: the class's ``priority``.
            entry: how the journey enters (its input's ``entry``); None: no entry recorded.
            arms: the experiments' arms a continue-as-new carried.
            continued: this run continues the same journey (a continue-as-new that carried
                its state for a long history): it is not counted as a journey started.
        """
        self.customer_id = customer_id
        self.last_seq = last_seq
        self.story: list[str] = list(story or [])
        self.generation = generation
        self.started_at = started_at
        self.held: list[JourneyEvent] = []
        self._pending: list[JourneyEvent] = list(pending or [])
        self.orders_until = orders_until
        #: What this journey's marketing messages ask the send gate with (lower goes first).
        self.send_priority = priority if priority is not None else type(self).priority
        self.entry_plan = entry
        #: Experiment → this customer's arm; None: the journey did not enter with variants
        #: (it began before they existed), so its messages are every experiment's default.
        self.arms = dict(arms) if arms is not None else None
        self._exit_timers = 0
        self._timers: set[asyncio.Task[None]] = set()
        self.step = "started"
        self.completed_step = "started"
        self.outcome: str | None = None
        self.exit_reason: str | None = None
        #: What must still hold for a waited exit (``exit_unless_undone``) when it is taken.
        self._exit_still: Callable[[], bool] | None = None
        self.purchase: Purchase | None = None
        self.engaged: set[str] = set()
        #: Burst verdicts per ``"<message key> open|click"``: a human open or click waiting
        #: to be counted is not counted if one came meanwhile.
        self._vetoes: dict[str, int] = {}
        self.audiences: dict[str, str] = {}
        #: The audiences of ``audiences`` joined through the flusher's queue (leave the same way).
        self.queued_audiences: set[str] = set()
        self.ad_clicks = 0
        self.waiting_for: str | None = None
        self.waiting_until: datetime | None = None
        #: The event that started this journey (this run's first start event), if any: an
        #: order confirmation reads its order here.
        self.start_event: JourneyEvent | None = None
        #: The newest events taken, numbered, for :meth:`wait_for`.
        self._taken = 0
        self._recent: list[tuple[int, JourneyEvent]] = []
        #: An operator's pause (its reason): the next outside step waits for a resume.
        self.paused: str | None = None
        #: What holds the journey now (``KaeruHeld``): ``kill-switch``, ``paused`` or None.
        self.held_by: str | None = None
        #: Resumes received: a held step waits for the next one.
        self._resumes = 0
        #: This run continues a long journey (continue-as-new for its history): not a new one.
        self._continued = continued

    # ---- events -------------------------------------------------------------------------

    @workflow.signal(name=EVENT_SIGNAL)
    def receive(self, event: JourneyEvent) -> None:
        """Take one routed event. A re-delivered event (same or older ``seq``) is ignored.

        Once the journey is ending (it has its outcome, or a purchase decided it), events are
        held for the customer's next journey instead (see :meth:`run_journey`).
        """
        self._take_pending()
        if event.seq <= self.last_seq:
            return
        self.last_seq = event.seq
        if self.outcome is not None or self.exit_reason == "purchased":
            # Ending: a new cart after the purchase belongs to the next journey, and the first
            # order stays the one this journey converted on.
            self._hold(event)
            return
        self._accept(event)

    @workflow.signal(name=PAUSE_SIGNAL)
    def pause_requested(self, request: PauseJourney) -> None:
        """An operator's pause: hold before the next outside step until a ``resume``.

        Only under :data:`HOLDS`: a pause a worker of the code before it received did nothing
        (it had no such signal), and its replay must do nothing either.
        """
        if self.outcome is not None or self.paused is not None:
            return
        if not workflow.patched(HOLDS):
            return
        self.paused = request.reason or "no reason given"
        self._show_held(PAUSED)
        self.tell(f"paused by {request.actor or 'an operator'}: {self.paused}")

    @workflow.signal(name=RESUME_SIGNAL)
    def resume_requested(self, request: ResumeJourney) -> None:
        """Let a held step try again; from an operator (scope ``journey``), end a pause too."""
        self._resumes += 1
        if request.scope == RELEASE_JOURNEY and self.paused is not None:
            self.paused = None
            because = f": {request.reason}" if request.reason else ""
            self.tell(f"resumed by {request.actor or 'an operator'}{because}")
            if self.held_by == PAUSED or self.held_by is None:
                self._show_held(None)

    def _show_held(self, why: str | None) -> None:
        if self.outcome is not None or why == self.held_by:
            return
        self.held_by = why
        workflow.upsert_search_attributes([HELD.value_set(why) if why else HELD.value_unset()])
        self.publish()

    @classmethod
    def starts_with(cls, event: JourneyEvent) -> bool:
        """Whether ``event`` would start this journey (a start event, or an identify that
        changed a trait the journey starts on)."""
        if event.name in cls.starts_on:
            return True
        changed = event.properties.get("changed_traits")
        return (
            event.name == IDENTIFY
            and isinstance(changed, list)
            and any(isinstance(t, str) and t in cls.starts_on_traits for t in changed)
        )

    def _accept(self, event: JourneyEvent) -> None:
        if self.start_event is None and self.starts_with(event):
            self.start_event = event
        if self.started_at is None and self.starts_with(event):
            self.started_at = event.occurred_at.timestamp()
        try:
            self._take(event)
        except Exception:  # a malformed event must never wedge the journey
            workflow.logger.exception("ignored malformed %s event seq %s", event.name, event.seq)
            self.tell(f"ignored a malformed {event.name} event")

    def _take_pending(self) -> None:
        """Take the events the previous journey handed over, before any newer one."""
        pending, self._pending = self._pending, []
        for event in pending:
            self._accept(event)

    def _hold(self, event: JourneyEvent) -> None:
        self.held.append(event)
        if self._held_over_cap():
            # Neither a start event nor an order (an open of this journey's email): the next
            # journey has no use for it.
            spare = [e for e in self.held if e.name != ORDER_COMPLETED and not self.starts_with(e)]
            if spare:
                self.held.remove(spare[0])
            else:
                self.held = self.collapse_held(self.held)
        if self._held_over_cap():
            oldest = next(e for e in self.held if e.name != ORDER_COMPLETED)
            self.held.remove(oldest)
            self.tell(f"dropped a {oldest.name} event: {MAX_HELD_EVENTS} already wait")

    def _held_over_cap(self) -> bool:
        return sum(e.name != ORDER_COMPLETED for e in self.held) > MAX_HELD_EVENTS

    def collapse_held(self, held: list[JourneyEvent]) -> list[JourneyEvent]:
        """Events held for the next journey, past the cap: give back fewer that mean the same
        (a cart journey folds its cart events into one snapshot). Orders must stay, in place.
        """
        return held

    def _take(self, event: JourneyEvent) -> None:
        self._taken += 1
        self._recent.append((self._taken, event))
        del self._recent[:-MAX_HELD_EVENTS]
        if event.name == ORDER_COMPLETED and self.ends_on_purchase:
            self.purchase = purchase_from(event)
            self.exit_with("purchased")
        elif event.name in (EMAIL_OPENED, EMAIL_LINK_CLICKED):
            message_key = event.properties.get("message_key")
            if not isinstance(message_key, str):
                # Journeys started before this patch counted opens without a key; keep that
                # for them, so their histories replay.
                if workflow.patched(OPENS_NEED_MESSAGE_KEY):
                    return  # forged: tracking always names the message
            elif not message_key.startswith(self.key("")):
                return  # an email of an earlier journey of this customer, opened late
            step = str(event.properties.get("step", ""))
            if isinstance(message_key, str) and self._judged_machine(event, message_key, step):
                return
            self._engage(event.name, step)
        elif event.name == AD_CLICKED:
            if self.audiences:
                self.ad_clicks += 1
                self.tell("the shopper clicked the retargeting ad")
        elif event.name == CONSENT_WITHDRAWN and workflow.patched(CONSENT_ENDS_JOURNEYS):
            if not self.transactional and self._withdrawn_from_me(event.properties):
                self.tell("the shopper unsubscribed: no marketing step runs after it")
                self.exit_with(UNSUBSCRIBED)
        elif event.name == IDENTITY_MERGED:
            self.tell("the shopper was identified: their journeys go on as the known customer")
            self.exit_with("merged")
        elif event.name in self.exits_on:
            self.tell(f"{event.name}: this journey gives way")
            self.exit_with(self.exits_on[event.name])
        else:
            self.on_event(event)

    def _engage(self, name: str, step: str) -> None:
        """Count an open or click of the ``step`` email: the journey's "opened" branches."""
        if step and step not in self.engaged:
            self.engaged.add(step)
            verb = "opened" if name == EMAIL_OPENED else "clicked a link in"
            self.tell(f"the shopper {verb} {message_name(step)}")

    def _judged_machine(self, event: JourneyEvent, message_key: str, step: str) -> bool:
        """Handle an open or click the tracking endpoint judged (starter/opens_and_clicks.py);
        True when it is not to be counted now.

        A machine's is not counted (unless the event says ``machine_counts``, the shop's
        ``KAERU_MACHINE_OPENS_COUNT``). A human one of a message with two or more links is
        counted :data:`MACHINE_VERDICT_WAIT` later, unless a verdict that every link was fetched
        in one second (a scanner's burst, seen only at its last link) arrives first. Events
        stored before the endpoint judged them, and journeys whose history took one before
        this patch, count every open at once, as they did.
        """
        props = event.properties
        machine = props.get("machine")
        if not isinstance(machine, bool) or props.get("machine_counts") is True:
            return False
        if not workflow.patched(MACHINE_OPENS_NOT_COUNTED):
            return False
        kind = "open" if event.name == EMAIL_OPENED else "click"
        if machine:
            reason = props.get("machine_reason")
            if reason == ALL_LINKS_SAME_SECOND:
                vetoed = ["click"] + (["open"] if props.get("burst_open") is True else [])
                for veto in vetoed:
                    key = f"{message_key} {veto}"
                    self._vetoes[key] = self._vetoes.get(key, 0) + 1
            who = MACHINE_REASONS.get(str(reason), "a machine")
            self.tell(f"{who} fetched {message_name(step)} ({kind}): not counted")
            return True
        links = props.get("links")
        if not isinstance(links, int) or links < 2 or step in self.engaged:
            return False
        veto = f"{message_key} {kind}"
        seen = self._vetoes.get(veto, 0)

        async def judge() -> None:
            await workflow.sleep(MACHINE_VERDICT_WAIT, summary=f"is this {kind} a scanner's?")
            if self._vetoes.get(veto, 0) == seen:
                self._engage(event.name, step)

        task = asyncio.create_task(judge())
        self._timers.add(task)  # a reference, so the task is not collected while it sleeps
        task.add_done_callback(self._timers.discard)
        return True

    def _withdrawn_from_me(self, properties: Mapping[str, Any]) -> bool:
        """A withdrawal for this journey's channel (email), of every kind or of its own."""
        kind = properties.get("kind")
        return properties.get("channel") == EMAIL_CHANNEL and kind in (None, self.kind)

    def on_event(self, event: JourneyEvent) -> None:
        """Journey-specific events; the kit handled purchases, opens, clicks and ad clicks."""

    def exit_with(self, outcome: str) -> None:
        """Ask the journey to end at its next wait (the first reason wins, but a purchase
        beats any other: a shop that empties the cart at checkout still gets a conversion)."""
        if self.exit_reason is None or outcome == "purchased":
            self.exit_reason = outcome
            self._exit_still = None

    def exit_unless_undone(self, outcome: str, seconds: float, still: Callable[[], bool]) -> None:
        """Ask the journey to end with ``outcome`` in ``seconds`` if ``still()`` holds then
        (a refilled cart undoes an emptied one); a purchase meanwhile wins as always. A later
        call replaces an earlier one."""
        self._exit_timers += 1
        mine = self._exit_timers
        if self._exit_still is not None:
            # An earlier one ended its wait but is not taken yet: this one decides instead.
            self.exit_reason = None
            self._exit_still = None

        async def decide() -> None:
            await workflow.sleep(seconds, summary=f"grace before ending {outcome}")
            if mine == self._exit_timers and still() and self.exit_reason is None:
                self.exit_with(outcome)
                self._exit_still = still

        task = asyncio.create_task(decide())
        self._timers.add(task)  # a reference, so the task is not collected while it sleeps
        task.add_done_callback(self._timers.discard)

    def check_exit(self) -> None:
        """End the journey if it must, judging a waited exit on the state as it is now.

        A grace can end while the journey is inside an activity (a send retrying), when no
        wait watches for the refill that undoes it; so the exit is decided here, as the journey
        would leave, not when the timer fired.

        Raises:
            JourneyExit: the journey must end.
        """
        if self._exit_still is not None and not self._exit_still():
            self.tell(f"no longer ending {self.exit_reason}: it was undone meanwhile")
            self.exit_reason = None
            self._exit_still = None
        if self.exit_reason is not None:
            raise JourneyExit(self.exit_reason)

    # ---- waiting ------------------------------------------------------------------------

    async def within(self, seconds: float, done: Callable[[], bool], waiting_for: str) -> bool:
        """Wait up to ``seconds`` for ``done()``. True if it happened, False if time ran out.

        Raises:
            JourneyExit: the journey must end (a purchase, an emptied cart...) meanwhile.
        """
        self.check_exit()
        self.waiting_for = waiting_for
        self.waiting_until = workflow.now() + timedelta(seconds=seconds)
        self.publish()
        try:
            await workflow.wait_condition(
                lambda: done() or self.exit_reason is not None,
                timeout=timedelta(seconds=max(seconds, 0.001)),
                timeout_summary=waiting_for,
            )
            happened = True
        except TimeoutError:
            happened = False
        finally:
            self.waiting_for = None
            self.waiting_until = None
        self.check_exit()
        return happened

    async def pause(self, seconds: float, why: str) -> None:
        """Sleep ``seconds``, ending the journey at once if it must end meanwhile."""
        await self.within(seconds, lambda: False, why)

    async def wait_for(
        self, names: set[str] | frozenset[str], seconds: float, waiting_for: str | None = None
    ) -> JourneyEvent | None:
        """Wait up to ``seconds`` for an event named in ``names`` (taken from now on).

        Returns:
            The first such event, or None when the time ran out.

        Raises:
            JourneyExit: the journey must end meanwhile (a purchase, when it ends this one).
        """
        since = self._taken

        def arrived() -> JourneyEvent | None:
            return next((e for n, e in self._recent if n > since and e.name in names), None)

        await self.within(seconds, lambda: arrived() is not None, waiting_for or " or ".join(names))
        return arrived()

    async def continue_as_new_when_due(self, history_limit: int = 2000) -> None:
        """Continue as new, carrying :meth:`carry`, when the history grows past
        ``history_limit`` events or Temporal suggests it: a journey that lives for years calls
        this at each turn of its loop. Only for journeys that take a :class:`JourneyInput`."""
        info = workflow.info()
        if not (
            info.is_continue_as_new_suggested() or info.get_current_history_length() > history_limit
        ):
            return
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            JourneyInput(
                customer_id=self.customer_id,
                settings=self._settings_dict,
                generation=self.generation,
                last_seq=self.last_seq,
                story=self.story,
                started_at=self.started_at,
                orders_until=self.orders_until,
                carried=self.carry(),
                priority=self.send_priority,
                arms=self.arms,
            )
        )

    # ---- steps that touch the world -------------------------------------------------------

    def key(self, step: str) -> str:
        """The idempotency key of ``step``: the same for every retry and every replay.

        Continue-as-new keeps ``first_execution_run_id``, so a next journey (generation 1, 2...)
        puts its generation in its keys; generation 0 keeps the keys journeys always had.
        """
        info = workflow.info()
        prefix = f"{info.workflow_id}/{info.first_execution_run_id}/"
        return prefix + (f"g{self.generation}/" if self.generation else "") + step

    async def call(
        self,
        activity: str,
        arg: Any,
        result_type: type[T],
        step: str,
        *,
        heartbeat: bool = False,
        deadline: timedelta = SEND_DEADLINE,
        stop_on_purchase: bool = False,
        after_hold: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """Run an activity with kaeru's timeouts and retries.

        Temporary failures retry with backoff for up to ``deadline``. With
        ``stop_on_purchase``, a purchase meanwhile cancels the activity (it stops unless it
        has already handed the message over) and ends the journey.

        An outside step (kaeru/holds.py) waits first while an operator paused the journey,
        and waits when the kill switch held it; then it runs again with the same input (the
        same idempotency key: what was held goes out once), after ``after_hold`` (the send
        gate, asked again: a hold may have lasted into quiet hours or past the message's stale
        limit). A hold ends at once when the journey must end (a purchase). The kill switch's
        hold tries again after :data:`HOLD_RECHECK`, then twice as long each time, up to
        :data:`HOLD_RECHECK_MAX`; a resume starts that over.

        Raises:
            JourneyExit: the activity failed for good (bounce, no address, deadline passed),
                or a purchase stopped it.
        """
        outside = activity in OUTSIDE_ACTIVITIES
        recheck = HOLD_RECHECK
        held = False
        while True:
            if outside and self.paused is not None and workflow.patched(HOLDS):
                await self._held(step, PAUSED, self.paused, None)
                recheck, held = HOLD_RECHECK, True
                continue
            if held and after_hold is not None:
                held = False
                await after_hold()
                continue  # a pause may have come meanwhile
            try:
                return await self._call_once(
                    activity,
                    arg,
                    result_type,
                    step,
                    heartbeat=heartbeat,
                    deadline=deadline,
                    stop_on_purchase=stop_on_purchase,
                )
            except _HeldByKillSwitch as switch:
                resumed = await self._held(step, KILL_SWITCH, switch.reason, recheck)
                recheck = HOLD_RECHECK if resumed else min(recheck * 2, HOLD_RECHECK_MAX)
                held = True

    async def _held(self, step: str, why: str, reason: str, recheck: timedelta | None) -> bool:
        """Wait before ``step`` until a resume (or ``recheck``, for the kill switch), showing
        operators why (``KaeruHeld``, the story, the status query). Whether a resume came.

        Raises:
            JourneyExit: the journey must end meanwhile (a purchase).
        """
        resumes = self._resumes
        self._show_held(why)
        if why == KILL_SWITCH:
            self.tell(f"held before the {step} step by the kill switch ({reason})")
        else:
            self.tell(f"held before the {step} step: the journey is paused ({reason})")
        self.waiting_for = "a resume" if why == PAUSED else "the kill switch to be released"
        self.waiting_until = workflow.now() + recheck if recheck is not None else None
        self.publish()

        def released() -> bool:
            if why == PAUSED:
                return self.paused is None
            return self._resumes > resumes or self.paused is not None

        try:
            await workflow.wait_condition(
                lambda: released() or self.exit_reason is not None,
                timeout=recheck,
                timeout_summary="try the held step again",
            )
        except TimeoutError:
            pass
        finally:
            self.waiting_for = None
            self.waiting_until = None
        if self.exit_reason is not None:
            self._show_held(None)
            self.check_exit()
        self._show_held(PAUSED if self.paused is not None else None)
        if self.paused is None:
            self.tell(f"trying the {step} step again")
        return self._resumes > resumes

    async def _call_once(
        self,
        activity: str,
        arg: Any,
        result_type: type[T],
        step: str,
        *,
        heartbeat: bool,
        deadline: timedelta,
        stop_on_purchase: bool,
    ) -> T:
        handle = workflow.start_activity(
            activity,
            arg,
            result_type=result_type,
            start_to_close_timeout=timedelta(minutes=2),
            heartbeat_timeout=HEARTBEAT if heartbeat else None,
            schedule_to_close_timeout=deadline,
            retry_policy=RETRY,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"{activity} ({step})",
        )
        if stop_on_purchase:
            await workflow.wait_condition(lambda: handle.done() or self.purchase is not None)
            if not handle.done():
                handle.cancel()
        try:
            result = await handle
        except ActivityError as err:
            if self.purchase is not None and isinstance(err.cause, CancelledError):
                self.tell(f"stopped the {step} step: the shopper bought meanwhile")
                raise JourneyExit("purchased") from err
            if self.purchase is not None and workflow.patched(PURCHASE_WINS):
                # The purchase is a fact; the failed step (a refusal after DATA...) is not.
                self.tell(f"the {step} step failed ({err.cause or err}), but the shopper bought")
                raise JourneyExit("purchased") from err
            cause = err.cause
            if (
                isinstance(cause, ApplicationError)
                and cause.type == HELD_BY_KILL_SWITCH
                and workflow.patched(HOLDS)
            ):
                raise _HeldByKillSwitch(_held_reason(cause)) from err
            raise self._exit_for(err, step) from err
        return cast(T, result)

    async def send_email(
        self, step: str, email: SendEmailInput, *, stale_after: timedelta | None = STALE_AFTER
    ) -> SendEmailResult:
        """Send one message step; a bounce or a missing address ends the journey.

        A marketing message first gets its slot from the send gate (:meth:`reserve_slot`):
        it may wait (one timer), be dropped when stale (``skipped``, the journey goes on) or
        be refused (the journey ends ``unsubscribed``).
        """
        self.check_exit()
        self.enter(step)
        if email.ordered_since is None and self.started_at is not None:
            # The email activity refuses to send if the customer ordered since the journey's
            # first event happened (an order that overtook it, or one not yet routed); for a
            # journey an order starts, since that order: not on the order itself.
            after = 0.0 if self.ends_on_purchase else ORDER_AFTER
            email.ordered_since = self.started_at + after
        if email.ordered_since is not None and self.orders_until is not None:
            # ...but not on the order an earlier generation converted: a browser clock a few
            # minutes slow dates the next cart before it.
            email.ordered_since = max(email.ordered_since, self.orders_until + ORDER_AFTER)
        found = self.arm(step)
        if found is not None and email.variant is None:
            email.experiment, email.variant, experiment = found
            email.template = experiment.variants[email.variant].template or email.template
        gated = email.marketing and workflow.patched(SEND_GATE)
        if gated and not await self.reserve_slot(step, email, stale_after):
            return SendEmailResult(message_id="", to_address="", status=SKIPPED)

        async def ask_again() -> None:
            # Held after its slot was granted: the gate decides again (quiet hours, the caps
            # and the stale limit, counted from when the journey first wanted to send).
            if not await self.reserve_slot(step, email, stale_after, held_until=workflow.now()):
                raise _DroppedAfterHold

        try:
            result = await self.call(
                "send_email",
                email,
                SendEmailResult,
                step,
                heartbeat=True,
                stop_on_purchase=True,
                after_hold=ask_again if gated else None,
            )
        except _DroppedAfterHold:
            return SendEmailResult(message_id="", to_address="", status=SKIPPED)
        if result.status == SKIPPED:
            self.tell(
                f"did not send {message_name(step)}: the shopper got one on the same topic "
                "lately (KAERU_TOPIC_WINDOW)"
            )
            return result
        outcome = "" if result.status == "sent" else f" ({result.status.replace('_', ' ')})"
        self.done(step, f"sent {message_name(step)} to the shopper{outcome}")
        return result

    async def reserve_slot(
        self,
        step: str,
        email: SendEmailInput,
        stale_after: timedelta | None,
        *,
        held_until: datetime | None = None,
    ) -> bool:
        """Ask the send gate for ``email``'s slot until it is granted (True) or the message
        is dropped as stale (False). Each wait is one timer, raced against every exit.
        ``held_until``: the message was held after its slot was granted, until then; the gate
        decides again (``ReserveSendInput.held_until``).

        Raises:
            JourneyExit: ``unsubscribed`` (consent says no), ``undeliverable`` (the address
                is suppressed), or the journey must end meanwhile (a purchase during the wait).
        """
        wanted_at = workflow.now()
        while True:
            ask = ReserveSendInput(
                key=email.key,
                journey_id=email.journey_id,
                kind=self.kind,
                step=step,
                customer_id=self.customer_id,
                priority=self.send_priority,
                wanted_at=wanted_at,
                stale_after_seconds=(
                    stale_after.total_seconds() if stale_after is not None else None
                ),
                asked_at=workflow.now(),
                held_until=held_until,
            )
            answer = await self.call("reserve_send", ask, ReserveSendResult, step)
            if answer.verdict == SEND:
                return True
            if answer.verdict == DROP:
                self.tell(f"did not send {message_name(step)} (stale): {answer.reason}")
                return False
            if answer.verdict == REFUSED:
                self.tell(f"did not send {message_name(step)}: {answer.reason}")
                raise JourneyExit(answer.outcome or UNSUBSCRIBED)
            until = answer.until or workflow.now()
            self.tell(
                f"{message_name(step)} is waiting for a send slot until "
                f"{until:%Y-%m-%d %H:%M} UTC: {answer.reason}"
            )
            seconds = (until - workflow.now()).total_seconds()
            await self.pause(max(seconds, 1.0), "a send slot")

    async def send_message(
        self,
        step: str,
        template: str,
        context: Any,
        *,
        marketing: bool = True,
        topic: str | None = None,
        stale_after: timedelta | None = STALE_AFTER,
    ) -> SendEmailResult:
        """Send the message ``template`` rendered with ``context``, a dataclass the journey
        defines (its fields are the template's variables).

        Args:
            step: the step's name (part of its idempotency key: never rename it).
            template: the template family in activities/templates (``<template>.subject.j2``...).
            context: the journey's typed context dataclass.
            marketing: False for a transactional message (an order confirmation).
            topic: what it is about (``cart:<fingerprint>``): a customer never gets two
                marketing messages on one topic, from whichever journey.
            stale_after: how long a marketing message may wait for a send slot (caps, quiet
                hours) before it is dropped (``skipped``); None: it never goes stale.
        """
        email = SendEmailInput(
            key=self.key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            template=template,
            context=dataclasses.asdict(context),
            marketing=marketing,
            topic=topic,
        )
        return await self.send_email(step, email, stale_after=stale_after)

    async def issue_coupon(
        self, step: str, amount_minor: int, currency: str, ttl: float
    ) -> CouponInfo:
        """Issue a single-use coupon worth ``amount_minor`` of ``currency``, valid ``ttl``
        seconds (the ``issue_coupon`` activity; the step's key makes it one coupon)."""
        wanted = IssueCouponInput(
            key=self.key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            amount_minor=amount_minor,
            currency=currency,
            ttl_seconds=ttl,
        )
        return await self.run_step(
            step, "issue_coupon", wanted, CouponInfo, lambda c: f"issued coupon {c.code}"
        )

    async def run_step(
        self,
        step: str,
        activity: str,
        arg: Any,
        result_type: type[T],
        told: Callable[[T], str] | None = None,
    ) -> T:
        """One step that calls an activity: end first if the journey must, mark the step,
        call ``activity`` (kaeru's timeouts and retries, see :meth:`call`), mark it done.

        Args:
            step: the step's name (give ``arg`` the key ``self.key(step)``; never rename it).
            activity: the activity's name.
            arg: its one dataclass input.
            result_type: what it returns.
            told: the story's line for the result (default: "<step> done").

        Raises:
            JourneyExit: the journey must end, or the activity failed for good.
        """
        self.check_exit()
        self.enter(step)
        result = await self.call(activity, arg, result_type, step)
        self.done(step, told(result) if told is not None else f"{step} done")
        return result

    async def _claim_entry(self, rule: Reentry) -> bool:
        """Claim this customer's entry into the journey under ``rule``; False: refused."""
        claim = EntryClaim(
            key=self.key("entry"),
            kind=self.kind,
            customer_id=self.customer_id,
            every_seconds=rule.every,
            at=workflow.now().timestamp(),
        )
        result = await self.call("claim_journey_entry", claim, EntryClaimResult, "entry")
        if not result.granted:
            self.tell("did not start: the shopper had this journey too recently")
        return result.granted

    async def _enter(self) -> bool:
        """Record the journey's entry and take its arms (``enter_journey``); True when the
        kind's holdout takes the customer (the journey then sends nothing)."""
        plan = self.entry_plan
        if plan is None or self.arms is not None or not workflow.patched(JOURNEY_ENTERED):
            return False
        held = not self.transactional and held_out(
            self.customer_id, self.kind, plan.holdout_percent
        )
        running = {n: e for n, e in self.experiments.items() if n in plan.experiments}
        arms = {n: assign(self.customer_id, self.kind, n, e) for n, e in running.items()}
        entry = JourneyEntryInput(
            key=self.key("entered"),
            journey_id=workflow.info().workflow_id,
            kind=self.kind,
            customer_id=self.customer_id,
            version=self.version,
            held_out=held,
            arms={} if held else arms,
            variants={n: list(e.variants) for n, e in running.items()},
            at=workflow.now().timestamp(),
        )
        result = await self.call("enter_journey", entry, JourneyEntryResult, "entry")
        self.arms = dict(result.arms)
        if held:
            self.tell(f"held out (KAERU_{self._prefix()}_HOLDOUT_PERCENT): nothing is sent")
        elif self.arms:
            chosen = ", ".join(f"{n}: {a}" for n, a in sorted(self.arms.items()))
            self.tell(f"entered version {self.version} with variants {chosen}")
        return held

    @classmethod
    def _prefix(cls) -> str:
        return cls.settings_prefix or cls.kind.upper().replace("-", "_")

    def arm(self, step: str) -> tuple[str, str, Experiment] | None:
        """The experiment on ``step`` and this customer's arm of it: (its name, the arm, the
        experiment); None when none runs on it for this journey."""
        for name, experiment in self.experiments.items():
            if experiment.step == step and self.arms and name in self.arms:
                arm = self.arms[name]
                if arm in experiment.variants:
                    return name, arm, experiment
        return None

    def delay(self, step: str, default: float) -> float:
        """The wait before the ``step`` message: its variant's ``delay``, else ``default``."""
        found = self.arm(step)
        chosen = found[2].variants[found[1]].delay if found is not None else None
        return chosen if chosen is not None else default

    async def join_audience(self, step: str, audience: str) -> AudienceResult:
        self.check_exit()
        self.enter(step)
        change = self._audience_change(step, audience)
        # Recorded first: if the add fails for good after reaching the platform, finish()
        # still removes the shopper (removing a non-member is harmless).
        self.audiences[audience] = step
        try:
            if workflow.patched(BATCHED_AUDIENCES):
                self.queued_audiences.add(audience)
                return await self._join_queued(step, audience, change)
            result = await self.call("add_to_audience", change, AudienceResult, step)
        except JourneyExit as exit_:
            if exit_.outcome == UNSUBSCRIBED:
                # Refused before the platform was asked: there is nothing to remove.
                del self.audiences[audience]
                self.queued_audiences.discard(audience)
            raise
        self.done(step, f"added the shopper to the {audience} audience ({result.provider})")
        return result

    async def _join_queued(
        self, step: str, audience: str, change: AudienceChange
    ) -> AudienceResult:
        """Queue the join on every provider, and wait until the flush applied it."""
        joined = await self.call("queue_audience_join", change, AudienceTargets, step)
        if joined.pending:
            self.tell(f"the shopper joins the {audience} audience at the next flush")
            joined = await self.call(
                "confirm_audience_change", change, AudienceTargets, step, heartbeat=True
            )
        where = ", ".join(f"{t.provider} {t.audience_id}" for t in joined.targets)
        self.done(step, f"added the shopper to the {audience} audience ({where})")
        return joined.targets[0]

    async def leave_audiences(self) -> None:
        """Take the shopper out of every audience this journey put them in."""
        for audience in list(self.audiences):
            step = f"leave-{audience}"
            change = self._audience_change(step, audience)
            # Remove exactly what the add sent (the shopper's address may have changed since).
            change.joined_key = self.key(self.audiences[audience])
            if audience in self.queued_audiences:
                await self._leave_queued(audience, change)
                continue
            try:
                await workflow.execute_activity(
                    "remove_from_audience",
                    change,
                    result_type=AudienceResult,
                    start_to_close_timeout=timedelta(minutes=1),
                    schedule_to_close_timeout=REMOVAL_DEADLINE,
                    retry_policy=RETRY,
                )
            except ActivityError as err:
                # Not the customer id in the log: it is often an email address.
                workflow.logger.error("could not remove the shopper from %s: %s", audience, err)
                self.tell(f"could NOT remove the shopper from the {audience} audience: {err.cause}")
                if workflow.patched(PARK_FAILED_REMOVALS):
                    await self._park_removal(change, str(err.cause or err))
                continue
            del self.audiences[audience]
            self.tell(f"removed the shopper from the {audience} audience")

    async def _leave_queued(self, audience: str, change: AudienceChange) -> None:
        """Queue the removal of what the join queued; the flusher applies it (and retries)."""
        try:
            left = await workflow.execute_activity(
                "queue_audience_leave",
                change,
                result_type=AudienceTargets,
                start_to_close_timeout=timedelta(minutes=1),
                schedule_to_close_timeout=REMOVAL_DEADLINE,
                retry_policy=RETRY,
            )
        except ActivityError as err:
            workflow.logger.error("could not queue the removal from %s: %s", audience, err)
            self.tell(f"could NOT remove the shopper from the {audience} audience: {err.cause}")
            await self._park_removal(change, str(err.cause or err))
            return
        del self.audiences[audience]
        self.queued_audiences.discard(audience)
        if left.pending:
            self.tell(f"the shopper leaves the {audience} audience at the next flush")
        else:
            self.tell(f"removed the shopper from the {audience} audience")

    async def _park_removal(self, change: AudienceChange, reason: str) -> None:
        try:
            await workflow.execute_activity(
                "park_audience_removal",
                ParkRemoval(change=change, reason=reason),
                start_to_close_timeout=timedelta(minutes=1),
                schedule_to_close_timeout=SEND_DEADLINE,
                retry_policy=RETRY,
            )
        except ActivityError as err:
            self.tell(f"could NOT park the removal for the audience sweeper: {err.cause}")
            return
        self.tell("the audience sweeper will try the removal again later")

    def _audience_change(self, step: str, audience: str) -> AudienceChange:
        return AudienceChange(
            key=self.key(step),
            journey_id=workflow.info().workflow_id,
            step=step,
            customer_id=self.customer_id,
            audience=audience,
        )

    def _exit_for(self, err: ActivityError, step: str) -> JourneyExit:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == UNDELIVERABLE:
            self.tell(f"{message_name(step)} bounced: {cause.message}")
            return JourneyExit("undeliverable")
        if isinstance(cause, ApplicationError) and cause.type == ALREADY_PURCHASED:
            self.tell(
                f"did not send {message_name(step)}: an order placed since the journey began "
                "was found before sending"
            )
            if self.purchase is None:
                # Its event may never reach this journey: convert on the order it was told of.
                self.purchase = _found_order(cause)
            return JourneyExit("purchased")
        if isinstance(cause, ApplicationError) and cause.type == NOT_CONSENTED:
            self.tell(f"did not go on at {step}: {cause.message}")
            return JourneyExit(UNSUBSCRIBED)
        if isinstance(cause, ApplicationError) and cause.type == NO_EMAIL_ADDRESS:
            self.tell("the shopper has no known email address")
            return JourneyExit("no_email_address")
        workflow.logger.error("step %s failed for good: %s", step, err)
        self.tell(f"step {step} failed for good: {cause or err}")
        return JourneyExit("failed")

    async def run_journey(self, steps: Callable[[], Awaitable[JourneyResult]]) -> JourneyResult:
        """Run the journey's ``steps`` and end it: every exit goes through :meth:`finish`.

        Events that arrived while it ended (a new cart after the purchase) are handed to the
        customer's next journey: if any would start one, the workflow continues as new into a
        fresh journey of the next generation that takes them first.
        """
        self._take_pending()
        if not self._continued:
            self._count(JOURNEYS_STARTED, "Journeys that began, by kind")
        try:
            if self.reentry is not None and not await self._claim_entry(self.reentry):
                return await self.finish("not_reentered")
            result = await self.finish(HOLDOUT) if await self._enter() else await steps()
        except JourneyExit as exit_:
            result = await self.finish(exit_.outcome)
        except asyncio.CancelledError:
            # An operator cancelled the journey: still take the shopper out of every audience.
            await self.finish("cancelled")
            raise
        first_start = next((i for i, e in enumerate(self.held) if self.starts_with(e)), None)
        events = [] if first_start is None else self.held[first_start:]
        next_input = self.next_journey(events) if events else None
        if next_input is not None and workflow.patched(HAND_OVER_LATE_EVENTS):
            self.tell(
                f"a new journey began with {counted(len(events), 'event')} that came as this ended"
            )
            await workflow.wait_condition(workflow.all_handlers_finished)
            workflow.continue_as_new(
                next_input,
                search_attributes=TypedSearchAttributes(
                    self.start_search_attributes(self.visible_customer_id)
                ),
            )
        if self.held:
            self.tell(f"ignored {counted(len(self.held), 'event')} that came as the journey ended")
        return result

    def converted_until(self) -> float | None:
        """When the newest order this journey or an earlier generation converted happened
        (epoch seconds), for the next generation's ``orders_until``."""
        times = [self.orders_until] if self.orders_until is not None else []
        if self.outcome == "purchased" and self.purchase is not None:
            times.append(self.purchase.occurred_at.timestamp())
        return max(times, default=None)

    def next_journey(self, events: list[JourneyEvent]) -> Any | None:
        """The input of this journey's next generation, which takes ``events`` first; None:
        no next generation (the base, for journeys that start on no event).

        Journeys that take a :class:`JourneyInput` get it from the kit. Others with start
        events must define it (checked when the class is defined): the same customer and
        settings, generation ``self.generation + 1``, ``last_seq``, the story, ``events`` as
        its pending events, and :meth:`converted_until` as its ``orders_until``.
        """
        if type(self).__init__ is not Journey.__init__:
            return None
        return JourneyInput(
            customer_id=self.customer_id,
            settings=self._settings_dict,
            generation=self.generation + 1,
            pending=events,
            last_seq=self.last_seq,
            story=self.story,
            orders_until=self.converted_until(),
            priority=self.send_priority,
            entry=self.entry_plan,
        )

    async def finish(self, outcome: str) -> JourneyResult:
        """End the journey: leave every audience, store a conversion, publish the outcome."""
        self.outcome = outcome
        self.tell(f"journey ended: {outcome}")
        self._count(JOURNEYS_ENDED, "Journeys that ended, by kind and outcome", outcome=outcome)
        await self.leave_audiences()
        if outcome == "purchased" and self.purchase is None:
            self._purchase_from_held()
        purchase = self.purchase if outcome == "purchased" else None
        if purchase is not None:
            conversion = ConversionInput(
                key=self.key("conversion"),
                journey_id=workflow.info().workflow_id,
                customer_id=self.customer_id,
                after_step=self.completed_step,
                order_id=purchase.order_id,
                value_minor=purchase.value_minor,
                currency=purchase.currency,
                coupon_code=purchase.coupon,
                occurred_at=purchase.occurred_at,
            )
            try:
                await self.call("record_conversion", conversion, type(None), "conversion")
            except JourneyExit:
                self.tell("could NOT store the conversion")
        self.step = "ended"
        updates = [STEP.value_set("ended"), OUTCOME.value_set(outcome)]
        if self.held_by is not None:
            # Paused, it ended at a wait (a purchase): an ended journey is held by nothing.
            updates.append(HELD.value_unset())
            self.held_by = None
        workflow.upsert_search_attributes(updates)
        self.publish()
        return JourneyResult(
            outcome=outcome,
            last_step=self.completed_step,
            order_id=purchase.order_id if purchase else None,
            coupon_code=purchase.coupon if purchase else None,
        )

    def _count(self, name: str, description: str, **labels: str) -> None:
        """Add one to the worker's counter ``name`` for this journey's kind (and ``labels``,
        bounded by the code). ``workflow.metric_meter()`` records nothing during a replay and
        adds no command, so counting changes no history."""
        counter = workflow.metric_meter().create_counter(name, description)
        counter.add(1, {"kind": self.kind, **labels})

    def _purchase_from_held(self) -> None:
        """Take the first held ``Order Completed`` as the purchase of a journey that ended
        ``purchased`` without one (an order found before sending, routed as it ended).

        Only one held before any event that starts a journey: an order after a new cart may
        be that cart's, and goes to the next journey with it.
        """
        order = None
        for event in self.held:
            if self.starts_with(event):
                return
            if event.name == ORDER_COMPLETED:
                order = event
                break
        if order is None:
            return
        self.held.remove(order)  # converted here, so not handed to the next journey
        try:
            self.purchase = purchase_from(order)
        except Exception:  # a malformed event must never wedge the journey
            workflow.logger.exception("ignored a malformed Order Completed seq %s", order.seq)
            return
        self.tell("the order found before sending arrived: it is this journey's conversion")

    # ---- bookkeeping for operators ---------------------------------------------------------

    def enter(self, step: str) -> None:
        """Mark the step the journey is in (search attribute ``KaeruStep``)."""
        self.step = step
        workflow.upsert_search_attributes([STEP.value_set(step)])
        self.publish()

    def done(self, step: str, line: str) -> None:
        self.completed_step = step
        self.tell(line)

    def tell(self, line: str) -> None:
        """Add a line to the journey's story (status query and current details)."""
        line = line if len(line) <= 200 else line[:199] + "…"
        self.story.append(f"{workflow.now():%Y-%m-%d %H:%M:%S} {line}")
        del self.story[:-50]
        self.publish()

    def details(self) -> dict[str, Any]:
        """Journey-specific facts for the status query and current details."""
        return {}

    @workflow.query(name="status")
    def status(self) -> JourneyStatus:
        return JourneyStatus(
            journey_id=workflow.info().workflow_id,
            customer_id=self.customer_id,
            step=self.step,
            outcome=self.outcome,
            waiting_for=self.waiting_for,
            waiting_until=self.waiting_until,
            story=list(self.story),
            details=self.details(),
            held=self.held_by,
        )

    def publish(self) -> None:
        """Render the current details shown on the workflow's page in the Temporal UI."""
        lines = [f"**{type(self).__name__}** for customer `{self.customer_id}`", ""]
        lines.append(f"- step: `{self.step}`" + (f" → **{self.outcome}**" if self.outcome else ""))
        if self.waiting_for and self.waiting_until:
            lines.append(
                f"- waiting for {self.waiting_for} until {self.waiting_until:%Y-%m-%d %H:%M:%S} UTC"
            )
        if self.held_by is not None:
            lines.append(f"- **held** ({self.held_by}) before its next outside step")
        for name, value in self.details().items():
            lines.append(f"- {name}: {value}")
        lines += ["", "Story:", *[f"1. {line}" for line in self.story[-15:]]]
        workflow.set_current_details("\n".join(lines))

    @property
    def visible_customer_id(self) -> str:
        """The customer id this journey shows in Temporal (``KaeruCustomerId``): the one the
        router started it with, a pseudonym when the customer id is personal data
        (kaeru/pseudonyms.py), so a next generation keeps showing it; the clear id for a
        journey started without it. Read from the run's own start, so replay agrees."""
        shown = workflow.info().typed_search_attributes.get(CUSTOMER_ID)
        return shown if shown else self.customer_id

    @staticmethod
    def start_search_attributes(customer_id: str) -> list[SearchAttributePair[str]]:
        """Search attributes to give a journey when it starts (used by the router, with the
        customer's visible id: kaeru/pseudonyms.py)."""
        return [
            SearchAttributePair(CUSTOMER_ID, customer_id),
            SearchAttributePair(STEP, "started"),
        ]
