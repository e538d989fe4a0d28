"""What the analytics compute: the one shape the report, `kaeru report`, the weekly email and
the dashboard all read.

Money is integer minor units per ISO 4217 currency (``{"EUR": 1999}``); currencies are never
summed together. Rates are fractions in ``[0, 1]`` (``None`` when the denominator is zero, so a
step nobody reached reads "n/a", not 0 %). Times are aware UTC datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

#: A journey-kind key meaning "every journey together".
ALL = "*"


@dataclass(frozen=True)
class Period:
    """A half-open window ``[start, end)``."""

    start: datetime
    end: datetime

    def previous(self) -> Period:
        """The period of the same length just before this one (for "against the period before")."""
        return Period(self.start - (self.end - self.start), self.start)


@dataclass(frozen=True)
class Kpis:
    """The key numbers of one journey kind (or :data:`ALL`) in one period."""

    journey_kind: str
    entered: int
    messages_sent: int
    delivered: int
    human_opens: int
    clicks: int
    unsubscribes: int
    bounces: int
    conversions: int
    revenue: dict[str, int]
    conversion_rate: float | None
    delivery_rate: float | None
    open_rate: float | None
    click_rate: float | None
    unsubscribe_rate: float | None
    bounce_rate: float | None


@dataclass(frozen=True)
class KpiComparison:
    """One kind's KPIs in the period and in the period before."""

    current: Kpis
    previous: Kpis


@dataclass(frozen=True)
class FunnelStage:
    """One stage of a funnel: ``count`` customers reached it; ``dropoff`` of the stage before
    did not (``None`` for the first stage)."""

    name: str
    count: int
    dropoff: float | None


@dataclass(frozen=True)
class Funnel:
    """entered → each message sent → delivered → opened (human) → clicked → audience → ad click
    → offer → purchased, for one journey kind (``version`` ``None``: all versions together;
    ``day`` ``None``: the whole period)."""

    journey_kind: str
    version: str | None
    day: date | None
    stages: tuple[FunnelStage, ...]


@dataclass(frozen=True)
class Attribution:
    """Orders and revenue credited to one journey kind, step and variant."""

    journey_kind: str
    step: str
    variant: str | None
    orders: int
    revenue: dict[str, int]


@dataclass(frozen=True)
class Route:
    """One ordered sequence of touchpoints (consecutive duplicates merged, cut at the step
    limit; ``steps == ("other",)`` groups the routes beyond the top ones), for one journey kind
    or :data:`ALL`. ``converted`` of ``customers`` ended it with a purchase."""

    journey_kind: str
    steps: tuple[str, ...]
    customers: int
    converted: int
    conversion_rate: float | None
    revenue: dict[str, int]


@dataclass(frozen=True)
class Heatmap:
    """Human opens and clicks by weekday (0 = Monday) × hour (0-23) in each customer's own time
    zone: ``opens[weekday][hour]``."""

    opens: tuple[tuple[int, ...], ...]
    clicks: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Estimate:
    """A difference with its 95 % confidence interval and a two-sided p-value."""

    difference: float
    low: float
    high: float
    p_value: float | None


@dataclass(frozen=True)
class VariantResult:
    """One arm of an experiment (a variant, or ``holdout``)."""

    variant: str
    recipients: int
    conversions: int
    conversion_rate: float | None
    #: Revenue per recipient in minor units, per currency.
    revenue_per_recipient: dict[str, float]
    #: Against the control arm (the holdout when there is one, else the first variant);
    #: ``None`` for the control itself.
    conversion_lift: Estimate | None
    #: Per currency.
    revenue_lift: dict[str, Estimate]


@dataclass(frozen=True)
class ExperimentResult:
    """An experiment (or a journey kind's holdout) and its verdict."""

    journey_kind: str
    experiment: str
    control: str
    variants: tuple[VariantResult, ...]
    #: ``"collecting"`` (below the minimum sample), ``"no difference"``, or ``"<variant> wins"``.
    verdict: str
    #: Set when a promotion rule made a variant the winner: when, and why.
    promoted: str | None = None
    promoted_at: datetime | None = None
    #: Why the promotion happened: the numbers its verdict stood on (stream X).
    promotion_reason: str | None = None


@dataclass(frozen=True)
class Report:
    """Everything the weekly report, `kaeru report` and the dashboard show for one period."""

    period: Period
    kpis: dict[str, KpiComparison]
    funnels: tuple[Funnel, ...]
    attribution: tuple[Attribution, ...]
    routes: tuple[Route, ...]
    heatmap: Heatmap
    experiments: tuple[ExperimentResult, ...] = field(default=())
