"""The operator's dashboard at ``/dashboard``: KPIs, funnels, routes, experiments, send times and
each customer's timeline, server-rendered (Jinja2) with plotly charts served from the installed
``plotly`` package (no CDN).

Only operators see it (either role: it only reads): a browser signs in once at
``/dashboard/login`` with ``KAERU_OPERATOR_TOKEN`` or an account's token (an HttpOnly,
SameSite=Strict cookie, signed, lasts 8 hours; :mod:`starter.operator_session`); a script may
send ``Authorization: Bearer`` instead. A write key never opens it (the browser key ships
inside shops' pages). With no operator token and no account there is no dashboard: the login
page says how to set one.

Every number comes from one :class:`~kaeru.analytics.model.Report` (``kaeru.reports``), the same
the weekly email and ``kaeru report`` show.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from kaeru.analytics.model import (
    ALL,
    ExperimentResult,
    Funnel,
    Heatmap,
    Period,
    Report,
    Route,
)
from kaeru.analytics.terminal import EARLIEST
from kaeru.credentials import Account
from kaeru.db import session as db_session
from kaeru.kill_switch import GLOBAL, switches
from kaeru.models import Customer, Touchpoint
from kaeru.money import format_minor
from kaeru.reports import (
    arm_rows,
    best_and_worst_routes,
    experiment_title,
    is_empty,
    kind_label,
    kinds_of,
    kpi_rows,
    load_report,
    money,
    percent,
    period_label,
    picker_dates,
    promoted_note,
    route_label,
)
from kaeru.settings import Settings
from starter import operator_session
from starter.deps import ApiError, account_of_token, credentials_of

router = APIRouter(prefix="/dashboard", include_in_schema=False)

#: The browser's sign-in cookie, and what its signature is for.
SESSION_COOKIE = "kaeru_dashboard"
_PURPOSE = "kaeru-dashboard"
#: The dashboard's own script (draws the charts) and plotly's bundle from the package.
STATIC = Path(__file__).resolve().parent / "static"
PLOTLY_JS = Path(str(files("plotly") / "package_data" / "plotly.min.js"))
#: The periods the picker offers, and the default.
DEFAULT_DAYS = 7
MAX_DAYS = 366
#: The most touchpoints a customer page lists (the newest).
TIMELINE_LIMIT = 500
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

NAV = (
    ("/dashboard", "Overview"),
    ("/dashboard/funnels", "Funnels"),
    ("/dashboard/routes", "Routes"),
    ("/dashboard/experiments", "Experiments"),
    ("/dashboard/heatmap", "Send times"),
    ("/dashboard/customers", "Customers"),
)

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.globals.update(money=money, percent=percent, route_label=route_label)


class PeriodError(ValueError):
    """The period picker's input is not a period; the message says what to give."""


def period_of(
    start: str | None, end: str | None, days: str | None, now: datetime | None = None
) -> Period:
    """The period of the picker: ``start`` and ``end`` dates (``YYYY-MM-DD``, both included,
    UTC), or the last ``days`` days up to ``now``; neither: the last :data:`DEFAULT_DAYS`.

    Raises:
        PeriodError: a date that is not one, an end before the start, too long a period.
    """
    now = now or datetime.now(UTC)
    if start or end:
        try:
            first = date.fromisoformat(start or "")
            last = date.fromisoformat(end or "")
        except ValueError:
            raise PeriodError(
                f"from {start!r} to {end!r} is not a period: give both dates as YYYY-MM-DD, "
                "e.g. start=2026-11-01&end=2026-11-30"
            ) from None
        if first < EARLIEST.date() or last > (now + timedelta(days=MAX_DAYS)).date():
            raise PeriodError(
                f"from {first} to {last} is outside what kaeru can have recorded: give dates "
                f"from {EARLIEST.date()} to a year from now"
            )
        if last < first:
            raise PeriodError(f"the period ends ({last}) before it starts ({first}): swap them")
        if (last - first).days + 1 > MAX_DAYS:
            raise PeriodError(f"a period is at most {MAX_DAYS} days: pick a shorter one")
        return Period(
            datetime.combine(first, time(), UTC), datetime.combine(last + timedelta(1), time(), UTC)
        )
    count = DEFAULT_DAYS
    if days:
        if not days.isdigit() or not 1 <= int(days) <= MAX_DAYS:
            raise PeriodError(f"days={days!r}: give a whole number of days from 1 to {MAX_DAYS}")
        count = int(days)
    return Period(now - timedelta(days=count), now)


