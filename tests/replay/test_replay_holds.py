"""The hold paths (kaeru/holds.py) have stored histories, which tests/replay replays.

A change to how ``Journey.call`` holds and releases a step must keep them replaying (or go
under a new ``workflow.patched`` id): journeys may be held for days when it deploys.
"""

from __future__ import annotations

from pathlib import Path

HOLDS = sorted((Path(__file__).parent / "histories").glob("*-holds-*.json"))


def test_the_hold_paths_are_stored() -> None:
    texts = {p.name: p.read_text() for p in HOLDS}
    held = [n for n, t in texts.items() if '"KillSwitchHeld"' in t]
    paused = [n for n, t in texts.items() if '"signalName": "pause"' in t]
    released = [n for n, t in texts.items() if '"signalName": "resume"' in t]
    assert len(held) >= 3, "a step the kill switch held, and tried again"
    assert paused and released, "an operator's pause and resume"
