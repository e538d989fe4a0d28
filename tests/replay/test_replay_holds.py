"""The hold paths (kaeru/holds.py) have stored histories, which tests/replay replays.

A change to how ``Journey.call`` holds and releases a step must keep them replaying (or go
under a new ``workflow.patched`` id): journeys may be held for days when it deploys.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from worker import PASSTHROUGH, workflows

HISTORIES_DIR = Path(__file__).parent / "histories"
HOLDS = sorted(HISTORIES_DIR.glob("*-holds-*.json"))


def test_the_hold_paths_are_stored() -> None:
    texts = {p.name: p.read_text() for p in HOLDS}
    held = [n for n, t in texts.items() if '"KillSwitchHeld"' in t]
    paused = [n for n, t in texts.items() if '"signalName": "pause"' in t]
    released = [n for n, t in texts.items() if '"signalName": "resume"' in t]
    assert len(held) >= 3, "a step the kill switch held, and tried again"
    assert paused and released, "an operator's pause and resume"


def with_a_signal_after(text: str, after: int, name: str, payload: dict[str, object]) -> str:
    """The history ``text`` with a ``name`` signal inserted after event ``after``: the events
    behind it (and every event id that points at one) move one on."""
    history = json.loads(text)

    def shift(node: object) -> object:
        if isinstance(node, dict):
            return {
                k: (
                    str(int(v) + 1)
                    if (k == "eventId" or k.endswith("EventId"))
                    and isinstance(v, str)
                    and v.isdigit()
                    and int(v) > after
                    else shift(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [shift(v) for v in node]
        return node

    events = [shift(e) for e in history["events"]]
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    signal = {
        "eventId": str(after + 1),
        "eventTime": history["events"][after - 1]["eventTime"],
        "eventType": "EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED",
        "workflowExecutionSignaledEventAttributes": {
            "signalName": name,
            "input": {
                "payloads": [
                    {
                        "metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                        "data": data,
                    }
                ]
            },
        },
    }
    history["events"] = [*events[:after], signal, *events[after:]]
    return json.dumps(history)


async def test_a_pause_an_old_worker_received_replays_to_nothing() -> None:
    """A journey from before holds that got a ``pause`` (an operator paused it while a worker
    of the previous version ran it: that code had no such signal and did nothing) replays on
    today's code without a command for it."""
    path = HISTORIES_DIR / "2026-11-v1-not_opened@cart-abandonment-c-2a298836.json"
    text = path.read_text()
    assert "hold-before-outside-steps" not in text
    fired = next(
        int(e["eventId"])
        for e in json.loads(text)["events"]
        if e["eventType"] == "EVENT_TYPE_TIMER_FIRED"
    )
    paused = with_a_signal_after(text, fired, "pause", {"reason": "checking", "actor": "cli:ann"})
    replayer = Replayer(
        workflows=list(workflows()),
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
        ),
    )
    workflow_id = path.stem.partition("@")[2]
    result = await replayer.replay_workflow(
        WorkflowHistory.from_json(workflow_id, paused), raise_on_replay_failure=False
    )
    assert result.replay_failure is None, result.replay_failure