def journey_url(settings: Settings, workflow_id: str) -> str:
    """The Temporal UI's page of one journey."""
    namespace = quote(settings.temporal_namespace, safe="")
    return (
        f"{settings.resolved_temporal_ui_url}/namespaces/{namespace}/workflows/"
        f"{quote(workflow_id, safe='')}"
    )


# ---- charts (plotly figure specs) -------------------------------------------------------------


def _kpi_chart(report: Report, kind: str) -> dict[str, Any]:
    comparison = report.kpis[kind]
    names = ["Sent", "Delivered", "Human opens", "Clicks", "Conversions"]
    fields = ["messages_sent", "delivered", "human_opens", "clicks", "conversions"]
    return {
        "data": [
            {
                "type": "bar",
                "name": label,
                "x": names,
                "y": [getattr(kpis, f) for f in fields],
            }
            for label, kpis in (
                ("period before", comparison.previous),
                ("this period", comparison.current),
            )
        ],
        "layout": {"barmode": "group", "height": 300, "margin": {"t": 20, "b": 40}},
    }


def _funnel_chart(funnel: Funnel) -> dict[str, Any]:
    return {
        "data": [
            {
                "type": "funnel",
                "y": [s.name for s in funnel.stages],
                "x": [s.count for s in funnel.stages],
                "textinfo": "value+percent initial",
            }
        ],
        "layout": {"height": 60 + 36 * len(funnel.stages), "margin": {"t": 10, "l": 140}},
    }


def sankey(routes: list[Route]) -> dict[str, Any]:
    """A Sankey of ``routes``: a node per step and position (``1. email_sent``), a link per
    consecutive pair weighted by customers, and each route's end split into purchased and not."""
    nodes: dict[str, int] = {}
    links: dict[tuple[int, int], int] = {}

    def node(label: str) -> int:
        return nodes.setdefault(label, len(nodes))

    def link(source: str, target: str, value: int) -> None:
        if value > 0:
            pair = (node(source), node(target))
            links[pair] = links.get(pair, 0) + value

    for route in routes:
        labels = [f"{i + 1}. {step}" for i, step in enumerate(route.steps)]
        for source, target in zip(labels, labels[1:], strict=False):
            link(source, target, route.customers)
        link(labels[-1], "purchased", route.converted)
        link(labels[-1], "no purchase", route.customers - route.converted)
    return {
        "data": [
            {
                "type": "sankey",
                "arrangement": "snap",
                "node": {"label": list(nodes), "pad": 14},
                "link": {
                    "source": [s for s, _ in links],
                    "target": [t for _, t in links],
                    "value": list(links.values()),
                },
            }
        ],
        "layout": {"height": 460, "margin": {"t": 10}},
    }


def _heatmap_chart(grid: tuple[tuple[int, ...], ...], title: str) -> dict[str, Any]:
    return {
        "data": [
            {
                "type": "heatmap",
                "z": [list(row) for row in grid],
                "x": [f"{h:02d}:00" for h in range(24)],
                "y": list(WEEKDAYS),
                # plotly.js's Greens runs dark to light: reversed, an empty hour is white.
                "colorscale": "Greens",
                "reversescale": True,
                "hovertemplate": "%{y} %{x}: %{z} " + title + "<extra></extra>",
            }
        ],
        "layout": {"height": 320, "margin": {"t": 10, "l": 90}, "yaxis": {"autorange": "reversed"}},
    }


