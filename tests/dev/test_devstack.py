"""The embedded stack's parts: the dev-server launcher for real, the ports, the plan."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from temporalio.client import Client, WorkflowExecutionStatus

from kaeru.dev.crowd import STORIES, spent
from kaeru.dev.demo import DEMO_WAITS, with_demo_waits
from kaeru.dev.devstack import TemporalDevServer, print_urls
from kaeru.dev.plan import plan_dev
from kaeru.journeys import registry
from kaeru.serving import DEV_WRITE_KEY, StackError, listening_socket
from kaeru.settings import Settings
from kaeru.temporal import missing_search_attributes
from workflows.cart_abandonment import CartAbandonment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped yet counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


async def test_dev_server_registers_search_attributes_and_keeps_history(tmp_path: Path) -> None:
    port, ui_port = free_port(), free_port()
    db_file = tmp_path / "temporal.db"
    workflow_id = f"devstack-probe-{uuid.uuid4().hex[:8]}"

    async with TemporalDevServer(db_file=db_file, port=port, ui_port=ui_port) as server:
        first_pid = server.pid
        client = await Client.connect(server.address)
        assert await missing_search_attributes(client, "default") == []
        # A workflow can be started by type name with no worker: it simply waits.
        await client.start_workflow(
            "DevstackProbe", id=workflow_id, task_queue=f"probe-{uuid.uuid4().hex[:8]}"
        )
        async with httpx.AsyncClient() as http:
            ui = await http.get(f"http://127.0.0.1:{ui_port}/", timeout=10)
        assert ui.status_code == 200
    assert first_pid is not None and gone(first_pid)
    assert server.returncode() is not None

    async with TemporalDevServer(db_file=db_file, port=port, ui_port=None) as again:
        client = await Client.connect(again.address)
        described = await client.get_workflow_handle(workflow_id).describe()
        assert described.status == WorkflowExecutionStatus.RUNNING
        assert await missing_search_attributes(client, "default") == []
        second_pid = again.pid
    assert second_pid is not None and gone(second_pid)


async def test_dev_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    taken = listening_socket("127.0.0.1", 0, what="test", fix="-")
    port = taken.getsockname()[1]
    server = TemporalDevServer(db_file=tmp_path / "t.db", port=port, ui_port=None)
    try:
        with pytest.raises(StackError, match="exited with code"):
            await server.start(timeout=30)
    finally:
        taken.close()
    assert server.returncode() is not None


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
async def test_dev_server_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from kaeru.dev.devstack import TemporalDevServer

        async def main():
            server = TemporalDevServer(
                db_file=Path({str(tmp_path / "t.db")!r}), port={free_port()}, ui_port=None
            )
            await server.start()
            print(server.pid, flush=True)
            await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parents[2],
        text=True,
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), 60)
        child = int(line)
        assert not gone(child)
        parent.send_signal(signal.SIGKILL)  # no cleanup code runs
        parent.wait()
        deadline = time.monotonic() + 15
        while not gone(child) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert gone(child), "the dev server outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


def test_a_port_in_use_names_the_setting_to_change() -> None:
    taken = listening_socket("127.0.0.1", 0, what="test", fix="-")
    port = taken.getsockname()[1]
    try:
        with pytest.raises(StackError) as caught:
            listening_socket(
                "127.0.0.1", port, what="the API", fix="set KAERU_API_PORT to a free port"
            )
    finally:
        taken.close()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "in use" in message
    assert "KAERU_API_PORT" in message


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_dev_starts_what_is_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)

    plan = plan_dev(settings(api_port=8123))

    assert plan.temporal and plan.mail_catcher and plan.dev_write_key
    assert plan.settings.temporal_address == "127.0.0.1:7233"
    assert plan.settings.smtp_host == "127.0.0.1"
    assert plan.settings.write_key is not None
    assert plan.settings.write_key.get_secret_value() == DEV_WRITE_KEY
    assert plan.dev_operator_token and plan.settings.operator_token is not None
    assert len(plan.settings.operator_token.get_secret_value()) >= 16
    assert plan.settings.public_url == "http://localhost:8123"
    assert plan.inbox_url == "http://localhost:8025"


def test_dev_prints_the_keys_and_the_admin_token_but_no_database_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)
    plan = plan_dev(
        settings(
            browser_write_key="public-browser-key",
            database_url="postgresql+psycopg://kaeru:db-password-0@db.internal/kaeru",
        )
    )
    console = Console(record=True, width=200)

    print_urls(console, plan)

    shown = console.export_text()
    assert plan.settings.operator_token is not None
    assert f"Admin token  {plan.settings.operator_token.get_secret_value()}" in shown
    assert "KAERU_OPERATOR_TOKEN is unset" in shown
    assert f"Dashboard    {plan.api_url}/dashboard   (sign in with the admin token)" in shown
    assert f"Write key    {DEV_WRITE_KEY}" in shown
    assert "Browser key  public-browser-key" in shown
    assert "db-password-0" not in shown and "db.internal" in shown
    again = plan_dev(settings())
    assert again.settings.operator_token != plan.settings.operator_token  # one per run


def test_dev_uses_what_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)

    plan = plan_dev(
        settings(
            temporal_address="temporal.internal:7233",
            smtp_host="smtp.example",
            smtp_port=587,
            smtp_starttls=True,
            write_key="k",
            public_url="https://t.example",
        )
    )

    assert not plan.temporal and not plan.mail_catcher and not plan.dev_write_key
    assert plan.settings.temporal_address == "temporal.internal:7233"
    assert (plan.settings.smtp_host, plan.settings.smtp_port) == ("smtp.example", 587)
    assert plan.settings.smtp_starttls
    assert plan.settings.public_url == "https://t.example"
    assert plan.inbox_url is None and plan.temporal_ui_url is None


def test_demo_waits_leave_what_the_person_set_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for variable in DEMO_WAITS:  # with_demo_waits sets them: set here so they are undone
        monkeypatch.setenv(variable, "1")
        monkeypatch.delenv(variable)
    monkeypatch.setenv("KAERU_CART_OFFER_WAIT", "PT10M")
    (tmp_path / ".env").write_text("KAERU_CART_AD_DELAY=PT3M\nKAERU_CAP_PER_WEEK=7\n")
    demo = with_demo_waits(settings(cap_per_week=7))
    cart = registry().route("cart-abandonment").journey_settings
    entry = registry().route("cart-abandonment").entry
    registry.cache_clear()

    assert cart.offer_wait == 600 and cart.ad_delay == 180  # the environment, .env
    assert cart.email_delay == float(DEMO_WAITS["KAERU_CART_EMAIL_DELAY"]) == 10
    assert cart.ad_click_wait == float(DEMO_WAITS["KAERU_CART_AD_CLICK_WAIT"])
    assert entry.experiments == ["cart_subject"]  # the demo runs the cart subject experiment
    # The send gate: no quiet hours and a day's cap a demo never reaches, but what was set.
    assert demo.quiet_start == demo.quiet_end and demo.cap_per_day == 100
    assert demo.cap_per_week == 7


@pytest.mark.journeys("*")  # every journey on, as a shop runs them
async def test_dev_demo_plays_a_whole_journey_then_stops_cleanly(tmp_path: Path) -> None:
    """`kaeru dev --demo` end to end, against a dev server on free ports (7233 may be taken)."""
    async with TemporalDevServer(db_file=tmp_path / "t.db", port=free_port(), ui_port=None) as t:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAERU_")}
        env |= {
            "KAERU_TEMPORAL_ADDRESS": t.address,
            "KAERU_STATE_DIR": str(tmp_path / "state"),
            "KAERU_API_PORT": str(free_port()),
            "KAERU_SMTP_PORT": str(free_port()),
            "KAERU_MAIL_CATCHER_PORT": str(free_port()),
            "KAERU_TASK_QUEUE": f"kaeru-demo-{uuid.uuid4().hex[:8]}",
        }
        dev = subprocess.Popen(
            [sys.executable, "-c", "from kaeru.cli import app; app()", "dev", "--demo"],
            cwd=Path(__file__).parents[2],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        try:
            assert dev.stdout is not None
            deadline = time.monotonic() + 120
            while not any("another shopper: kaeru demo" in line for line in lines):
                assert time.monotonic() < deadline, "the demo took over two minutes:\n" + "".join(
                    lines
                )
                line = await asyncio.wait_for(asyncio.to_thread(dev.stdout.readline), 120)
                assert line, "kaeru dev exited:\n" + "".join(lines)
                lines.append(line)
            inbox = f"http://127.0.0.1:{env['KAERU_MAIL_CATCHER_PORT']}/api/messages"
            async with httpx.AsyncClient() as http:
                received = (await http.get(inbox)).json()
                [report_mail] = [m for m in received if "operators@" in m["to"]]
                report_mail = (await http.get(f"{inbox}/{report_mail['id']}")).json()
            dev.send_signal(signal.SIGINT)
            rest, _ = await asyncio.to_thread(dev.communicate, timeout=30)
        finally:
            dev.kill()
        output = "".join(lines) + rest

    assert "the cart journey ended: purchased" in output, output
    # What the shopper received, in the mail catcher: one email of each of these, in order.
    customer = re.search(r"customer (demo-[0-9a-f]+)", output)
    assert customer is not None, output
    mine = [
        (m["journey"], m["step"])
        for m in reversed(received)  # the mail catcher lists newest first
        if m["journey"] and m["journey"].endswith(customer.group(1))
    ]
    who = customer.group(1)
    assert mine == [
        (f"welcome-{who}", "welcome_email"),
        (f"cart-abandonment-{who}", "cart_email"),
        (f"cart-abandonment-{who}", "offer_email"),
        (f"order-confirmation-{who}", "confirmation_email"),
    ], mine
    # ...and the narration says so, with a link to each in the inbox.
    assert re.search(r"welcome email: 'Welcome to .+'\n +http://\S+/m/", output), output
    assert re.search(r"coupon email with KAERU-\S+\n +http://\S+/m/", output)
    assert re.search(
        rf"order confirmation for order {who}-order: 'Your order {who}-order .+'\n +http://\S+/m/",
        output,
    )
    assert "the browse journey ended without an email" in output
    assert "the first order ended the welcome series" in output
    assert "post-purchase follow-up journey: it asks for a review in 7 days" in output
    assert "win-back journey: it sends a we-miss-you email if no order comes in 60 days" in output
    # Each with its journey (a UI link; here, with no UI, its workflow id).
    assert f"workflow post-purchase-{who} in your Temporal UI" in output
    assert f"workflow win-back-{who} in your Temporal UI" in output
    # The narration and the journey's story read as a person would say them.
    assert (
        "sent the cart email to the shopper" in output and "the shopper opened the cart" in output
    )
    assert "the cart went quiet with 2 items" in output
    leaks = [
        line
        for line in output.splitlines()
        if re.search(r"\w_email|\(s\)|last step|'carted'|outcome", line)
    ]
    assert leaks == [], leaks
    assert dev.returncode == 0, output
    assert "kaeru stopped." in output and "Traceback" not in output
    _the_crowd_is_on_the_report(env, output, report_mail["text"])


def _the_crowd_is_on_the_report(env: dict[str, str], output: str, emailed: str) -> None:
    """The demo's crowd leaves the history a newcomer's dashboard shows: `kaeru report` of the
    stack's database credits exactly the orders that came after an open (the crowd's and the
    demo shopper's), shows the store purchases and both arms of the experiment; the
    operators' report email says the same revenue."""
    assert re.search(r"meanwhile 8 other shoppers left carts: .+\n +http://\S+/dashboard", output)
    assert re.search(
        r"the operators' weekly report .+: 'Kaeru Shop report .+'\n +http://\S+/m/", output
    )
    bought = re.search(r"order demo-[0-9a-f]+-order, (\d+)\.(\d\d) USD", output)
    assert bought is not None, output
    report = subprocess.run(
        [sys.executable, "-c", "from kaeru.cli import app; app()", "report", "--since", "1d"]
        + ["--json"],
        cwd=Path(__file__).parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(report.stdout)
    cart = data["kpis"][CartAbandonment.kind]["current"]
    after_an_open = [story for story in STORIES if story.opens and story.buys]
    assert cart["conversions"] == len(after_an_open) + 1
    demo_order = int(bought.group(1)) * 100 + int(bought.group(2))
    assert cart["revenue"] == {"USD": sum(spent(story) for story in after_an_open) + demo_order}
    assert cart["entered"] == len(STORIES) + 1
    assert cart["human_opens"] == sum(story.opens for story in STORIES) + 1
    steps = {step for route in data["routes"] for step in route["steps"]}
    assert "purchase (pos)" in steps, steps
    [experiment] = [e for e in data["experiments"] if e["experiment"] == "cart_subject"]
    assert sum(arm["recipients"] for arm in experiment["variants"]) == len(STORIES) + 1
    assert all(arm["recipients"] for arm in experiment["variants"]), experiment  # both arms
    opens = sum(sum(hours) for hours in data["heatmap"]["opens"])
    assert opens == cart["human_opens"]
    recovered = cart["revenue"]["USD"]
    assert f"{recovered // 100}.{recovered % 100:02d} USD" in emailed, emailed


def _dev_env(tmp_path: Path, temporal_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAERU_")}
    return env | {
        "KAERU_TEMPORAL_PORT": str(temporal_port),
        "KAERU_TEMPORAL_UI_PORT": str(free_port()),
        "KAERU_STATE_DIR": str(tmp_path / "state"),
        "KAERU_API_PORT": str(free_port()),
        "KAERU_SMTP_PORT": str(free_port()),
        "KAERU_MAIL_CATCHER_PORT": str(free_port()),
    }


async def test_a_second_stack_runs_beside_the_first_on_its_own_temporal_port(
    tmp_path: Path,
) -> None:
    """KAERU_TEMPORAL_PORT moves `kaeru dev`'s Temporal server; a taken one names the setting."""
    async with TemporalDevServer(db_file=tmp_path / "t.db", port=free_port(), ui_port=None) as t:
        command = [sys.executable, "-c", "from kaeru.cli import app; app()", "dev"]
        cwd = Path(__file__).parents[2]
        taken = subprocess.run(
            command,
            cwd=cwd,
            env=_dev_env(tmp_path / "one", t.port),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert taken.returncode != 0
        assert f"127.0.0.1:{t.port}" in taken.stdout + taken.stderr
        assert "KAERU_TEMPORAL_PORT" in taken.stdout + taken.stderr

        port = free_port()
        second = subprocess.Popen(
            command,
            cwd=cwd,
            env=_dev_env(tmp_path / "two", port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        try:
            assert second.stdout is not None
            while not any("Send an event" in line for line in lines):
                line = await asyncio.wait_for(asyncio.to_thread(second.stdout.readline), 90)
                assert line, "kaeru dev exited:\n" + "".join(lines)
                lines.append(line)
            client = await Client.connect(f"127.0.0.1:{port}")
            assert await missing_search_attributes(client, "default") == []
            second.send_signal(signal.SIGINT)
            rest, _ = await asyncio.to_thread(second.communicate, timeout=30)
        finally:
            second.kill()
    output = "".join(lines) + rest
    assert f"127.0.0.1:{port}" in output, output
    assert second.returncode == 0, output
