"""Inputs and results of every activity.

Pure dataclasses with no I/O imports, so workflow code can import them inside the sandbox.
Each activity takes one dataclass, so fields can be added later without breaking histories.
Every ``key`` is an idempotency key: ``<workflow id>/<step>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kaeru.identity import NO_EMAIL_ADDRESS as NO_EMAIL_ADDRESS  # the customer has no address

#: ApplicationError types a workflow reacts to.
UNDELIVERABLE = "Undeliverable"  # hard bounce or suppressed address: never retried
AUDIENCE_REJECTED = "AudienceRejected"  # the ad platform refused the request for good
#: The customer has a stored order placed at or after ``SendEmailInput.ordered_since``: the
#: message was not sent (an order that overtook the journey's events, or one not yet routed).
ALREADY_PURCHASED = "AlreadyPurchased"
#: The customer may not get marketing (no consent, unsubscribed, a suppressed address): a
#: marketing message is not sent, an ad audience not joined; the journey ends unsubscribed.
NOT_CONSENTED = "NotConsented"


@dataclass
class ProductInfo:
    """A product as shown in an email."""

    product_id: str
    name: str
    price_minor: int | None = None
    currency: str = "USD"
    image_url: str | None = None
    url: str | None = None


@dataclass
class CartLine:
    product: ProductInfo
    quantity: int = 1


@dataclass
class CouponInfo:
    code: str
    amount_minor: int
    currency: str
    expires_at: datetime


@dataclass
class RecommendInput:
    customer_id: str
    product_ids: list[str]
    limit: int = 3


@dataclass
class RecommendResult:
    products: list[ProductInfo] = field(default_factory=list)
    source: str = "bought_together"  # or "popular" when the shop has no matching history


@dataclass
class RefreshInput:
    """Input of the recommendations refresh (nothing yet: the thresholds are settings)."""


@dataclass
class RefreshResult:
    """What a recommendations refresh read (orders) and wrote (pairs, best-sellers)."""

    orders: int = 0
    pairs: int = 0
    best_sellers: int = 0


@dataclass
class LookUpProducts:
    """Products to read from the shop's catalogue (as its server-key events describe them)."""

    product_ids: list[str]


@dataclass
class SendEmailInput:
    key: str
    journey_id: str
    step: str
    customer_id: str
    template: (
        str  # a template family in activities/templates: <template>.subject.j2, .html.j2, .txt.j2
    )
    cart: list[CartLine] = field(default_factory=list)
    cart_url: str = ""
    recommendations: list[ProductInfo] = field(default_factory=list)
    coupon: CouponInfo | None = None
    #: When set (seconds since the epoch): refuse to send, with ``ALREADY_PURCHASED``, if the
    #: customer has a stored order that happened at or after this moment. Journeys set it to
    #: when the events that started them happened.
    ordered_since: float | None = None
    #: What the template renders: the journey's typed context (a dataclass) as a dict. Empty
    #: for messages of journeys that predate it (the cart fields above fill the cart templates).
    context: dict[str, Any] = field(default_factory=dict)
    #: A marketing message (consent applies) or, when False, a transactional one (an order
    #: confirmation: sent whatever the customer's marketing consent).
    marketing: bool = True
    #: What the message is about (for example ``cart:<fingerprint>``): one customer never gets
    #: two marketing messages on the same topic, from whichever journey.
    topic: str | None = None
    #: The experiment arm this message is (``Journey.experiments``), stored on its message row
    #: and every touchpoint of it (sent, opened, clicked); None: no experiment on its step.
    variant: str | None = None
    #: The experiment it is an arm of.
    experiment: str | None = None


@dataclass
class SendEmailResult:
    """``to_address`` is masked (``a***@example.com``): histories must not hold the address."""

    message_id: str
    to_address: str
    status: str  # "sent"; "already_sent" for a retry; "unconfirmed" if the server may have it


@dataclass
class AudienceChange:
    key: str
    journey_id: str
    step: str
    customer_id: str
    audience: str  # kaeru's name for the audience; the provider maps it to its own id
    #: On a leave: the ``key`` of the add it undoes, so exactly what was added is removed
    #: (the address may have changed since). None: the journey's newest add to ``audience``.
    joined_key: str | None = None


@dataclass
class AudienceResult:
    provider: str
    audience_id: str


#: A queued audience change no flush has applied yet (retryable: the journey waits on).
AUDIENCE_PENDING = "AudiencePending"


@dataclass
class AudienceTargets:
    """Where a queued join or leave goes: one target per provider (Meta, Google or local).

    ``pending``: some target waits for the next flush (``confirm_audience_change`` tells when
    it is applied); False when every target was applied at once (the local store).
    """

    targets: list[AudienceResult] = field(default_factory=list)
    pending: bool = False


@dataclass
class FlushInput:
    """One flush of queued audience changes: at most ``limit`` changes claimed at a time."""

    limit: int = 100_000


@dataclass
class FlushResult:
    batches: int = 0
    applied: int = 0
    superseded: int = 0
    rejected: int = 0


@dataclass
class ParkRemoval:
    """A removal from an audience that failed for good, parked for the audience sweeper."""

    change: AudienceChange
    reason: str


@dataclass
class SweepInput:
    """One sweep of parked audience removals: at most ``limit`` of those due."""

    limit: int = 200


@dataclass
class SweepResult:
    tried: int = 0
    removed: int = 0