def _lift_chart(experiment: ExperimentResult) -> dict[str, Any]:
    arms = [v for v in experiment.variants if v.conversion_lift is not None]
    estimates = [v.conversion_lift for v in arms if v.conversion_lift is not None]
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "markers",
                "x": [e.difference * 100 for e in estimates],
                "y": [v.variant for v in arms],
                "error_x": {
                    "type": "data",
                    "symmetric": False,
                    "array": [(e.high - e.difference) * 100 for e in estimates],
                    "arrayminus": [(e.difference - e.low) * 100 for e in estimates],
                },
            }
        ],
        "layout": {
            "height": 80 + 40 * max(1, len(arms)),
            "margin": {"t": 10, "l": 110},
            "xaxis": {"title": {"text": f"conversion lift against {experiment.control} (pp)"}},
            "shapes": [{"type": "line", "x0": 0, "x1": 0, "yref": "paper", "y0": 0, "y1": 1}],
        },
    }


def _charts_json(charts: dict[str, Any]) -> str:
    # Inside <script>: no "</script>" may appear, whatever a step or variant is named.
    return json.dumps(charts).replace("<", "\\u003c").replace(">", "\\u003e")


# ---- pages ------------------------------------------------------------------------------------


@dataclass
class Page:
    """What every page's layout needs: where it is, its period and its charts."""

    here: str
    title: str
    period: Period | None = None
    query: dict[str, str] = field(default_factory=dict)
    charts: dict[str, Any] = field(default_factory=dict)

    def render(self, template: str, **context: Any) -> str:
        period_query = ""
        extra: dict[str, Any] = {}
        if self.period is not None:
            first, last = picker_dates(self.period)
            picked = {"start": first, "end": last}
            period_query = "?" + urlencode(picked)
            extra = {
                "period_start": picked["start"],
                "period_end": picked["end"],
                "period_label": period_label(self.period),
                "previous_label": period_label(self.period.previous()),
                "days": round((self.period.end - self.period.start) / timedelta(days=1)),
                "period_amp": "&" + period_query[1:],
            }
        return _templates.get_template(f"dashboard/{template}").render(
            title=self.title,
            nav=NAV,
            here=self.here,
            period=self.period,
            period_query=period_query,
            keep=sorted(self.query.items()),
            charts=_charts_json(self.charts) if self.charts else "",
            **extra,
            **context,
        )


def overview_page(report: Report) -> str:
    """The KPIs of every journey kind against the period before, the revenue credited to each
    message (journey, step, variant), and the best and worst routes."""
    page = Page("/dashboard", "Overview", report.period)
    kinds = []
    for number, kind in enumerate(kinds_of(report)):
        chart = f"kpis-{number}"
        page.charts[chart] = _kpi_chart(report, kind)
        kinds.append(
            {
                "key": kind,
                "label": kind_label(kind),
                "rows": kpi_rows(report.kpis[kind]),
                "chart": chart,
            }
        )
    best, worst = best_and_worst_routes(report)
    return page.render(
        "overview.html.j2",
        empty=is_empty(report),
        kinds=kinds,
        attribution=report.attribution,
        best=best,
        worst=worst,
    )


def _breakdown(funnels: list[Funnel], label: Callable[[Funnel], str]) -> dict[str, Any] | None:
    if not funnels:
        return None
    return {
        "stages": [s.name for s in funnels[0].stages],
        "rows": [(label(f), [s.count for s in f.stages]) for f in funnels],
    }


def funnels_page(report: Report) -> str:
    """The funnel of each journey kind, with its breakdown by journey version and by day."""
    page = Page("/dashboard/funnels", "Funnels", report.period)
    funnels = []
    whole = [f for f in report.funnels if f.version is None and f.day is None]
    whole.sort(key=lambda f: (f.journey_kind != ALL, f.journey_kind))
    for number, funnel in enumerate(whole):
        chart = f"funnel-{number}"
        page.charts[chart] = _funnel_chart(funnel)
        same = [f for f in report.funnels if f.journey_kind == funnel.journey_kind]
        breakdowns = [
            (title, table)
            for title, table in (
                (
                    "By journey version",
                    _breakdown(
                        sorted(
                            (f for f in same if f.version is not None and f.day is None),
                            key=lambda f: f.version or "",
                        ),
                        lambda f: f"version {f.version}",
                    ),
                ),
                (
                    "By day",
                    _breakdown(
                        sorted(
                            (f for f in same if f.day is not None and f.version is None),
                            key=lambda f: f.day or date.min,
                        ),
                        lambda f: f.day.isoformat() if f.day else "",
                    ),
                ),
            )
            if table is not None
        ]
        funnels.append(
            {
                "key": funnel.journey_kind,
                "label": kind_label(funnel.journey_kind),
                "stages": funnel.stages,
                "chart": chart,
                "breakdowns": breakdowns,
            }
        )
    return page.render("funnels.html.j2", funnels=funnels)


