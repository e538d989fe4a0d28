"""``kaeru journeys impact`` and ``kaeru deploy-check`` on the dev server, against real cart
journeys asleep in their quiet wait (started by a real worker).

The candidate changes are tests/journeys/changed_cart.py: one more step before the quiet wait,
without a patch (it must fail, naming the journeys) and under ``workflow.patched()`` (it must
pass). The commands run in a thread, each with its own event loop as the ``kaeru`` process
would, while the worker runs on the test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from typer.testing import CliRunner, Result

from kaeru.cli import app
from kaeru.cli_deploy import NO_PATCH, spread
from kaeru.settings import Settings
from kaeru.telemetry import workflow_ref
from tests.conftest import make_settings
from tests.journeys.changed_cart import EXTRA_STEP, patched
from tests.support.cli import assert_clear_failure as assert_clear_failure_in
from tests.support.cli import clean_environment  # noqa: F401 - a fixture
from tests.support.codec import CodecEnv, codec_client, new_master_key
from tests.support.smtp import SMTPTestServer
from tests.workflows.conftest import SHOE, Shopper
from worker import activities_for, build_worker, worker_interceptors, workflow_runner
from workflows.cart_abandonment import CART_FROM_DATABASE

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
UNPATCHED = "tests.journeys.changed_cart:unpatched"
PATCHED = "tests.journeys.changed_cart:patched"
WITHOUT_CART = "tests.journeys.changed_cart:without_cart"


@pytest.fixture
async def smtp() -> AsyncIterator[SMTPTestServer]:
    async with SMTPTestServer() as server:
        yield server


@dataclass
class Stack:
    env: WorkflowEnvironment
    settings: Settings
    smtp: SMTPTestServer
    cli_env: dict[str, str]
    shoppers: list[Shopper] = field(default_factory=list)

    def shopper(self) -> Shopper:
        db = self.settings.resolved_database_url
        shopper = Shopper(self.env, db, self.smtp, self.settings.task_queue)
        self.shoppers.append(shopper)
        return shopper

    async def kaeru(self, *args: str) -> Result:
        env = {"COLUMNS": "250", **self.cli_env}
        return await asyncio.to_thread(runner.invoke, app, list(args), env=env)


@pytest.fixture
async def stack(
    dev_server_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> AsyncIterator[Stack]:
    """Settings of a task queue of the test's own (the commands look at that queue only)."""
    settings = make_settings(sqlite_url, smtp_port=smtp.port)
    address = dev_server_env.client.service_client.config.target_host
    cli_env = {
        "KAERU_DATABASE_URL": sqlite_url,
        "KAERU_TEMPORAL_ADDRESS": address,
        "KAERU_TASK_QUEUE": settings.task_queue,
    }
    stack = Stack(dev_server_env, settings, smtp, cli_env)
    yield stack
    for shopper in stack.shoppers:
        with contextlib.suppress(RPCError):
            await shopper.handle.terminate("test over")


@contextlib.asynccontextmanager
async def worker_running(stack: Stack, workflows: Callable[[], list[type]] | None = None) -> Any:
    """The real worker (``workflows``: another list of workflow classes, as a candidate's)."""
    async with httpx.AsyncClient() as http:
        if workflows is None:
            worker = build_worker(stack.env.client, stack.settings, http)
        else:
            worker = Worker(
                stack.env.client,
                task_queue=stack.settings.task_queue,
                workflows=workflows(),
                activities=activities_for(stack.settings, http),
                interceptors=worker_interceptors(stack.settings),
                workflow_runner=workflow_runner(),
            )
        async with worker:
            yield


async def until(check: Any, what: str) -> Any:
    """Poll ``check()`` (async) until it is truthy, for up to 10 s (visibility lags)."""
    for _ in range(100):
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


async def impact(stack: Stack, *args: str) -> dict[str, Any]:
    result = await stack.kaeru("journeys", "impact", "--json", *args)
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def groups(found: dict[str, Any]) -> dict[tuple[str, str, tuple[str, ...]], int]:
    return {(g["kind"], g["step"], tuple(g["patches"])): g["count"] for g in found["groups"]}


