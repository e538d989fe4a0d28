"""Experiment and holdout results: who entered each arm, who bought, and whether it differs.

Read from the touchpoints alone: a ``journey_entered`` row says a customer entered a journey
kind in an arm (``variant`` ``holdout``, and ``detail["arms"]``: experiment → variant); a
``purchase`` row of that customer within ``KAERU_ATTRIBUTION_WINDOW`` after an entry converts
it. Each customer counts once per experiment, in the arm of their first entry in the period.

The tests, and why these:

- **Conversion**: a two-proportion z-test. Converting or not is a yes/no per recipient, and
  with the hundreds of recipients a verdict waits for, the difference of two proportions is
  close to normal; the p-value uses the pooled proportion (the null hypothesis says the arms
  convert alike), the 95 % interval the unpooled standard error (no such assumption).
- **Revenue per recipient**: Welch's t-test. Revenue is mostly zeros and a few orders of very
  different sizes, so the arms' variances differ; Welch's test does not assume they are equal
  (Student's does) and its Welch-Satterthwaite degrees of freedom keep small samples honest.
  The t distribution is computed here (the regularised incomplete beta function) rather than
  with scipy, which would add tens of megabytes for one function; the standard library's
  ``statistics.NormalDist`` gives the normal one.

Money stays per currency: a currency's revenue per recipient is its orders' total over every
recipient of the arm (those who bought nothing, or in another currency, count as 0).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from statistics import NormalDist

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from kaeru.analytics.model import Estimate, ExperimentResult, Period, VariantResult
from kaeru.journeys import JourneyError, registry
from kaeru.models import ExperimentPromotion, Touchpoint, utcnow
from kaeru.settings import Settings
from kaeru.variants import HOLDOUT

#: The experiment name of a journey kind's holdout against everyone who got the journey.
HOLDOUT_EXPERIMENT = "holdout"
#: The arm of everyone a kind's journey did not hold out, in :data:`HOLDOUT_EXPERIMENT`.
TREATED = "journey"
#: The touchpoint kinds read here.
ENTERED = "journey_entered"
PURCHASE = "purchase"
#: Significance level of every verdict (two-sided), and the confidence of every interval.
ALPHA = 0.05
COLLECTING = "collecting"
NO_DIFFERENCE = "no difference"

_NORMAL = NormalDist()


# ---- the statistics ---------------------------------------------------------------------------


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _regularised_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t distribution with ``df`` degrees of freedom (t >= 0)."""
    return 0.5 * _regularised_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (p >= 0.5) of Student's t with ``df`` degrees of freedom."""
    low, high = 0.0, 1.0
    while t_sf(high, df) > 1.0 - p:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if t_sf(middle, df) > 1.0 - p:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def two_proportion(
    control_conversions: int, control_n: int, conversions: int, n: int
) -> Estimate | None:
    """The arm's conversion rate minus the control's: a two-proportion z-test (pooled) and a
    95 % Wald interval (unpooled). None when either arm has no recipients."""
    if control_n == 0 or n == 0:
        return None
    p0, p1 = control_conversions / control_n, conversions / n
    difference = p1 - p0
    pooled = (control_conversions + conversions) / (control_n + n)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / control_n + 1 / n))
    se = math.sqrt(p0 * (1 - p0) / control_n + p1 * (1 - p1) / n)
    z = _NORMAL.inv_cdf(1 - ALPHA / 2)
    p_value = 2 * (1 - _NORMAL.cdf(abs(difference) / se_pooled)) if se_pooled > 0 else None
    return Estimate(difference, difference - z * se, difference + z * se, p_value)


@dataclass(frozen=True)
class Sample:
    """What Welch's test needs of one arm: its size, mean and (n - 1) variance."""

    n: int
    mean: float
    variance: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Sample:
        n = len(values)
        mean = sum(values) / n if n else 0.0
        variance = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        return cls(n, mean, variance)


def welch(control: Sample, arm: Sample) -> Estimate | None:
    """The arm's mean minus the control's: Welch's t-test and its 95 % interval (Welch-
    Satterthwaite degrees of freedom). None when an arm has fewer than two values."""
    if control.n < 2 or arm.n < 2:
        return None
    difference = arm.mean - control.mean
    v0, v1 = control.variance / control.n, arm.variance / arm.n
    se = math.sqrt(v0 + v1)
    if se == 0:
        return Estimate(difference, difference, difference, None)
    df = (v0 + v1) ** 2 / (v0**2 / (control.n - 1) + v1**2 / (arm.n - 1))
    half = t_quantile(1 - ALPHA / 2, df) * se
    p_value = min(1.0, 2 * t_sf(abs(difference) / se, df))
    return Estimate(difference, difference - half, difference + half, p_value)