@dataclass
class IssueCouponInput:
    key: str
    journey_id: str
    step: str
    customer_id: str
    amount_minor: int
    currency: str
    ttl_seconds: float


@dataclass
class ConversionInput:
    key: str
    journey_id: str
    customer_id: str
    after_step: str
    order_id: str
    value_minor: int
    currency: str
    coupon_code: str | None
    occurred_at: datetime
    detail: dict[str, Any] = field(default_factory=dict)


# ---- Stream A: journey entries (re-entry rules) -------------------------------------------


@dataclass
class EntryClaim:
    """Ask to enter a journey of ``kind`` for ``customer_id`` now (the kit's first step).

    ``key`` (workflow id + first run id + generation) makes the claim idempotent: a retried or
    replayed claim answers as the first did.
    """

    key: str
    kind: str
    customer_id: str
    #: Refuse when the customer entered this kind less than this many seconds ago; None:
    #: refuse any earlier entry (once ever).
    every_seconds: float | None
    #: When the journey starts (epoch seconds, the workflow's clock: a replay and a
    #: time-skipping test server agree on it).
    at: float


@dataclass
class EntryClaimResult:
    granted: bool
    #: When the earlier entry that refused this one began (epoch seconds), if refused.
    previous_at: float | None = None


# ---- Stream X: journey entry, variants and holdouts -------------------------------------------


@dataclass
class EntryPlan:
    """What a journey does as it enters, fixed when the router starts it (a later change of
    the settings reaches only journeys started after it).

    A journey whose input has none (one started before entries were recorded, or a run that
    a continue-as-new carried its arms into) records no entry.
    """

    #: ``KAERU_<PREFIX>_HOLDOUT_PERCENT``: the share of customers held out (0 to 100).
    holdout_percent: float = 0.0
    #: The experiments that run (``KAERU_<PREFIX>_EXPERIMENTS``); names the class declares.
    experiments: list[str] = field(default_factory=list)


@dataclass
class JourneyEntryInput:
    """Record a journey's entry: one ``journey_entered`` touchpoint (``key``: workflow id, first
    run id and generation, so a retry, a replay or a continue-as-new adds no second)."""

    key: str
    journey_id: str
    kind: str
    customer_id: str
    #: ``Journey.version`` (funnels split by it).
    version: str
    #: Held out: the arm is ``holdout`` and the journey sends nothing.
    held_out: bool
    #: Experiment → the arm the hash gave (kaeru/variants.py).
    arms: dict[str, str]
    #: Experiment → its arms as the class declares them: a promoted winner that is not one
    #: of them (an arm since removed) is not applied.
    variants: dict[str, list[str]]
    #: When the journey entered (epoch seconds, the workflow's clock).
    at: float


@dataclass
class JourneyEntryResult:
    """The arms the journey runs with: the hash's, or an experiment's promoted winner."""

    arms: dict[str, str]
    #: The touchpoint's variant: ``holdout``, the arm of a journey's one experiment, or None.
    variant: str | None = None


@dataclass
class PromoteInput:
    """One run of the experiment promoter: over journeys entered in the last ``days`` days."""

    days: int = 90


@dataclass
class PromoteResult:
    #: ``"<journey kind> <experiment>: <variant>"`` of each winner promoted in this run.
    promoted: list[str] = field(default_factory=list)


# ---- Consent stream G: the send gate ---------------------------------------------------------

#: ``ReserveSendResult.verdict``: send now (the slot is this message's).
SEND = "send"
#: Not now: ask again at ``until`` (capped, a higher priority message first, quiet hours).
WAIT = "wait"
#: Never: the next free slot is past the message's stale limit. The journey goes on.
DROP = "drop"
#: Never: the customer's consent says no, or the address is suppressed. The journey ends.
REFUSED = "refused"


@dataclass
class ReserveSendInput:
    """Ask for a send slot for one marketing message (the kit's step before ``send_email``).

    ``key`` is the message's own key (``SendEmailInput.key``): asking again (a retry, the
    journey waking from a wait) finds the same reservation.
    """

    key: str
    journey_id: str
    kind: str
    step: str
    customer_id: str
    #: Lower number first (cart abandonment 10 ... win-back 40): ``Journey.priority``.
    priority: int
    #: When the journey first wanted to send (the workflow's clock); the stale limit counts
    #: from here.
    wanted_at: datetime
    channel: str = "email"
    #: Past ``wanted_at`` + this, the message is dropped instead of sent; None: never stale.
    stale_after_seconds: float | None = None
    #: When the journey asks (the workflow's clock, which a time-skipping test server moves
    #: and a replay repeats); None: the gate's own clock.
    asked_at: datetime | None = None
    #: The message was held (the kill switch, an operator's pause) after its slot was
    #: granted, until this moment (the workflow's clock): a grant from before it is decided
    #: again, as if asked now (quiet hours, caps; past its stale limit it is dropped). A grant
    #: from after it (this same ask, retried) stands. None: a grant stands.
    held_until: datetime | None = None


@dataclass
class ReserveSendResult:
    verdict: str  # SEND, WAIT, DROP or REFUSED
    #: WAIT: ask again then (the next moment the message is neither capped nor quiet).
    until: datetime | None = None
    #: Why (for the story and the send slot's row; no personal data).
    reason: str = ""
    #: REFUSED: how the journey ends, ``unsubscribed`` (no consent) or ``undeliverable``
    #: (a suppressed address: a hard bounce, a complaint, a manual entry).
    outcome: str = ""