def routes_page(report: Report, kind: str = ALL) -> str:
    """Route discovery for one journey kind or across journeys (:data:`ALL`): Sankey and table."""
    page = Page("/dashboard/routes", "Routes", report.period, query={"kind": kind})
    present = sorted({r.journey_kind for r in report.routes} | {ALL}, key=lambda k: (k != ALL, k))
    routes = [r for r in report.routes if r.journey_kind == kind]
    if routes:
        page.charts["sankey"] = sankey(routes)
    return page.render(
        "routes.html.j2",
        kind=kind,
        kinds=[(k, kind_label(k)) for k in present],
        routes=routes,
    )


def experiments_page(report: Report) -> str:
    """Every experiment and holdout: each arm, its lift with the 95 % interval, the verdict."""
    page = Page("/dashboard/experiments", "Experiments", report.period)
    experiments = []
    for number, experiment in enumerate(report.experiments):
        chart = f"lift-{number}"
        page.charts[chart] = _lift_chart(experiment)
        experiments.append(
            {
                "key": f"{experiment.journey_kind}/{experiment.experiment}",
                "title": experiment_title(experiment),
                "verdict": experiment.verdict,
                "promoted": promoted_note(experiment),
                "arms": arm_rows(experiment),
                "chart": chart,
            }
        )
    return page.render("experiments.html.j2", experiments=experiments)


def _busiest(grid: tuple[tuple[int, ...], ...]) -> str:
    cells = [(count, day, hour) for day, row in enumerate(grid) for hour, count in enumerate(row)]
    count, day, hour = max(cells, key=lambda c: (c[0], -c[1], -c[2]), default=(0, 0, 0))
    return f"{WEEKDAYS[day]} {hour:02d}:00 ({count})" if count else "–"


def heatmap_page(report: Report) -> str:
    """Human opens and clicks by weekday × hour."""
    page = Page("/dashboard/heatmap", "Send times", report.period)
    heatmap: Heatmap = report.heatmap
    grids = []
    for key, title, grid in (
        ("opens", "Human opens", heatmap.opens),
        ("clicks", "Clicks", heatmap.clicks),
    ):
        page.charts[key] = _heatmap_chart(grid, key)
        grids.append(
            {"key": key, "title": title, "total": sum(map(sum, grid)), "busiest": _busiest(grid)}
        )
    empty = all(g["total"] == 0 for g in grids)
    return page.render("heatmap.html.j2", empty=empty, grids=grids)


def _value(t: Touchpoint) -> str:
    if t.value_minor is None or not t.currency:
        return t.coupon_code or ""
    amount = format_minor(t.value_minor, t.currency)
    return f"{amount} ({t.coupon_code})" if t.coupon_code else amount


def customer_page(settings: Settings, query: str) -> str:
    """A customer's timeline of touchpoints, oldest first, each journey linked to the UI."""
    page = Page("/dashboard/customers", "Customers")
    customer: Customer | None = None
    timeline: list[dict[str, Any]] = []
    similar: list[str] = []
    truncated = False
    if query:
        with db_session(settings.resolved_database_url) as s:
            customer = s.get(Customer, query)
            # Touchpoints whether or not a profile exists: an imported store purchase, or
            # history kept after an erase, has no customers row.
            rows = s.exec(
                select(Touchpoint)
                .where(Touchpoint.customer_id == query)
                .order_by(col(Touchpoint.occurred_at).desc(), col(Touchpoint.id).desc())
                .limit(TIMELINE_LIMIT + 1)
            ).all()
            if customer is None and not rows:
                pattern = query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                similar = list(
                    s.exec(
                        select(Customer.customer_id)
                        .where(col(Customer.customer_id).like(f"{pattern}%", escape="\\"))
                        .order_by(col(Customer.customer_id))
                        .limit(20)
                    ).all()
                )
            truncated = len(rows) > TIMELINE_LIMIT
            timeline = [
                {
                    "when": t.occurred_at.strftime("%Y-%m-%d %H:%M:%S"),
                    "kind": t.kind,
                    "channel": t.channel or "",
                    "journey_id": t.journey_id,
                    "journey_url": journey_url(settings, t.journey_id) if t.journey_id else None,
                    "step": t.step or "",
                    "variant": t.variant or "",
                    "value": _value(t),
                }
                for t in reversed(rows[:TIMELINE_LIMIT])
            ]
    return page.render(
        "customer.html.j2",
        query=query,
        customer=customer,
        known=customer is not None or bool(timeline),
        timeline=timeline,
        similar=similar,
        truncated=truncated,
    )


