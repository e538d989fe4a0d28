"""The ``kaeru`` command: the embedded dev stack, the worker, the API, and operator chores.

An expected problem (a wrong setting, Temporal unreachable, a port in use) is printed as one
line saying what is wrong and what to do, and the command exits with status 1; only bugs
print a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy import func
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlmodel import col, select
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from activities.email.addresses import mask_address, normalise_address
from activities.email.gate import suppression_of
from activities.recommendations import refresh_now
from kaeru.analytics.model import Period
from kaeru.analytics.report import build_report
from kaeru.analytics.serialise import report_to_json
from kaeru.analytics.terminal import (
    PeriodError,
    period_of,
    render,
    render_experiments,
    write_csv,
)
from kaeru.catalog import CatalogFileError, import_catalog, read_catalog
from kaeru.codec import KEY_CACHE_TTL, CodecKeyError, key_store, master_keys
from kaeru.db import session as db_session
from kaeru.db import write_session as db_write_session
from kaeru.experiments import experiment_results, promote_winners
from kaeru.identity import email_problem
from kaeru.journeys import JourneyError, discover, load_registry, setting_infos
from kaeru.machine_opens import RangeFileError, write_ranges
from kaeru.models import AudienceMember, Suppression
from kaeru.search_attributes import SEARCH_ATTRIBUTES
from kaeru.serving import (
    DEV_WRITE_KEY,
    AppServer,
    StackError,
    listening_socket,
    local_url,
    migrate_database,
    safe_url,
)
from kaeru.settings import Settings, known_timezone
from kaeru.telemetry import API_SERVICE, WORKER_SERVICE, Telemetry
from kaeru.telemetry import setup_logging as configure_logging
from kaeru.temporal import connect, ensure_search_attributes
from kaeru.worker_metrics import MetricsAddressInvalid, MetricsPortTaken, worker_runtime
from starter.app import create_app
from starter.feedback import suppress
from starter.parking import drop_parked, parked_events, retry_parked
from starter.privacy import erase_customer, export_customer
from starter.touchpoints_import import ImportFileError, import_rows, read_rows
from worker import run_worker

T = TypeVar("T")

app = typer.Typer(
    name="kaeru",
    help="Marketing automation where every customer journey is a Temporal workflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


# ---- shared plumbing -------------------------------------------------------------------------


def fail(problem: str, *fix_lines: str) -> NoReturn:
    """Print ``problem`` (and any lines of the fix) on stderr and exit with status 1."""
    errors.print(Text.assemble(("error: ", "bold red"), problem), soft_wrap=True)
    for line in fix_lines:
        errors.print(Text(f"  {line}"), soft_wrap=True)
    raise typer.Exit(1)


def env_name(field: str) -> str:
    return f"KAERU_{field.upper()}"


def settings_problem(error: ValidationError) -> str:
    """One line naming every ``KAERU_`` variable that is wrong, with what it should be."""
    problems = []
    durations = False
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else "?"
        value = e.get("input")
        info = Settings.model_fields.get(field)
        secret = info is not None and "SecretStr" in str(info.annotation)  # never echo a secret
        shown = f"={value!r}" if isinstance(value, str | int | float) and not secret else ""
        problems.append(f"{env_name(field)}{shown} is not valid ({e['msg']})")
        durations = durations or (info is not None and info.annotation is timedelta)
    fix = "Fix it in the environment or in .env"
    if durations:
        fix += "; durations are seconds (86400) or ISO 8601 (P1D, PT30M)"
    return "; ".join(problems) + f". {fix}"


def load_settings() -> Settings:
    """The settings, every journey's included (kaeru/journeys.py): a wrong one fails here,
    with the variable and the fix, not in the first journey it would start."""
    try:
        settings = Settings()
    except ValidationError as exc:
        fail(settings_problem(exc))
    try:
        load_registry(settings)
    except JourneyError as exc:
        fail(str(exc))
    return settings


def setup_logging(verbose: bool, log_format: str = "text") -> None:
    """Log at INFO (``verbose``) or WARNING, in ``KAERU_LOG_FORMAT`` (kaeru/telemetry.py)."""
    configure_logging(logging.INFO if verbose else logging.WARNING, log_format)


def telemetry_for(service: str) -> Telemetry:
    """Tracing as the OTEL_* variables say (off without an OTLP endpoint), or a CLI message."""
    try:
        return Telemetry.from_env(service)
    except ValueError as exc:
        fail(str(exc))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``, turning expected problems into one line and Ctrl-C into a quiet exit."""
    try:
        return asyncio.run(coro)
    except StackError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def connected(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A Temporal client, or a :class:`StackError` naming the setting to check."""
    try:
        return await connect(settings, runtime=runtime)
    except RuntimeError as exc:
        raise StackError(str(exc)) from exc


async def until_stopped(*watched: asyncio.Future[Any]) -> None:
    """Return on SIGINT or SIGTERM, or as soon as one of ``watched`` ends."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stopper, *watched], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# ---- kaeru dev / demo ------------------------------------------------------------------------


@app.command()
def dev(
    demo: Annotated[
        bool,
        typer.Option(
            "--demo/--no-demo",
            help="Shorten the cart journey's waits and play a demo shopper once it is up.",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Run everything on this machine: Temporal, mail catcher, SQLite, worker and API.

    What is configured (KAERU_TEMPORAL_ADDRESS, KAERU_SMTP_HOST, KAERU_DATABASE_URL) is used
    instead of the embedded part.
    """
    # Dev tooling is imported here, not at the top, so production commands never load it.
    from kaeru.dev.demo import with_demo_waits
    from kaeru.dev.devstack import run_dev
    from kaeru.dev.plan import plan_dev

    settings = load_settings()
    if demo:
        settings = with_demo_waits(settings)
    setup_logging(verbose, settings.log_format)
    run(run_dev(plan_dev(settings), console, demo=demo))


@app.command()
def demo() -> None:
    """Play the demo shopper against a `kaeru dev --demo` running in another terminal."""
    from kaeru.dev.crowd import run_demo
    from kaeru.dev.demo import DemoTarget, with_demo_waits
    from kaeru.dev.plan import plan_dev

    plan = plan_dev(with_demo_waits(load_settings()))
    if plan.inbox_url is None:
        fail(
            "the demo reads its email from the local mail catcher, and KAERU_SMTP_HOST is set: "
            "unset it for `kaeru dev` and `kaeru demo`"
        )
    setup_logging(False)
    target = DemoTarget.for_plan(plan, same_process=False)

    async def main() -> None:
        async with httpx.AsyncClient(timeout=3) as http:
            for url, what in ((target.api_url, "the API"), (target.inbox_url, "the mail inbox")):
                try:
                    await http.get(url)
                except httpx.HTTPError:
                    raise StackError(
                        f"{what} does not answer at {url}: start `kaeru dev --demo` in another "
                        "terminal first"
                    ) from None
        client = await connected(plan.settings)
        await run_demo(plan.settings, client, target, console)

    run(main())


# ---- scale-out processes ---------------------------------------------------------------------


@app.command()
def worker(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Run one worker (journeys and activities) against the configured Temporal."""
    settings = load_settings()
    setup_logging(verbose, settings.log_format)

    telemetry = telemetry_for(WORKER_SERVICE)

    async def main() -> None:
        try:
            runtime = worker_runtime(settings)
        except MetricsAddressInvalid as exc:
            raise StackError(str(exc)) from exc
        except MetricsPortTaken as exc:
            # Hosts that run several workers keep them all: only this one goes without its
            # endpoint (as `kaeru dev` does).
            runtime = None
            logging.getLogger("kaeru.worker").warning(
                "worker metrics are off for this process: %s", exc
            )
        client = await connected(settings, runtime)
        task = asyncio.create_task(run_worker(client, settings, telemetry))
        console.print(
            f"worker polling task queue {settings.task_queue!r} on "
            f"{settings.resolved_temporal_address} ({settings.temporal_namespace}); Ctrl-C stops"
        )
        if runtime is not None:
            console.print(
                f"worker metrics: http://{settings.worker_metrics_host}:"
                f"{settings.worker_metrics_port}/metrics"
            )
        await until_stopped(task)
        if task.done():
            error = task.exception()
            if error is not None:
                logging.getLogger("kaeru.worker").error("the worker failed", exc_info=error)
            raise StackError(f"the worker stopped by itself: {error or 'no error'}")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        run(main())
    finally:
        telemetry.shutdown()


#: Shortest server write key and operator token ``kaeru api`` accepts.
MIN_SECRET_LENGTH = 16


def _has_managed_server_key(settings: Settings) -> bool:
    """Whether the database holds an unrevoked server key of `kaeru keys create` (False when
    it cannot be read, or has no tables yet)."""
    from kaeru.credentials import load_credentials

    try:
        return load_credentials(settings.resolved_database_url).has_server_key
    except SQLAlchemyError:
        return False


def api_key_problem(settings: Settings) -> str | None:
    """Why ``kaeru api`` must not serve with these keys, with the fix; None if they will do."""
    fix = (
        "set it to a long random secret, e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
    )
    key = settings.write_key.get_secret_value() if settings.write_key else ""
    if not key and not _has_managed_server_key(settings):
        return (
            "no write key: KAERU_WRITE_KEY is unset and the database has no unrevoked server "
            "key; create one with `kaeru keys create NAME` (it prints the key once), or "
            f"{fix}; your shop's server sends it"
        )
    if key and key == DEV_WRITE_KEY:
        return f"KAERU_WRITE_KEY is the dev key {DEV_WRITE_KEY!r}, which anyone knows: {fix}"
    if key and len(key) < MIN_SECRET_LENGTH:
        return f"KAERU_WRITE_KEY must be at least {MIN_SECRET_LENGTH} characters: {fix}"
    browser = settings.browser_write_key
    if key and browser is not None and browser.get_secret_value() == key:
        return (
            "KAERU_BROWSER_WRITE_KEY equals KAERU_WRITE_KEY: the browser key is public (it "
            "ships in web pages), so the two must differ; give the browser its own key"
        )
    token = settings.operator_token.get_secret_value() if settings.operator_token else None
    if token is not None and len(token) < MIN_SECRET_LENGTH:
        return f"KAERU_OPERATOR_TOKEN must be at least {MIN_SECRET_LENGTH} characters: {fix}"
    return None


@app.command()
def api(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO.")] = False,
) -> None:
    """Serve the HTTP API on KAERU_API_HOST:KAERU_API_PORT (it also routes events)."""
    settings = load_settings()
    if problem := api_key_problem(settings):
        fail(problem)
    setup_logging(verbose, settings.log_format)

    telemetry = telemetry_for(API_SERVICE)

    async def main() -> None:
        sock = listening_socket(
            settings.api_host,
            settings.api_port,
            what="the API",
            fix="set KAERU_API_PORT to a free port",
        )
        # No client: the router connects in the background, so ingestion stores events
        # even while Temporal is down.
        server = AppServer(create_app(settings, telemetry=telemetry), sock, what="the API")
        await server.start()
        console.print(f"API on {local_url(settings.api_host, settings.api_port)}; Ctrl-C stops")
        await until_stopped(server.task)
        if server.task.done():
            error = server.task.exception()
            raise StackError(f"the API stopped by itself: {error or 'no error'}")
        await server.stop()

    try:
        run(main())
    finally:
        telemetry.shutdown()


# ---- chores ----------------------------------------------------------------------------------


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (safe to run again)."""
    settings = load_settings()
    url = settings.resolved_database_url
    try:
        migrate_database(url)
    except StackError as exc:
        fail(str(exc))
    console.print(f"The database schema is up to date: {safe_url(url)}")


@app.command()
def setup() -> None:
    """Register kaeru's search attributes on the configured Temporal namespace."""
    settings = load_settings()
    namespace = settings.temporal_namespace
    names = [key.name for key in SEARCH_ATTRIBUTES]

    async def main() -> None:
        client = await connected(settings)
        try:
            await ensure_search_attributes(client, namespace)
        except RuntimeError as exc:
            sa = " ".join(f"--sa {name}=Keyword" for name in names)
            fail(
                str(exc),
                "On Temporal Cloud, add them once with the tcld CLI (or in the Cloud UI, under",
                "the namespace's Search Attributes), then run `kaeru setup` again:",
                f"  tcld namespace search-attributes add -n {namespace} {sa}",
            )

    run(main())
    console.print(
        f"Search attributes {', '.join(names)} are registered in namespace {namespace!r} "
        f"on {settings.resolved_temporal_address}."
    )


def database_url_checked(settings: Settings) -> tuple[str, str]:
    """The database URL and its printable label; exits with the fix if there is no database."""
    url = settings.resolved_database_url
    try:
        label = safe_url(url)
    except StackError as exc:
        fail(str(exc))
    sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    if sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).exists():
        fail(_no_tables(label))
    return url, label


def _no_tables(label: str) -> str:
    return f"the database at {label} has no kaeru tables yet: run `kaeru migrate` or `kaeru dev`"


@contextmanager
def database_problems(label: str) -> Iterator[None]:
    """Turn a missing schema or an unreachable database into one line with the fix."""
    try:
        yield
    except ProgrammingError:  # PostgreSQL: undefined table
        fail(_no_tables(label))
    except OperationalError as exc:
        if "no such table" in str(exc):  # SQLite
            fail(_no_tables(label))
        reason = " ".join(str(exc.orig).split())
        fail(f"cannot open the database at {label} ({reason}): check KAERU_DATABASE_URL")


@app.command()
def audience(
    name: Annotated[
        str | None, typer.Argument(help="The audience; without it, every audience and its size.")
    ] = None,
) -> None:
    """List the members of a local ad audience (the store used unless Meta is configured)."""
    url, label = database_url_checked(load_settings())
    rows: list[tuple[str, ...]]
    with database_problems(label), db_session(url) as s:
        if name is None:
            sizes = s.exec(
                select(AudienceMember.audience, func.count())
                .group_by(col(AudienceMember.audience))
                .order_by(col(AudienceMember.audience))
            ).all()
            rows = [(a, str(n)) for a, n in sizes]
        else:
            members = s.exec(
                select(AudienceMember)
                .where(AudienceMember.audience == name)
                .order_by(col(AudienceMember.added_at))
            ).all()
            rows = [
                (m.customer_id, f"{m.added_at:%Y-%m-%d %H:%M:%S}", m.journey_id) for m in members
            ]
    if not rows:
        console.print(
            "No local audience has members yet." if name is None else f"No one is in {name!r}."
        )
        return
    table = Table(box=None, header_style="bold")
    columns = ("audience", "members") if name is None else ("customer", "added (UTC)", "journey")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)


# ---- kaeru report: what happened -----------------------------------------------------------------


@app.command()
def report(
    since: Annotated[
        str,
        typer.Option(help="Start: an age (7d, 30d, 2w, 12h) or an ISO date or time."),
    ] = "7d",
    until: Annotated[
        str | None,
        typer.Option(help="End (not included), as --since; default: now. An age counts back."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON (for machines).")
    ] = False,
    csv_dir: Annotated[
        Path | None,
        typer.Option("--csv", help="Write one CSV file per section into this directory."),
    ] = None,
) -> None:
    """What happened: KPIs against the period before, funnels, revenue recovered, routes,
    experiments and the send-time heatmap."""
    settings = load_settings()
    zone = known_timezone(settings.shop_timezone) or ZoneInfo("UTC")
    try:
        period = period_of(since, until, datetime.now(UTC), zone)
    except PeriodError as exc:
        fail(str(exc))
    url, label = database_url_checked(settings)
    with database_problems(label), db_session(url) as s:
        built = build_report(s, settings, period)
        built = dataclasses.replace(built, experiments=experiment_results(s, settings, period))
    if csv_dir is not None:
        try:
            written = write_csv(built, csv_dir)
        except OSError as exc:
            fail(f"cannot write the CSV files into {csv_dir} ({exc}): give a writable directory")
        if not as_json:
            console.print(f"Wrote {', '.join(p.name for p in written)} to {csv_dir}.")
    if as_json:
        typer.echo(json.dumps(report_to_json(built), indent=2, ensure_ascii=False))
    elif csv_dir is None:
        render(built, console)


# ---- kaeru events: what the router parked ------------------------------------------------------

events_app = typer.Typer(
    help="Events the router parked (Temporal refused them, or they failed too often).",
    no_args_is_help=True,
)
app.add_typer(events_app, name="events")

Seqs = Annotated[list[int], typer.Argument(help="seq of each parked event (`kaeru events parked`)")]


@events_app.command("parked")
def events_parked(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many, oldest first.")] = 100,
) -> None:
    """List the parked events, oldest first, with why the router gave up on each."""
    url, label = database_url_checked(load_settings())
    with database_problems(label):
        total, rows = parked_events(url, limit)
    if not rows:
        console.print("No event is parked: the router delivers everything it reads.")
        return
    for r in rows:
        # One line per event and one for its reason, never wrapped: reasons are long, and
        # operators copy seqs and messageIds from here.
        console.print(
            Text.assemble(
                (f"seq {r.seq}", "bold"),
                f"  customer {r.customer_id}  {r.event}  messageId {r.message_id}  "
                f"attempts {r.attempts}  parked {r.parked_at:%Y-%m-%d %H:%M:%S} UTC",
            ),
            soft_wrap=True,
        )
        console.print(Text(f"  reason: {r.reason or 'unknown'}"), soft_wrap=True)
    shown = f"{len(rows)} of {total}" if total > len(rows) else str(total)
    console.print(
        f"{shown} parked. `kaeru events retry SEQ...` sends them back into routing; "
        "`kaeru events drop SEQ...` drops them."
    )


def _parked_action(seqs: list[int], action: Callable[[str, list[int]], list[int]]) -> str:
    url, label = database_url_checked(load_settings())
    with database_problems(label):
        missing = action(url, seqs)
    if missing:
        fail(
            f"no parked event has seq {', '.join(map(str, missing))} (unknown, already routed "
            "or dropped); nothing was changed",
            "List the parked events with `kaeru events parked`.",
        )
    return ", ".join(map(str, seqs))


@events_app.command("retry")
def events_retry(seqs: Seqs) -> None:
    """Send parked events back into routing (their attempts start again at zero)."""
    done = _parked_action(seqs, retry_parked)
    console.print(f"Retrying {done}: the router delivers them within a moment.")


@events_app.command("drop")
def events_drop(seqs: Seqs) -> None:
    """Drop parked events: they are never routed, and kept in the database for the record."""
    done = _parked_action(seqs, drop_parked)
    console.print(f"Dropped {done}.")


# ---- kaeru customers: the shopper's rights (starter/privacy.py) -------------------------------

customers_app = typer.Typer(
    help="What is stored about a customer: export it, or erase it.", no_args_is_help=True
)
app.add_typer(customers_app, name="customers")

CustomerIdArg = Annotated[str, typer.Argument(help="the customer's id (userId or anonymousId)")]


@customers_app.command("export")
def customers_export(customer_id: CustomerIdArg) -> None:
    """Print everything stored about the customer as JSON (profile, consent and its history,
    events, messages, touchpoints, audiences, orders)."""
    settings = load_settings()
    _, label = database_url_checked(settings)
    with database_problems(label):
        found = export_customer(settings, customer_id)
    if found is None:
        fail(f"nothing is stored about customer {customer_id!r} in {label}")
    typer.echo(json.dumps(found, indent=2, ensure_ascii=False))


@customers_app.command("erase")
def customers_erase(
    customer_id: CustomerIdArg,
    yes: Annotated[bool, typer.Option("--yes", help="Erase without asking first.")] = False,
) -> None:
    """Erase the customer: end their journeys, take them out of every ad audience, delete
    their personal data (anonymous counts stay) and shred their payload key. Cannot be undone."""
    settings = load_settings()
    _, label = database_url_checked(settings)
    if not yes and not typer.confirm(
        f"Erase customer {customer_id!r} for good (journeys, audiences, data, payload key)?"
    ):
        fail("nothing was erased", "Pass --yes to erase without this question.")

    async def main() -> Any:
        client = await connected(settings)
        try:
            return await erase_customer(settings, client, customer_id)
        except RPCError as exc:
            raise StackError(
                f"Temporal refused to end a journey of the customer ({exc}); nothing was "
                "deleted: run the same command again"
            ) from exc

    with database_problems(label):
        report = run(main())
    rows = ", ".join(f"{table} {n}" for table, n in sorted(report.rows.items())) or "none"
    console.print(
        f"Erased: {report.journeys_ended} journey(s) ended, {report.audiences_left} audience "
        f"membership(s) left, {report.audiences_parked} removal(s) parked for the audience "
        f"sweeper, {report.keys_shredded} payload key(s) shredded; rows changed: {rows}."
    )
    if report.keys_shredded:
        console.print(
            f"Other kaeru processes stop reading their payloads within {KEY_CACHE_TTL:.0f} s."
        )


# ---- kaeru experiments: variants and holdouts (kaeru/experiments.py) --------------------------


@app.command()
def experiments(
    days: Annotated[
        int, typer.Option(min=1, help="Journeys entered in the last this many days.")
    ] = 30,
    promote: Annotated[
        bool,
        typer.Option(
            help="Apply the promotion rule now: record each significant winner (needs "
            "KAERU_EXPERIMENT_AUTO_PROMOTE=true)."
        ),
    ] = False,
) -> None:
    """Experiment and holdout results: recipients, conversion, revenue per recipient and the
    difference against the control with its 95 % interval, and each verdict."""
    settings = load_settings()
    if promote and not settings.experiment_auto_promote:
        fail(
            "--promote needs the promotion rule switched on",
            "Set KAERU_EXPERIMENT_AUTO_PROMOTE=true (in the environment or .env) and run again.",
        )
    url, label = database_url_checked(settings)
    now = datetime.now(UTC)
    period = Period(now - timedelta(days=days), now)
    with database_problems(label), db_session(url) as s:
        promoted = promote_winners(s, settings, period) if promote else []
        results = experiment_results(s, settings, period)
    if not results:
        console.print(f"No journey entered in the last {days} days.")
        return
    render_experiments(results, console)
    for row in promoted:
        console.print(f"Promoted {row.variant} in {row.journey_kind} {row.experiment} now.")


# ---- kaeru codec: the payload codec's master key (kaeru/codec.py) -------------------------------

codec_app = typer.Typer(help="The payload codec's keys.", no_args_is_help=True)
app.add_typer(codec_app, name="codec")


@codec_app.command("rotate")
def codec_rotate() -> None:
    """Rewrap every customer's data key with KAERU_CODEC_MASTER_KEY (the old one set as
    KAERU_CODEC_MASTER_KEY_PREVIOUS); then the previous key can be unset."""
    settings = load_settings()
    masters = master_keys(settings)
    if masters is None:
        fail(
            "KAERU_CODEC_MASTER_KEY is unset: the payload codec is off, there is nothing to rotate",
            "Set the new key as KAERU_CODEC_MASTER_KEY and the old one as "
            "KAERU_CODEC_MASTER_KEY_PREVIOUS, then run this again.",
        )
    url, label = database_url_checked(settings)
    try:
        with database_problems(label):
            done = key_store(url, masters).rotate()
    except CodecKeyError as exc:
        fail(str(exc))
    console.print(
        f"Rewrapped {done} data key(s) with the current master key (version "
        f"{masters.version}). Unset KAERU_CODEC_MASTER_KEY_PREVIOUS once every process runs "
        "with the new key."
    )


# ---- kaeru opens: machine opens (kaeru/machine_opens.py) ------------------------------------

opens_app = typer.Typer(
    help="Machine opens: the Apple Mail Privacy Protection ranges opens are judged by.",
    no_args_is_help=True,
)
app.add_typer(opens_app, name="opens")


@opens_app.command("refresh-ranges")
def opens_refresh_ranges(
    url: Annotated[
        str | None, typer.Option(help="Download from here (default KAERU_APPLE_RANGES_URL).")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(help="Read this local copy of Apple's CSV instead of downloading."),
    ] = None,
) -> None:
    """Replace the Apple egress ranges with Apple's current list, after checking every line.

    The list goes to KAERU_APPLE_RANGES_FILE (default: the starter list in the package), which
    the API reads at its next open; a bad download is refused and the old list kept.
    """
    settings = load_settings()
    target = settings.resolved_apple_ranges_file
    if file is not None and url is not None:
        fail("give --url or --file, not both", "--file reads a local copy; --url downloads.")
    if file is not None:
        source = str(file)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {file}: {exc}", "Give --file the path of Apple's CSV.")
    else:
        source = url or settings.apple_ranges_url
        try:
            answer = httpx.get(source, timeout=60.0, follow_redirects=True)
            answer.raise_for_status()
        except httpx.HTTPError as exc:
            fail(
                f"cannot download the ranges from {source}: {exc}; the old list is kept",
                "Check the address (--url or KAERU_APPLE_RANGES_URL) or download it yourself "
                "and pass --file PATH.",
            )
        text = answer.text
    try:
        ranges = write_ranges(text, target)
    except RangeFileError as exc:
        fail(
            f"{source} is not a list of address ranges: {exc}; the old list is kept",
            "Apple's file has lines 'prefix,country,region,city,' (see KAERU_APPLE_RANGES_URL).",
        )
    except OSError as exc:
        fail(
            f"cannot write {target}: {exc}; the old list is kept",
            "Set KAERU_APPLE_RANGES_FILE to a writable path (the API must read the same one).",
        )
    console.print(f"Wrote {ranges.networks} ranges from {source} to {target}.", soft_wrap=True)


# ---- kaeru suppressions: addresses kaeru never emails -------------------------------------------

suppressions_app = typer.Typer(
    help="The suppression list: addresses kaeru never emails (bounces, complaints, manual).",
    no_args_is_help=True,
)
app.add_typer(suppressions_app, name="suppressions")

#: Reasons an operator may give by hand (the others come from bounces and complaints).
MANUAL_REASONS = ("manual", "complaint", "hard_bounce")


def _address_or_fail(address: str) -> str:
    cleaned = normalise_address(address)
    if (problem := email_problem(cleaned)) is not None:
        fail(
            f"{address!r} is not an email address ({problem})", "Give one address: ann@example.com"
        )
    return cleaned


@suppressions_app.command("add")
def suppressions_add(
    email: Annotated[str, typer.Argument(help="The address never to email again.")],
    reason: Annotated[
        str, typer.Option(help=f"Why: one of {', '.join(MANUAL_REASONS)}.")
    ] = "manual",
) -> None:
    """Suppress an address: no journey emails it again (transactional messages neither)."""
    if reason not in MANUAL_REASONS:
        fail(f"--reason {reason!r} is not one of {', '.join(MANUAL_REASONS)}")
    address = _address_or_fail(email)
    url, label = database_url_checked(load_settings())
    with database_problems(label), db_write_session(url) as s:
        added = suppress(s, address, reason, "cli", "added with kaeru suppressions add")
    shown = mask_address(address)
    console.print(f"Suppressed {shown} ({reason})." if added else f"{shown} already is suppressed.")


@suppressions_app.command("remove")
def suppressions_remove(
    email: Annotated[str, typer.Argument(help="The address to email again.")],
) -> None:
    """Take an address off the list: only if the shopper asked for email again, or the address
    works again. Their marketing consent is not changed."""
    address = _address_or_fail(email)
    url, label = database_url_checked(load_settings())
    with database_problems(label), db_write_session(url) as s:
        row = suppression_of(s, address)
        if row is not None:
            s.delete(row)
    if row is None:
        fail(
            f"{mask_address(address)} is not on the suppression list; nothing was changed",
            "List it with `kaeru suppressions list`.",
        )
    console.print(f"Removed {mask_address(address)} from the suppression list ({row.reason}).")


@suppressions_app.command("list")
def suppressions_list(
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many, newest first.")] = 100,
) -> None:
    """List suppressed addresses (masked), newest first, with why and where from."""
    url, label = database_url_checked(load_settings())
    with database_problems(label), db_session(url) as s:
        total = s.exec(select(func.count()).select_from(Suppression)).one()
        rows = s.exec(
            select(Suppression).order_by(col(Suppression.created_at).desc()).limit(limit)
        ).all()
    if not rows:
        console.print("No address is suppressed.")
        return
    table = Table(box=None, header_style="bold")
    for column in ("address", "reason", "source", "since (UTC)"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            mask_address(row.email),
            row.reason,
            row.source or "-",
            f"{row.created_at:%Y-%m-%d %H:%M:%S}",
        )
    console.print(table)
    console.print(f"{len(rows)} of {total} shown." if total > len(rows) else f"{total} in all.")


# ---- kaeru touchpoints: offline touches (starter/touchpoints_import.py) -------------------------

touchpoints_app = typer.Typer(
    help="Touchpoints: offline ones (store purchases, visits, call-centre contacts) in.",
    no_args_is_help=True,
)
app.add_typer(touchpoints_app, name="touchpoints")

#: Problems shown of a bad file (the rest are counted).
SHOWN_PROBLEMS = 20


@touchpoints_app.command("import")
def touchpoints_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with a header: customer_id,kind,occurred_at,channel,order_id,value,"
            "currency,coupon_code,key (kind: purchase, visit or contact).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
) -> None:
    """Import store purchases, visits and call-centre contacts from a CSV file.

    Every row is checked first (one bad row imports nothing), and importing the same rows
    again stores nothing twice. Purchases are stored as Order Completed events, so they end
    journeys and count as conversions.
    """
    settings = load_settings()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        fail(f"{file} is not UTF-8 text", "Save the CSV as UTF-8 and import it again.")
    try:
        rows = read_rows(text, settings)
    except ImportFileError as exc:
        for problem in exc.problems[:SHOWN_PROBLEMS]:
            errors.print(Text(f"{file}:{problem}"), soft_wrap=True)
        more = len(exc.problems) - SHOWN_PROBLEMS
        fail(
            f"{file} has {len(exc.problems)} bad line(s)"
            + (f" ({more} more not shown)" if more > 0 else "")
            + ": nothing was imported",
            "Fix those lines and import the file again.",
        )
    _, label = database_url_checked(settings)
    with database_problems(label):
        done = import_rows(settings, rows)
    console.print(
        f"Imported {file}: {done.purchases} purchase(s) and {done.touches} visit(s) or "
        f"contact(s); {done.purchases_known + done.touches_known} already imported before.",
        soft_wrap=True,
    )
    if done.purchases:
        console.print(
            "The purchases reach their customers' journeys through the running API's router "
            "(kaeru api or kaeru dev).",
            soft_wrap=True,
        )


# ---- kaeru catalog / recommendations: the shop's pages (kaeru/catalog.py, recommendations.py)

catalog_app = typer.Typer(
    help="The catalogue: product names, prices, images and availability in.",
    no_args_is_help=True,
)
app.add_typer(catalog_app, name="catalog")


@catalog_app.command("import")
def catalog_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV with a header, or JSON (an array of objects, or JSON Lines): "
            "product_id,name,price,currency,image_url,url,available.",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
) -> None:
    """Import the shop's catalogue from a CSV or JSON file (an upsert by product_id).

    Every row is checked first (one bad row imports nothing); importing the same file again
    changes nothing. Products marked available=false are never recommended.
    """
    settings = load_settings()
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        fail(f"{file} is not UTF-8 text", "Save the file as UTF-8 and import it again.")
    json_file = file.suffix.lower() in {".json", ".jsonl", ".ndjson"}
    try:
        products = read_catalog(text, json_file=json_file)
    except CatalogFileError as exc:
        for problem in exc.problems[:SHOWN_PROBLEMS]:
            errors.print(Text(f"{file}:{problem}"), soft_wrap=True)
        more = len(exc.problems) - SHOWN_PROBLEMS
        fail(
            f"{file} has {len(exc.problems)} problem(s)"
            + (f" ({more} more not shown)" if more > 0 else "")
            + ": nothing was imported",
            "Fix them and import the file again.",
        )
    _, label = database_url_checked(settings)
    with database_problems(label), db_write_session(settings.resolved_database_url) as s:
        done = import_catalog(s, products)
    unavailable = sum(1 for p in products if p.get("available") is False)
    console.print(
        f"Imported {file}: {done} product(s), {unavailable} of them unavailable (never "
        "recommended).",
        soft_wrap=True,
    )


recommendations_app = typer.Typer(
    help="Recommendations for the shop's pages and emails (bought together, best-sellers).",
    no_args_is_help=True,
)
app.add_typer(recommendations_app, name="recommendations")


@recommendations_app.command("refresh")
def recommendations_refresh() -> None:
    """Recompute the recommendations from the orders now (the schedule does it every
    KAERU_RECOMMENDATIONS_REFRESH); readers see the old answers until it is done."""
    settings = load_settings()
    _, label = database_url_checked(settings)
    with database_problems(label):
        done = refresh_now(settings)
    console.print(
        f"Refreshed the recommendations from {done.orders} order(s): {done.pairs} "
        f"bought-together pair(s) (at least {settings.recommendations_min_support} orders "
        f"together and {settings.recommendations_min_confidence:.0%} confidence) and "
        f"{done.best_sellers} best-seller(s).",
        soft_wrap=True,
    )


# ---- the settings table of the README --------------------------------------------------------

#: What each setting without a description in kaeru/settings.py means.


def _spoken(seconds: int) -> str:
    """``seconds`` in the largest unit that holds it whole: 4 hours, 10 minutes, 3 days."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} s"


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
        return f"`{seconds}` ({_spoken(seconds)})"
    return f"`{value}`"


def settings_markdown() -> str:
    """Every setting as a Markdown table: variable, default, meaning; then each journey's
    (kaeru/journeys.py finds them), a variable that is also a global setting listed once."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    listed = set()
    for field, info in Settings.model_fields.items():
        meaning = info.description
        if meaning is None:
            raise RuntimeError(f"setting {field} has no description: add one to kaeru/settings.py")
        default = _default_text(info.get_default(call_default_factory=True))
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| `{env_name(field)}` | {default} | {meaning} |")
        listed.add(env_name(field))
    for journey in discover(load_settings().journey_modules):
        for item in setting_infos(journey):
            if item.variable in listed:
                continue
            meaning = item.description.replace("|", "\\|")
            lines.append(f"| `{item.variable}` | {_default_text(item.default)} | {meaning} |")
    return "\n".join(lines)


@app.command("settings-table")
def settings_table() -> None:
    """Print every KAERU_ setting as a Markdown table (for the README)."""
    typer.echo(settings_markdown())


# ---- the journey simulator (kaeru/dev/simulator.py) -----------------------------------------


@app.command("simulate")
def simulate(
    journey: Annotated[str, typer.Argument(help="the journey's kind, e.g. cart-abandonment")],
    timeline: Annotated[Path, typer.Argument(help="the customer's events (YAML or JSON)")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="where to save each email (HTML and text); default a new temp dir"
        ),
    ] = None,
) -> None:
    """Play a timeline of one customer's events against a journey on the time-skipping
    server (real activities, throwaway state) and print what the customer receives and when.
    """
    from kaeru.dev.simulator import simulate as run_simulation
    from kaeru.dev.timeline import TimelineError

    def say(text: str, markup: bool = False) -> None:
        # Never wrapped: a path or a subject must stay copyable.
        console.print(text, markup=markup, highlight=False, soft_wrap=True)

    try:
        result = asyncio.run(run_simulation(journey, timeline, out))
    except TimelineError as exc:
        errors.print(Text.assemble(("error: ", "bold red"), f"{timeline}: {exc}"), soft_wrap=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        fail(settings_problem(exc))
    except JourneyError as exc:
        fail(str(exc))
    say(f"[bold]{result.journey}[/bold] for the timeline {timeline}", markup=True)
    for line in result.played:
        say(f"  {line}")
    say("[bold]Emails the customer received[/bold]", markup=True)
    for message in result.messages:
        say(f"  {message.at:%a %Y-%m-%d %H:%M}  {message.step}: {message.subject}")
    if not result.messages:
        say("  none")
    if result.audience:  # only journeys that touch an ad audience have anything to say here
        say("[bold]Ad audiences[/bold]", markup=True)
        for line in result.audience:
            say(f"  {line}")
    ending = result.outcome or "still running when the simulation stopped"
    say(f"[bold]Journey ended:[/bold] {ending} (last step {result.last_step})", markup=True)
    say("[bold]Story[/bold]", markup=True)
    for line in result.story:
        say(f"  {line}")
    say(f"Emails saved in {result.out_dir}")


# ---- kaeru kill-switch, kaeru journeys pause|resume|cancel (kaeru/cli_hold.py) -----------------

from kaeru.cli_hold import journeys_app, kill_switch_app  # noqa: E402 - it imports this module

app.add_typer(kill_switch_app, name="kill-switch")
app.add_typer(journeys_app, name="journeys")

# ---- kaeru journeys list|show, customers show, audiences show, audit (kaeru/cli_read.py) ------

from kaeru.cli_read import (  # noqa: E402 - it imports this module
    audiences_app,
    audiences_show,
    audit_log,
    customers_show,
    journeys_list,
    journeys_show,
)

journeys_app.command("list")(journeys_list)
journeys_app.command("show")(journeys_show)
customers_app.command("show")(customers_show)
audiences_app.command("show")(audiences_show)
app.add_typer(audiences_app, name="audiences")
app.command("audit")(audit_log)

# ---- kaeru journeys impact, kaeru deploy-check (kaeru/cli_deploy.py) ---------------------------

from kaeru.cli_deploy import deploy_check  # noqa: E402 - it imports this module

app.command("deploy-check")(deploy_check)

# ---- kaeru operators, kaeru keys (kaeru/cli_credentials.py) -------------------------------------

from kaeru.cli_credentials import keys_app, operators_app  # noqa: E402 - it imports this module

app.add_typer(operators_app, name="operators")
app.add_typer(keys_app, name="keys")
