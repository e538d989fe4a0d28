"""``kaeru journeys impact`` and ``kaeru deploy-check``: change live journeys safely.

A journey asleep for weeks wakes up on whatever code is deployed then, and replays its history
on it: a change to the steps it has already taken must be wrapped in ``workflow.patched()``
(docs/versioning.md). ``impact`` says how many journeys a change would meet, at which step and
on which code version (the patches each has seen, from the ``TemporalChangeVersion`` search
attribute that Temporal's SDK core writes for every ``workflow.patched()`` id); ``deploy-check``
downloads a sample of their histories and replays them on the local code, so an incompatible
change fails in CI instead of in the journeys.

Both look at the workflows running on ``KAERU_TASK_QUEUE``: what this deployment's workers run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import Progress
from rich.table import Table
from temporalio.client import Client, WorkflowExecution, WorkflowHistory
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError
from temporalio.worker import Replayer

from kaeru.cli import connected, console, fail, load_settings, run
from kaeru.cli_hold import journeys_app, say
from kaeru.journeys import load_registry
from kaeru.search_attributes import STEP
from kaeru.settings import Settings
from kaeru.telemetry import scrub_workflow_ids, workflow_ref
from kaeru.temporal import converter

T = TypeVar("T")

#: The search attribute Temporal's SDK core upserts with every ``workflow.patched()`` id a
#: workflow has seen (a keyword list; a workflow that has seen none has none).
CHANGE_VERSION = "TemporalChangeVersion"
#: What ``impact`` shows for a journey that has seen no patch yet.
NO_PATCH = "(no patch)"
#: How many running workflows ``impact`` lists at most by default (``--limit``).
IMPACT_LIMIT = 10_000
#: What ``deploy-check`` says to do about a journey that does not replay, by what its failure
#: says (the first that matches; the last matches any).
FIX_HINTS = (
    (
        "TMPRL1100",
        "The local code takes a different step than these journeys already took: wrap the "
        'change in `if workflow.patched("<change-id>"):` (keeping the old path in the else '
        "branch) so running journeys keep their path and new ones take the new one "
        "(docs/versioning.md).",
    ),
    (
        "is not registered",
        "The local code has no workflow class these journeys run: keep the class (switch the "
        "journey off with KAERU_<KIND>_ENABLED=false instead) until `kaeru journeys impact` "
        "shows none of them running.",
    ),
    (
        "payload encoding",
        "The histories' payloads are encrypted: run the check with the worker's "
        "KAERU_CODEC_MASTER_KEY (and KAERU_CODEC_MASTER_KEY_PREVIOUS while keys rotate).",
    ),
    (
        "",
        "The journey's history cannot be replayed on the local code: replay it with "
        "`kaeru deploy-check --kind <kind>` after a fix, or see docs/versioning.md.",
    ),
)
#: A message inside the SDK core's rendering of a failure (``message: "..."``).
_MESSAGE = re.compile(r'message: "((?:[^"\\]|\\.)*)"')


def _reason(failure: Exception) -> str:
    """What a failed replay says, in one line: the messages of a failure and its causes,
    without the stack traces the SDK core renders beside them."""
    text = str(failure)
    messages = [m.strip("'") for m in _MESSAGE.findall(text)]
    line = ": ".join(messages) if messages else text.strip().split("\n")[0]
    return line or type(failure).__name__


def _hint(reason: str) -> str:
    return next(hint for marker, hint in FIX_HINTS if marker in reason)


KindOption = Annotated[
    str | None,
    typer.Option("--kind", help="One journey kind (e.g. cart-abandonment); without it, all."),
]


def _running_on(settings: Settings) -> str:
    return f'TaskQueue = "{settings.task_queue}" AND ExecutionStatus = "Running"'


def _workflow_name(cls: type) -> str:
    definition = getattr(cls, "__temporal_workflow_definition", None)
    if definition is None:
        fail(f"{cls.__qualname__} is not a workflow class (it has no @workflow.defn)")
    return str(definition.name)


def _kinds(settings: Settings, classes: Sequence[type] = ()) -> dict[str, str]:
    """Workflow type → what to call it: a journey's kind, else the workflow type itself."""
    names = {name: name for name in map(_workflow_name, classes)}
    names.update({r.workflow_name: r.kind for r in load_registry(settings).routes})
    return names