# ---- the results ------------------------------------------------------------------------------


@dataclass
class _Arm:
    """One arm's recipients: customer → the times they entered in it."""

    entries: dict[str, list[datetime]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Purchase:
    order: str
    at: datetime
    value_minor: int
    currency: str


def _window(settings: Settings) -> timedelta:
    return settings.attribution_window


def _declared(kind: str, experiment: str) -> list[str]:
    """The arms a journey class declares for ``experiment``, in order (empty: not known)."""
    try:
        route = registry().route(kind)
    except (KeyError, JourneyError):
        return []
    declared = route.journey.experiments.get(experiment)
    return list(declared.variants) if declared is not None else []


def _promotable(kind: str, experiment: str) -> bool:
    try:
        declared = registry().route(kind).journey.experiments.get(experiment)
    except (KeyError, JourneyError):
        return False
    return declared is not None and declared.auto_promote


def _converted(
    entries: list[datetime], purchases: list[_Purchase], window: timedelta
) -> list[_Purchase]:
    """The purchases within ``window`` after one of ``entries``."""
    return [p for p in purchases if any(e <= p.at <= e + window for e in entries)]


def _result(
    kind: str,
    experiment: str,
    arms: dict[str, _Arm],
    control: str,
    purchases: dict[str, list[_Purchase]],
    settings: Settings,
    settled: bool = True,
) -> ExperimentResult:
    window = _window(settings)
    bought: dict[str, dict[str, list[_Purchase]]] = {
        name: {
            customer: _converted(times[:1], purchases.get(customer, []), window)
            for customer, times in arm.entries.items()
        }
        for name, arm in arms.items()
    }
    currencies = sorted({p.currency for arm in bought.values() for b in arm.values() for p in b})

    def revenue_sample(name: str, currency: str) -> Sample:
        return Sample.of(
            [sum(p.value_minor for p in b if p.currency == currency) for b in bought[name].values()]
        )

    def conversions(name: str) -> int:
        return sum(1 for b in bought[name].values() if b)

    results = []
    for name in arms:
        n = len(arms[name].entries)
        converted = conversions(name)
        lift = None
        revenue_lift: dict[str, Estimate] = {}
        if name != control:
            lift = two_proportion(conversions(control), len(arms[control].entries), converted, n)
            for currency in currencies:
                estimate = welch(revenue_sample(control, currency), revenue_sample(name, currency))
                if estimate is not None:
                    revenue_lift[currency] = estimate
        results.append(
            VariantResult(
                variant=name,
                recipients=n,
                conversions=converted,
                conversion_rate=converted / n if n else None,
                revenue_per_recipient={c: revenue_sample(name, c).mean for c in currencies}
                if n
                else {},
                conversion_lift=lift,
                revenue_lift=revenue_lift,
            )
        )
    return ExperimentResult(
        journey_kind=kind,
        experiment=experiment,
        control=control,
        variants=tuple(results),
        verdict=verdict(results, control, settings.experiment_min_sample)
        if settled
        else COLLECTING,
    )


def verdict(arms: Sequence[VariantResult], control: str, min_sample: int) -> str:
    """``collecting`` until every arm has ``min_sample`` recipients; then the variant whose
    conversion beats every other variant (two-proportion z-tests, Holm-corrected at
    ``ALPHA`` over the comparisons), ``<control> wins`` when the control is a variant that
    beats every other one that way, else ``no difference``.

    A holdout is never a candidate, and beating the holdout is not enough to win: with arms
    A 10.1 % and B 10.0 % both far above a 2 % holdout, A has not been shown better than B.
    The holdout's own result (the journey against doing nothing) is the ``holdout``
    experiment. Conversion decides: revenue per recipient is shown with its interval, but one
    large order moves it more than any subject line does."""
    if not arms or any(a.recipients < min_sample for a in arms):
        return COLLECTING
    variants = [a for a in arms if a.variant != HOLDOUT]
    if len(variants) < 2:
        # The journey against the holdout: the only comparison there is.
        [*_, arm] = arms
        lift = arm.conversion_lift
        if lift is None or lift.p_value is None or lift.p_value >= ALPHA:
            return NO_DIFFERENCE
        return f"{arm.variant} wins" if lift.difference > 0 else f"{control} wins"
    best = max(variants, key=lambda a: a.conversion_rate or 0.0)
    p_values = []
    for other in variants:
        if other is best:
            continue
        estimate = two_proportion(
            other.conversions, other.recipients, best.conversions, best.recipients
        )
        if estimate is None or estimate.p_value is None or estimate.difference <= 0:
            return NO_DIFFERENCE
        p_values.append(estimate.p_value)
    # Holm: the k-th smallest p-value must be below ALPHA / (m - k).
    m = len(p_values)
    if all(p < ALPHA / (m - k) for k, p in enumerate(sorted(p_values))):
        return f"{best.variant} wins"
    return NO_DIFFERENCE


def experiment_results(
    session: Session, settings: Settings, period: Period, now: datetime | None = None
) -> tuple[ExperimentResult, ...]:
    """Every experiment and holdout of journeys entered in ``period``, by journey kind.

    A kind with held-out customers gets a ``holdout`` result (``holdout`` against ``journey``,
    everyone else: the journey's lift over doing nothing), and the holdout is the control of
    each of its experiments too; otherwise an experiment's control is its first declared
    variant. Declared variants nobody entered show with 0 recipients. Promotions show who won,
    when and why.

    Each customer counts from their first entry in the period (a held-out journey ends at
    once, so its customer enters again and again where a treated one stays in one journey).
    No verdict (``collecting``) until the attribution window of the period's last entry has
    passed by ``now`` (default: the clock): a customer who entered an hour ago has not had the
    days an older one had to buy, and an arm that waits longer before its email would look
    worse. The numbers show meanwhile; once settled, a period's results read the same
    whenever they are asked. (The promoter therefore judges the period that ends one window
    before now.)
    """
    entered = session.exec(
        select(Touchpoint)
        .where(
            Touchpoint.kind == ENTERED,
            col(Touchpoint.occurred_at) >= period.start,
            col(Touchpoint.occurred_at) < period.end,
        )
        .order_by(col(Touchpoint.occurred_at), col(Touchpoint.id))
    ).all()
    if not entered:
        return ()
    window = _window(settings)
    #: Whether every entry of the period has had its whole window to buy.
    settled = max(row.occurred_at for row in entered) + window <= (now or utcnow())
    # Holdout: kind → arm → customers (first entry's arm), then experiment → arm → customers.
    holdouts: dict[str, dict[str, _Arm]] = defaultdict(lambda: {HOLDOUT: _Arm(), TREATED: _Arm()})
    experiments: dict[tuple[str, str], dict[str, _Arm]] = defaultdict(dict)
    kinds_held: set[str] = set()
    for row in entered:
        kind = row.journey_kind or ""
        held = row.variant == HOLDOUT
        if held:
            kinds_held.add(kind)
        at = row.occurred_at
        arm = HOLDOUT if held else TREATED
        _enter(holdouts[kind], arm, row.customer_id, at)
        detail = row.detail if isinstance(row.detail, dict) else {}
        arms = detail.get("arms")
        given = detail.get("promoted")
        for name, variant in arms.items() if isinstance(arms, dict) else ():
            if isinstance(given, list) and name in given:
                continue  # the promoted winner, given to everyone: not a randomised arm
            _enter(experiments[(kind, str(name))], str(variant), row.customer_id, at)
    for (kind, _name), arms in experiments.items():
        # The holdout of this kind is every experiment's control there.
        if kind in kinds_held:
            for customer, times in holdouts[kind][HOLDOUT].entries.items():
                _enter_all(arms, HOLDOUT, customer, times)
    customers = {row.customer_id for row in entered}
    purchases = _purchases(session, customers, period, window)
    promotions = {
        (p.journey_kind, p.experiment): p for p in session.exec(select(ExperimentPromotion)).all()
    }
    results = []
    for kind in sorted(kinds_held):
        results.append(
            _result(kind, HOLDOUT_EXPERIMENT, holdouts[kind], HOLDOUT, purchases, settings, settled)
        )
    for (kind, name), arms in sorted(experiments.items()):
        declared = _declared(kind, name)
        ordered: dict[str, _Arm] = {}
        if HOLDOUT in arms:
            ordered[HOLDOUT] = arms[HOLDOUT]
        for variant in [*declared, *sorted(v for v in arms if v not in declared)]:
            if variant != HOLDOUT:
                ordered[variant] = arms.get(variant, _Arm())
        control = next(iter(ordered))
        result = _result(kind, name, ordered, control, purchases, settings, settled)
        promotion = promotions.get((kind, name))
        if promotion is not None:
            result = dataclasses.replace(
                result,
                promoted=promotion.variant,
                promoted_at=promotion.promoted_at,
                promotion_reason=promotion.reason,
            )
        results.append(result)
    return tuple(results)


def _enter(arms: dict[str, _Arm], arm: str, customer: str, at: datetime) -> None:
    """Count ``customer``'s entry at ``at`` in ``arm``, unless an earlier entry put them in
    another arm of the same experiment (their first entry's arm is theirs)."""
    for name, other in arms.items():
        if name != arm and customer in other.entries:
            return
    arms.setdefault(arm, _Arm()).entries.setdefault(customer, []).append(at)


def _enter_all(arms: dict[str, _Arm], arm: str, customer: str, times: Iterable[datetime]) -> None:
    for at in times:
        _enter(arms, arm, customer, at)


def _purchases(
    session: Session, customers: set[str], period: Period, window: timedelta
) -> dict[str, list[_Purchase]]:
    """Each customer's purchases from the period's start to a window past its end, one per
    order (an order recorded twice, say online and again from a store import, counts once)."""
    rows = session.exec(
        select(Touchpoint).where(
            Touchpoint.kind == PURCHASE,
            col(Touchpoint.occurred_at) >= period.start,
            col(Touchpoint.occurred_at) <= period.end + window,
        )
    ).all()
    found: dict[str, list[_Purchase]] = defaultdict(list)
    seen: set[tuple[str, str]] = set()
    for row in rows:
        if row.customer_id not in customers or row.currency is None:
            continue
        order = row.order_id or row.key or str(row.id)
        if (row.customer_id, order) in seen:
            continue
        seen.add((row.customer_id, order))
        found[row.customer_id].append(
            _Purchase(order, row.occurred_at, row.value_minor or 0, row.currency)
        )
    return found


# ---- promotion --------------------------------------------------------------------------------


def promote_winners(
    session: Session, settings: Settings, period: Period, now: datetime | None = None
) -> list[ExperimentPromotion]:
    """With ``KAERU_EXPERIMENT_AUTO_PROMOTE``, record the winner of each experiment that has
    one (not a holdout, not one whose class says ``auto_promote=False``, not one promoted
    already): journeys entering after it give every customer that variant. Returns the new
    promotions (none when the setting is off)."""
    if not settings.experiment_auto_promote:
        return []
    promoted = []
    for result in experiment_results(session, settings, period, now):
        if result.experiment == HOLDOUT_EXPERIMENT or not result.verdict.endswith(" wins"):
            continue
        winner = result.verdict.removesuffix(" wins")
        if winner == HOLDOUT or result.promoted is not None:
            continue
        if not _promotable(result.journey_kind, result.experiment):
            continue
        row = ExperimentPromotion(
            journey_kind=result.journey_kind,
            experiment=result.experiment,
            variant=winner,
            promoted_at=now or utcnow(),
            reason=_reason(result, winner, period),
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:  # another process promoted it meanwhile: theirs stands
            continue
        promoted.append(row)
    return promoted


def _reason(result: ExperimentResult, winner: str, period: Period) -> str:
    """The numbers a promotion stood on, for a later reader."""
    arms = "; ".join(
        f"{a.variant}: {a.conversions}/{a.recipients} converted"
        + (
            f", {a.conversion_lift.difference:+.4f} vs {result.control} "
            f"(95% CI {a.conversion_lift.low:+.4f} to {a.conversion_lift.high:+.4f}, "
            f"p={a.conversion_lift.p_value:.4g})"
            if a.conversion_lift is not None and a.conversion_lift.p_value is not None
            else ""
        )
        for a in result.variants
    )
    start = period.start.astimezone(UTC)
    end = period.end.astimezone(UTC)
    return (
        f"{winner} won (two-proportion z-test on conversion, p < {ALPHA}) over journeys "
        f"entered {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC: {arms}"
    )[:2000]
