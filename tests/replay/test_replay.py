"""Stored histories of real journeys must replay on today's code.

A journey asleep for days resumes on whatever code is deployed then. If a change to a
workflow would make these histories diverge, guard it with ``workflow.patched()``; never
delete a history to make this pass. Record new ones with ``KAERU_RECORD_HISTORIES``
(docs/writing-a-journey.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from kaeru.journeys import registry
from kaeru.telemetry import Telemetry
from worker import PASSTHROUGH, workflows

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_histories_to_replay() -> None:
    assert len(HISTORIES) >= 3


def kinds_without_history(paths: list[Path]) -> set[str]:
    """The journey kinds in the registry that no history in ``paths`` is a run of (by the
    workflow type its first event names, not by its file name)."""
    recorded = set()
    for path in paths:
        first = WorkflowHistory.from_json(path.stem, path.read_text()).events[0]
        recorded.add(first.workflow_execution_started_event_attributes.workflow_type.name)
    # The registry has every journey discover() finds, switched on or off.
    return {route.kind for route in registry().routes if route.workflow_name not in recorded}


def test_every_journey_kind_has_a_stored_history() -> None:
    """A journey cannot land without a history of its own: it would go unchecked here."""
    missing = kinds_without_history(HISTORIES)
    assert not missing, (
        f"no stored history of {sorted(missing)}: record its main paths "
        "(docs/writing-a-journey.md, 'tests/replay/') into tests/replay/histories"
    )


def test_a_kind_without_a_history_is_named() -> None:
    """The check above can fail: without the price-drop histories it names that kind."""
    others = [p for p in HISTORIES if "@price-drop-" not in p.name]
    assert kinds_without_history(others) == {"price-drop"}


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays(path: Path) -> None:
    # Files are named <what>@<workflow id>.json: a journey's decisions may depend on its id.
    workflow_id = path.stem.partition("@")[2] or path.stem
    history = WorkflowHistory.from_json(workflow_id, path.read_text())
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    await replayer.replay_workflow(history)


async def test_histories_replay_with_tracing_on() -> None:
    """Temporal's tracing interceptor (kaeru/telemetry.py, on with an OTLP endpoint) adds no
    command: one history of each workflow type replays on a worker that traces (all of them
    would take half a minute; tests/e2e/test_traces.py replays a traced one)."""
    interceptor = Telemetry(TracerProvider()).interceptor()
    assert interceptor is not None
    replayer = Replayer(
        workflows=list(workflows()),
        interceptors=[interceptor],
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    one_of_each: dict[str, WorkflowHistory] = {}
    for path in HISTORIES:
        workflow_id = path.stem.partition("@")[2] or path.stem
        history = WorkflowHistory.from_json(workflow_id, path.read_text())
        started = history.events[0].workflow_execution_started_event_attributes
        one_of_each.setdefault(started.workflow_type.name, history)
    for history in one_of_each.values():
        await replayer.replay_workflow(history)


async def test_a_changed_workflow_is_caught(tmp_path: Path) -> None:
    """The replay check itself can fail: a history whose recorded step differs must not pass."""
    path = next(p for p in HISTORIES if "offer_redeemed" in p.stem)
    text = path.read_text().replace('"send_email"', '"send_sms"', 1)
    history = WorkflowHistory.from_json("tampered", text)
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is not None
