"""Pausing a Temporal Schedule as an operator does, in tests."""

from __future__ import annotations

import asyncio
import time

from temporalio.client import ScheduleHandle
from temporalio.service import RPCError, RPCStatusCode


async def pause(handle: ScheduleHandle, note: str) -> None:
    """Pause the schedule and wait until a describe shows it paused.

    The server applies a pause to the schedule's own state a moment after it answers; a
    worker starting in between reads the state before the pause. An operator's pause is one
    that has taken effect, so the tests that check a worker keeps it wait for that.
    """
    await handle.pause(note=note)
    deadline = time.monotonic() + 10
    while not (await handle.describe()).schedule.state.paused:
        assert time.monotonic() < deadline, "the schedule did not show the pause within 10 s"
        await asyncio.sleep(0.05)


async def exists(handle: ScheduleHandle) -> bool:
    """Whether the schedule exists, read from the schedule itself.

    ``list_schedules`` reads Temporal's visibility store, which follows a create or a delete
    a moment later; a describe answers from the schedule, so it cannot lag behind.
    """
    try:
        await handle.describe()
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True