def _type_of(kind: str, kinds: dict[str, str]) -> str:
    """The workflow type of ``kind`` (a journey kind, or a workflow type name)."""
    for workflow_type, name in kinds.items():
        if kind in (name, workflow_type):
            return workflow_type
    journey_kinds = sorted(set(kinds.values()))
    fail(f"there is no journey kind {kind!r}", f"Give one of: {', '.join(journey_kinds)}.")


def _steer(coro: Any) -> Any:
    try:
        return run(coro)
    except RPCError as err:
        fail(f"Temporal refused: {err.message}", "Check KAERU_TEMPORAL_ADDRESS and try again.")


# ---- kaeru journeys impact -------------------------------------------------------------------


@dataclass(frozen=True)
class Impact:
    """The running journeys, grouped; ``counted`` < ``running`` when the listing was capped."""

    running: int
    counted: int
    groups: Counter[tuple[str, str, tuple[str, ...]]]


def _version_of(execution: WorkflowExecution) -> tuple[str, ...]:
    seen = execution.search_attributes.get(CHANGE_VERSION) or []
    return tuple(sorted(str(patch) for patch in seen))


async def _impact(settings: Settings, query: str, kinds: dict[str, str], limit: int) -> Impact:
    """Count the running workflows by kind, step and patches seen.

    The visibility store groups by ``ExecutionStatus`` only (the dev server's, and SQL ones),
    and the patch sets are not known in advance (one count query per kind, step and version
    would have to guess them), so the workflows are listed and counted here: one page of a
    thousand per request, at most ``limit``; ``count_workflows`` gives the exact total.
    """
    client = await connected(settings)
    running = (await client.count_workflows(query)).count
    groups: Counter[tuple[str, str, tuple[str, ...]]] = Counter()
    counted = 0
    async for execution in client.list_workflows(query, limit=limit):
        kind = kinds.get(execution.workflow_type, execution.workflow_type)
        step = execution.typed_search_attributes.get(STEP) or "-"
        groups[(kind, step, _version_of(execution))] += 1
        counted += 1
    return Impact(max(running, counted), counted, groups)


def _started_before(value: str) -> str:
    """``StartTime < ...`` for visibility, from an ISO 8601 date and time (UTC unless it
    says otherwise)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(
            f"--started-before {value!r} is not a date and time",
            "Give it in ISO 8601, e.g. 2026-11-30T12:00:00Z (the deploy that added a patch).",
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stamp = moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return f' AND StartTime < "{stamp}"'


def journeys_impact(
    kind: KindOption = None,
    started_before: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN",
            help="Only journeys whose run started before WHEN (ISO 8601, UTC by default): "
            "none left from before a patch's deploy means its old path can go.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")] = False,
    limit: Annotated[
        int, typer.Option(min=1, help="List at most this many running journeys.")
    ] = IMPACT_LIMIT,
) -> None:
    """How many journeys are running, per kind, current step and code version (the
    workflow.patched() ids each has seen): what a deploy would meet."""
    settings = load_settings()
    kinds = _kinds(settings)
    query = _running_on(settings)
    if kind is not None:
        query += f' AND WorkflowType = "{_type_of(kind, kinds)}"'
    if started_before is not None:
        query += _started_before(started_before)
    impact: Impact = _steer(_impact(settings, query, kinds, limit))
    rows = sorted(impact.groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2]))
    capped = impact.counted < impact.running
    if as_json:
        print(
            json.dumps(
                {
                    "task_queue": settings.task_queue,
                    "running": impact.running,
                    "counted": impact.counted,
                    "capped": capped,
                    "groups": [
                        {"kind": k, "step": step, "patches": list(version), "count": count}
                        for (k, step, version), count in rows
                    ],
                },
                indent=2,
            )
        )
        return
    if not rows:
        say(f"No journey is running on task queue {settings.task_queue}.")
        return
    table = Table(box=None, header_style="bold")
    table.add_column("kind")
    table.add_column("step")
    table.add_column("code version (patches seen)")
    table.add_column("journeys", justify="right")
    for (k, step, version), count in rows:
        table.add_row(k, step, ", ".join(version) or NO_PATCH, str(count))
    console.print(table)
    say(f"{impact.running} running on task queue {settings.task_queue}.")
    if capped:
        say(
            f"Counted the first {impact.counted} of {impact.running} only: the table is a "
            f"sample. Count them all with --limit {impact.running}."
        )


# ---- kaeru deploy-check ----------------------------------------------------------------------


def _workflows_from(ref: str | None) -> list[type]:
    """The workflow classes to replay against: ``MODULE:ATTR`` (a list of classes, or a
    function returning one), else the worker's."""
    if ref is None:
        from worker import workflows

        return list(workflows())
    module_name, _, attr = ref.partition(":")
    fix = "Give --workflows MODULE:ATTR, a list of workflow classes, e.g. worker:workflows."
    if not module_name or not attr:
        fail(f"--workflows {ref!r} is not MODULE:ATTR", fix)
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        fail(f"--workflows {ref!r} cannot be loaded ({exc})", fix)
    except Exception as exc:  # the module itself is broken: a SyntaxError, or its code raised
        fail(
            f"--workflows {ref!r} cannot be loaded: importing {module_name} raised "
            f"{type(exc).__name__}: {exc}",
            "Fix that module (python -c 'import MODULE' shows the traceback), then run again.",
        )
    if callable(value) and not isinstance(value, type):
        value = value()
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, type) for c in value):
        fail(f"--workflows {ref!r} is not a list of workflow classes", fix)
    for cls in value:
        _workflow_name(cls)
    return list(value)