NOT_CONFIGURED = "The dashboard is off because no operator token is set and no account exists."


def login_page(
    settings: Settings,
    message: str,
    *,
    next_path: str = "/dashboard",
    error: bool = False,
    configured: bool | None = None,
) -> str:
    """The sign-in form, or, with no operator token configured, how to set one."""
    if configured is None:
        configured = message != NOT_CONFIGURED
    return _templates.get_template("dashboard/login.html.j2").render(
        message=message,
        error=error,
        configured=configured,
        next=next_path,
        hours=operator_session.SESSION_TTL // 3600,
    )


def error_page(title: str, message: str) -> str:
    """A page that says what was wrong with the request and how to ask instead."""
    return Page("/dashboard", title).render("error.html.j2", message=message)


# ---- routes -----------------------------------------------------------------------------------


#: Where the layout takes the banner of the kill switches that are on.
HOLDS_SLOT = "<!-- kaeru:holds -->"


def holds_banner(database_url: str) -> str:
    """The banner every page shows while a kill switch is on (empty when none is): an
    operator reading the numbers learns why messages stopped."""
    on = switches(database_url)
    if not on:
        return ""
    shown = [
        {
            "kind": switch.scope != GLOBAL,
            "covers": (
                f"{switch.scope} journeys"
                if switch.scope != GLOBAL
                else "every journey"
                if switch.include_transactional
                else "marketing journeys"
            ),
            "since": switch.since.strftime("%Y-%m-%d %H:%M"),
            "actor": switch.actor,
            "reason": switch.reason,
        }
        for switch in on
    ]
    return _templates.get_template("dashboard/_holds.html.j2").render(switches=shown)


async def _with_holds(settings: Settings, body: str) -> str:
    banner = await run_in_threadpool(holds_banner, settings.resolved_database_url)
    return body.replace(HOLDS_SLOT, banner, 1)


def _html(body: str, status: int = 200) -> HTMLResponse:
    # Operator data: no shared cache may keep it.
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


async def _operator(request: Request, settings: Settings) -> Account | None:
    """The signed-in operator (by cookie, or a Bearer token), None for nobody."""
    account = await operator_session.signed_in_as(request, settings, SESSION_COOKIE, _PURPOSE)
    if account is not None:
        return account
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return await account_of_token(request, given.strip())


async def _configured(request: Request, settings: Settings) -> bool:
    """Whether anyone can sign in: KAERU_OPERATOR_TOKEN or an account of `kaeru operators`.

    Raises:
        ApiError: 503 when the accounts cannot be read (the database is down).
    """
    if operator_session.operator_token(settings):
        return True
    try:
        return bool((await credentials_of(request).current()).operators)
    except SQLAlchemyError as exc:
        raise ApiError(503, "unavailable", DATABASE_DOWN) from exc


#: The dashboard's answer when it cannot read the operator accounts.
DATABASE_DOWN = (
    "cannot read the operator accounts from the database (KAERU_DATABASE_URL); try again in "
    "a moment"
)


def _unavailable(settings: Settings, error: ApiError) -> Response:
    """The sign-in page saying why nobody can sign in now (503): the database is down."""
    return _html(login_page(settings, error.message, error=True), error.status)


def _safe_next(value: str) -> str:
    """Where to go after signing in: a dashboard path only, never another site."""
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith("/dashboard"):
        return "/dashboard"
    return value