async def asleep(stack: Stack, count: int) -> None:
    """Until visibility shows ``count`` journeys in the cart's quiet wait."""

    async def shown() -> bool:
        found = groups(await impact(stack))
        return sum(n for (_, step, _), n in found.items() if step == "cart_quiet") == count

    await until(shown, f"{count} journeys asleep in the quiet wait")


def row(result: Result, kind: str) -> list[str]:
    """The summary table's row of ``kind``: running, replayed, failed."""
    [found] = [
        line.split()[1:] for line in result.stdout.splitlines() if line.split()[:1] == [kind]
    ]
    return found


def assert_clear_failure(result: Result, *phrases: str) -> None:
    assert_clear_failure_in(result, *phrases, stream="output")


async def test_deploy_check_passes_the_code_and_names_journeys_an_unpatched_change_breaks(
    stack: Stack,
) -> None:
    none = await stack.kaeru("deploy-check")
    assert none.exit_code == 0, none.output
    assert f"No journey is running on task queue {stack.settings.task_queue}" in none.stdout

    async with worker_running(stack):
        first, second = stack.shopper(), stack.shopper()
        for shopper in (first, second):
            await shopper.cart("Product Added", **SHOE)
            await shopper.wait_for_step("cart_quiet")
        await asleep(stack, 2)

    # The worker is gone: the histories come from the cluster, the code from here.
    ok = await stack.kaeru("deploy-check")
    assert ok.exit_code == 0, ok.output
    assert row(ok, "cart-abandonment") == ["2", "2", "0"], ok.stdout
    assert "All 2 sampled journey(s) replay on the local code." in ok.stdout

    broken = await stack.kaeru("deploy-check", "--workflows", UNPATCHED)
    assert broken.exit_code == 1, broken.output
    assert "Traceback" not in broken.output
    assert "2 of 2 sampled journey(s) do not replay on the local code" in broken.stdout
    for shopper in (first, second):
        # By default a CI log gets kind, digest and run id: no customer id in clear.
        assert shopper.journey_id not in broken.stdout
        assert shopper.customer_id not in broken.stdout
        named = f"{workflow_ref(shopper.journey_id, ['cart-abandonment'])} run "
        [line] = [x for x in broken.stdout.splitlines() if named in x]
        assert "(cart-abandonment)" in line and "TMPRL1100" in line, line
    assert "--show-ids names them in clear" in " ".join(broken.stdout.split())
    clear = await stack.kaeru("deploy-check", "--workflows", UNPATCHED, "--show-ids")
    assert clear.exit_code == 1, clear.output
    for shopper in (first, second):
        [line] = [x for x in clear.stdout.splitlines() if shopper.journey_id in x]
        assert "(cart-abandonment)" in line and "TMPRL1100" in line, line
    assert 'wrap the change in `if workflow.patched("<change-id>"):`' in " ".join(
        broken.stdout.split()
    )

    # As a process: the SDK's own warnings and tracebacks of each failed replay stay out.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kaeru",
        "deploy-check",
        "--workflows",
        UNPATCHED,
        env={**os.environ, **stack.cli_env, "PYTHONPATH": str(ROOT), "COLUMNS": "250"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 1, (out, err)
    text = (out + err).decode()
    assert first.journey_id not in text and second.journey_id not in text, text
    assert text.count(" run ") >= 2 and "cart-abandonment-sha256:" in text, text
    assert "Traceback" not in text and "WARN" not in text and "stack_trace" not in text, text

    removed = await stack.kaeru("deploy-check", "--workflows", WITHOUT_CART)
    assert removed.exit_code == 1, removed.output
    assert row(removed, "cart-abandonment") == ["2", "2", "2"], removed.stdout
    assert "Workflow class CartAbandonment is not registered" in removed.stdout, removed.stdout
    assert "The local code has no workflow class these journeys run" in " ".join(
        removed.stdout.split()
    )

    fixed = await stack.kaeru("deploy-check", "--workflows", PATCHED)
    assert fixed.exit_code == 0, fixed.output
    assert "All 2 sampled journey(s) replay on the local code." in fixed.stdout

    one = await stack.kaeru("deploy-check", "--sample", "1", "--kind", "cart-abandonment")
    assert one.exit_code == 0, one.output
    assert row(one, "cart-abandonment") == ["2", "1", "0"], one.stdout
    only_one = await stack.kaeru("deploy-check", "--sample", "1", "--workflows", UNPATCHED)
    assert only_one.exit_code == 1 and "1 of 1 sampled" in only_one.stdout, only_one.output

    other = await stack.kaeru("deploy-check", "--kind", "welcome")
    assert other.exit_code == 0 and "No journey is running" in other.stdout, other.output
    assert_clear_failure(
        await stack.kaeru("deploy-check", "--kind", "nope"), "there is no journey kind 'nope'"
    )
    assert_clear_failure(
        await stack.kaeru("deploy-check", "--workflows", "tests.journeys.changed_cart"),
        "is not MODULE:ATTR",
        "worker:workflows",
    )
    assert_clear_failure(
        await stack.kaeru("deploy-check", "--workflows", "no_such_module:x"), "cannot be loaded"
    )
    assert_clear_failure(
        await stack.kaeru("deploy-check", "--workflows", "tests.journeys.changed_cart:EXTRA_STEP"),
        "is not a list of workflow classes",
    )


async def test_impact_counts_journeys_per_kind_step_and_patches_seen(stack: Stack) -> None:
    empty = await impact(stack)
    assert (empty["running"], empty["groups"]) == (0, [])

    # Today's code: a cart event that carries the stored cart takes the cart-from-database
    # patch; one without it takes no patch before the quiet wait.
    async with worker_running(stack):
        plain, stored = stack.shopper(), stack.shopper()
        await plain.cart("Product Added", **SHOE)
        await stored.cart("Product Added", **SHOE, cart=[{**SHOE, "quantity": 1}])
        for shopper in (plain, stored):
            await shopper.wait_for_step("cart_quiet")
        await asleep(stack, 2)
    between = datetime.now(UTC)
    # A candidate's: the extra step under its patch.
    async with worker_running(stack, patched):
        candidate = stack.shopper()
        await candidate.cart("Product Added", **SHOE)
        await candidate.wait_for_step("cart_quiet")
        await asleep(stack, 3)

    found = await impact(stack)
    assert (found["running"], found["counted"], found["capped"]) == (3, 3, False)
    assert groups(found) == {
        ("cart-abandonment", "cart_quiet", ()): 1,
        ("cart-abandonment", "cart_quiet", (CART_FROM_DATABASE,)): 1,
        ("cart-abandonment", "cart_quiet", (EXTRA_STEP,)): 1,
    }
    assert groups(await impact(stack, "--kind", "cart-abandonment")) == groups(found)
    assert groups(await impact(stack, "--kind", "welcome")) == {}

    # Which journeys started before the candidate's deploy (they may lack its patch).
    before = await impact(stack, "--started-before", between.isoformat())
    assert groups(before) == {
        ("cart-abandonment", "cart_quiet", ()): 1,
        ("cart-abandonment", "cart_quiet", (CART_FROM_DATABASE,)): 1,
    }
    assert (await impact(stack, "--started-before", "2000-01-01"))["running"] == 0
    assert_clear_failure(
        await stack.kaeru("journeys", "impact", "--started-before", "last week"),
        "is not a date and time",
        "ISO 8601",
    )

    table = await stack.kaeru("journeys", "impact")
    assert table.exit_code == 0, table.output
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["cart-abandonment", "cart_quiet", *NO_PATCH.split(), "1"] in rows, table.stdout
    assert ["cart-abandonment", "cart_quiet", CART_FROM_DATABASE, "1"] in rows, table.stdout
    assert f"3 running on task queue {stack.settings.task_queue}." in table.stdout

    capped = await stack.kaeru("journeys", "impact", "--limit", "1")
    assert capped.exit_code == 0, capped.output
    assert "Counted the first 1 of 3 only" in " ".join(capped.stdout.split())
    assert (await impact(stack, "--limit", "2"))["capped"] is True
    assert_clear_failure(
        await stack.kaeru("journeys", "impact", "--kind", "nope"), "there is no journey kind"
    )

    # Rolling back to today's code would break the journey the candidate started, only it.
    back = await stack.kaeru("deploy-check")
    assert back.exit_code == 1, back.output
    assert "1 of 3 sampled journey(s) do not replay" in back.stdout
    assert workflow_ref(candidate.journey_id, ["cart-abandonment"]) in back.stdout
    for other in (plain, stored):
        assert workflow_ref(other.journey_id, ["cart-abandonment"]) not in back.stdout
    forward = await stack.kaeru("deploy-check", "--workflows", PATCHED)
    assert forward.exit_code == 0, forward.output


async def test_deploy_check_decodes_histories_with_the_workers_codec(
    dev_server_env: WorkflowEnvironment, sqlite_url: str, smtp: SMTPTestServer
) -> None:
    """With ``KAERU_CODEC_MASTER_KEY``, histories hold encrypted payloads: the check replays
    them with the codec the worker uses, and cannot without the key."""
    key = new_master_key()
    settings = make_settings(sqlite_url, smtp_port=smtp.port, codec_master_key=key)
    client = codec_client(dev_server_env.client, settings)
    env = cast(WorkflowEnvironment, CodecEnv(dev_server_env, client))
    stack = Stack(
        env,
        settings,
        smtp,
        {
            "KAERU_DATABASE_URL": sqlite_url,
            "KAERU_TEMPORAL_ADDRESS": dev_server_env.client.service_client.config.target_host,
            "KAERU_TASK_QUEUE": settings.task_queue,
            "KAERU_CODEC_MASTER_KEY": key,
        },
    )
    try:
        async with worker_running(stack):
            shopper = stack.shopper()
            await shopper.cart("Product Added", **SHOE)
            await shopper.wait_for_step("cart_quiet")
            await asleep(stack, 1)
        ok = await stack.kaeru("deploy-check")
        assert ok.exit_code == 0, ok.output
        assert "All 1 sampled journey(s) replay on the local code." in ok.stdout

        del stack.cli_env["KAERU_CODEC_MASTER_KEY"]
        without = await stack.kaeru("deploy-check")
        assert without.exit_code == 1, without.output
        named = workflow_ref(shopper.journey_id, ["cart-abandonment"])
        [line] = [x for x in without.stdout.splitlines() if named in x]
        assert "Unknown payload encoding binary/encrypted" in line and "File " not in line, line
        assert "run the check with the worker's KAERU_CODEC_MASTER_KEY" in " ".join(
            without.stdout.split()
        )
        assert "workflow.patched" not in without.stdout
    finally:
        for one in stack.shoppers:
            with contextlib.suppress(RPCError):
                await one.handle.terminate("test over")


def test_without_temporal_both_commands_say_which_setting_to_check(sqlite_url: str) -> None:
    env = {"KAERU_DATABASE_URL": sqlite_url, "KAERU_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    for args in (["journeys", "impact"], ["deploy-check"]):
        result = runner.invoke(app, args, env={"COLUMNS": "250", **env})
        assert_clear_failure(
            result, "cannot reach Temporal at 127.0.0.1:1", "KAERU_TEMPORAL_ADDRESS"
        )


def test_the_sample_takes_every_step_before_a_second_of_any() -> None:
    newest_first = [("cart_quiet", 1), ("cart_quiet", 2), ("cart_quiet", 3), ("ad_audience", 4)]
    newest_first += [("offer_email", 5), ("ad_audience", 6)]
    assert spread(newest_first, 3, lambda j: j[0]) == [
        ("cart_quiet", 1),
        ("ad_audience", 4),
        ("offer_email", 5),
    ]
    assert [n for _, n in spread(newest_first, 5, lambda j: j[0])] == [1, 4, 5, 2, 6]
    assert len(spread(newest_first, 99, lambda j: j[0])) == 6
    assert spread([], 3, lambda j: j) == []


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('the candidate is half written')\n", "RuntimeError"),
    ],
)
def test_a_workflows_module_that_does_not_import_is_one_line(
    source: str, error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"candidate_{error.lower()}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = runner.invoke(app, ["deploy-check", "--workflows", f"{name}:workflows"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert f"--workflows '{name}:workflows' cannot be loaded" in line, result.stderr
    assert f"importing {name} raised {error}" in line, result.stderr