@contextlib.contextmanager
def _sdk_quiet() -> Iterator[None]:
    """Keep the SDK's own report of each failed replay (a warning, a traceback) out of the
    output: the failure is what the command prints, once per journey."""
    sdk = logging.getLogger("temporalio")
    level = sdk.level
    sdk.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        sdk.setLevel(level)


def _quiet_runtime() -> Runtime:
    """A runtime whose core logs errors only: its warning for each failed replay is not news."""
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    return Runtime(telemetry=TelemetryConfig(logging=LoggingConfig(filter=quiet)))


@dataclass(frozen=True)
class Replayed:
    """One kind's sample: how many run, how many were replayed, which failed and why."""

    kind: str
    running: int
    sampled: int
    #: Workflow id → why it does not replay.
    failures: dict[str, str]
    #: Workflow id → the run that was replayed (of each failure).
    run_ids: dict[str, str] = field(default_factory=dict)


#: ``deploy-check`` looks at up to this many times ``--sample`` running journeys of a kind to
#: choose its sample from (visibility only: no history is downloaded for them).
SPREAD = 10


def spread(items: Sequence[T], sample: int, key: Callable[[T], Hashable]) -> list[T]:
    """Up to ``sample`` of ``items``, taken in turn from each group of equal ``key`` (in the
    order the groups first appear), so every group is in the sample before any has two."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    chosen: list[T] = []
    depth = 0
    while len(chosen) < sample and any(depth < len(g) for g in groups.values()):
        chosen.extend(g[depth] for g in groups.values() if depth < len(g))
        depth += 1
    del chosen[sample:]
    return chosen


def _where(execution: WorkflowExecution) -> tuple[str, tuple[str, ...]]:
    return execution.typed_search_attributes.get(STEP) or "-", _version_of(execution)


async def _sample(client: Client, query: str, sample: int) -> tuple[int, list[WorkflowExecution]]:
    """How many run, and up to ``sample`` of them spread over their steps and code versions:
    visibility lists the newest first, which are mostly at their first step, and a change
    breaks the journeys that already went past it."""
    running = (await client.count_workflows(query)).count
    found = [e async for e in client.list_workflows(query, limit=sample * SPREAD)]
    return max(running, len(found)), spread(found, sample, _where)


async def _check(
    settings: Settings, classes: list[type], kind: str | None, sample: int
) -> list[Replayed]:
    from worker import worker_interceptors, workflow_runner

    client = await connected(settings)
    kinds = _kinds(settings, classes)
    base = _running_on(settings)
    types = [_type_of(kind, kinds)] if kind else sorted(set(kinds))
    samples: dict[str, tuple[int, list[WorkflowExecution]]] = {}
    for workflow_type in types:
        samples[workflow_type] = await _sample(
            client, f'{base} AND WorkflowType = "{workflow_type}"', sample
        )
    if kind is None:  # running workflows of a type the local code lacks fail their replay too
        known = ", ".join(f'"{t}"' for t in types)
        _, others = await _sample(client, f"{base} AND WorkflowType NOT IN ({known})", sample)
        for execution in others:
            samples.setdefault(execution.workflow_type, (0, []))[1].append(execution)
    wanted = [e for _, found in samples.values() for e in found]
    histories: list[WorkflowHistory] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("downloading histories", total=len(wanted))
        for execution in wanted:
            handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
            histories.append(await handle.fetch_history())
            progress.advance(task)
    replayer = Replayer(
        workflows=classes,
        workflow_runner=workflow_runner(),
        interceptors=worker_interceptors(settings),
        namespace=settings.temporal_namespace,
        data_converter=converter(settings),
        runtime=_quiet_runtime(),
    )
    failures: dict[str, str] = {}
    if histories:

        async def each() -> AsyncIterator[WorkflowHistory]:
            for history in histories:
                yield history

        with _sdk_quiet():
            async with replayer.workflow_replay_iterator(each()) as results:
                async for result in results:
                    if result.replay_failure is not None:
                        failures[result.history.workflow_id] = _reason(result.replay_failure)
    return [
        Replayed(
            kind=kinds.get(workflow_type, workflow_type),
            running=max(running, len(found)),
            sampled=len(found),
            failures={e.id: failures[e.id] for e in found if e.id in failures},
            run_ids={e.id: e.run_id or "" for e in found if e.id in failures},
        )
        for workflow_type, (running, found) in sorted(samples.items())
        if running or found
    ]


def _journey_name(replayed: Replayed, workflow_id: str, show_ids: bool) -> str:
    """How ``deploy-check`` names a journey that fails: its workflow id in clear with
    ``--show-ids``; else its kind, :func:`~kaeru.telemetry.key_ref` of the id and the run id
    (the id is ``<kind>-<customer id>`` and CI logs are read widely)."""
    if show_ids:
        return workflow_id
    run_id = replayed.run_ids.get(workflow_id, "")
    return f"{workflow_ref(workflow_id, [replayed.kind])} run {run_id}".rstrip()


def deploy_check(
    sample: Annotated[
        int, typer.Option(min=1, help="Replay at most this many running journeys of each kind.")
    ] = 20,
    kind: KindOption = None,
    workflows_ref: Annotated[
        str | None,
        typer.Option(
            "--workflows",
            metavar="MODULE:ATTR",
            help="Replay against these workflow classes (a list, or a function returning one) "
            "instead of the worker's, e.g. a candidate change.",
        ),
    ] = None,
    show_ids: Annotated[
        bool,
        typer.Option(
            "--show-ids",
            help="Name the journeys that fail by workflow id in clear (<kind>-<customer id>); "
            "by default by kind, a digest of the id and the run id, fit for a CI log.",
        ),
    ] = False,
) -> None:
    """Replay a sample of the running journeys' histories (downloaded from Temporal) on the
    local code: exit 1 naming each journey the code would break, before it is deployed."""
    settings = load_settings()
    classes = _workflows_from(workflows_ref)
    checked: list[Replayed] = _steer(_check(settings, classes, kind, sample))
    if not checked:
        say(
            f"No journey is running on task queue {settings.task_queue}: nothing to replay, "
            "nothing a deploy could break."
        )
        return
    table = Table(box=None, header_style="bold")
    for column in ("kind", "running", "replayed", "failed"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for one in checked:
        table.add_row(one.kind, str(one.running), str(one.sampled), str(len(one.failures)))
    console.print(table)
    failed = [
        (
            one.kind,
            _journey_name(one, journey, show_ids),
            why if show_ids else scrub_workflow_ids(why, [one.kind]),
        )
        for one in checked
        for journey, why in one.failures.items()
    ]
    replayed = sum(one.sampled for one in checked)
    if not failed:
        say(f"All {replayed} sampled journey(s) replay on the local code.")
        return
    say(f"{len(failed)} of {replayed} sampled journey(s) do not replay on the local code:")
    for k, journey, why in failed:
        say(f"  {journey} ({k}): {why}")
    if not show_ids:
        say(
            "Journeys are named by kind, a digest of the workflow id and the run id (the run "
            "id finds one in the Temporal UI); --show-ids names them in clear."
        )
    for hint in dict.fromkeys(_hint(why) for _, _, why in failed):
        say(hint)
    raise typer.Exit(1)


journeys_app.command("impact")(journeys_impact)