async def _guard(request: Request) -> Response | None:
    """None for a signed-in operator (either role: the dashboard only reads); otherwise the
    answer: sign in, or no dashboard at all."""
    settings: Settings = request.app.state.settings
    try:
        if not await _configured(request, settings):
            return _html(login_page(settings, NOT_CONFIGURED, error=True), 503)
        if await _operator(request, settings) is not None:
            return None
    except ApiError as exc:
        if exc.status != 503:
            raise
        return _unavailable(settings, exc)
    wanted = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/dashboard/login?" + urlencode({"next": wanted}), status_code=303)


async def _report_page(request: Request, render: Callable[[Report], str]) -> Response:
    refused = await _guard(request)
    if refused is not None:
        return refused
    settings: Settings = request.app.state.settings
    query = request.query_params
    try:
        period = period_of(query.get("start"), query.get("end"), query.get("days"))
    except PeriodError as exc:
        return _html(error_page("Not a period", str(exc)), 400)
    report = await run_in_threadpool(load_report, settings, period)
    return _html(await _with_holds(settings, render(report)))


@router.get("")
async def overview(request: Request) -> Response:
    return await _report_page(request, overview_page)


@router.get("/funnels")
async def funnels(request: Request) -> Response:
    return await _report_page(request, funnels_page)


@router.get("/routes")
async def routes(request: Request) -> Response:
    kind = request.query_params.get("kind") or ALL
    return await _report_page(request, lambda report: routes_page(report, kind))


@router.get("/experiments")
async def experiments(request: Request) -> Response:
    return await _report_page(request, experiments_page)


@router.get("/heatmap")
async def heatmap(request: Request) -> Response:
    return await _report_page(request, heatmap_page)


@router.get("/customers")
async def customers(request: Request) -> Response:
    refused = await _guard(request)
    if refused is not None:
        return refused
    settings: Settings = request.app.state.settings
    query = (request.query_params.get("id") or "").strip()
    if len(query) > 200:
        return _html(
            error_page("Not a customer id", "a customer id is at most 200 characters"), 400
        )
    page = await run_in_threadpool(customer_page, settings, query)
    return _html(await _with_holds(settings, page))


@router.get("/login")
async def login_form(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    next_path = _safe_next(request.query_params.get("next", "/dashboard"))
    try:
        if not await _configured(request, settings):
            return _html(login_page(settings, NOT_CONFIGURED, error=True), 503)
    except ApiError as exc:
        return _unavailable(settings, exc)
    return _html(login_page(settings, "Sign in with the operator token.", next_path=next_path))


@router.post("/login")
async def login(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    next_path = _safe_next(form.get("next", ["/dashboard"])[0])
    given = form.get("token", [""])[0].strip()
    try:
        if not await _configured(request, settings):
            return _html(login_page(settings, NOT_CONFIGURED, error=True), 503)
        account = await account_of_token(request, given) if given else None
    except ApiError as exc:
        if exc.status != 503 or exc.code != "unavailable":
            raise
        return _unavailable(settings, exc)
    if account is None:
        message = (
            "That is not the operator token (KAERU_OPERATOR_TOKEN) nor a token of `kaeru "
            "operators add`, or it was revoked; try again."
        )
        return _html(login_page(settings, message, next_path=next_path, error=True), 401)
    cookie = (
        operator_session.account_cookie(account, _PURPOSE, operator_session.server_key_of(request))
        if account.token_hash
        else operator_session.session_cookie(operator_session.operator_token(settings), _PURPOSE)
    )
    answer = RedirectResponse(next_path, status_code=303)
    answer.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=operator_session.SESSION_TTL,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=urlsplit(settings.public_url).scheme == "https",
    )
    return answer


@router.post("/logout")
async def logout() -> Response:
    answer = RedirectResponse("/dashboard/login", status_code=303)
    answer.delete_cookie(SESSION_COOKIE, path="/dashboard")
    return answer


@router.get("/static/plotly.min.js")
async def plotly_js() -> Response:
    return FileResponse(
        PLOTLY_JS, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"}
    )


@router.get("/static/dashboard.js")
async def dashboard_js() -> Response:
    return FileResponse(STATIC / "dashboard.js", media_type="text/javascript")
