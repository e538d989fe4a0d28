"""The worker's metrics endpoint: its settings; a taken port is a warning (the worker runs on
without it, a second worker on the host keeps running), a host that is no address an error."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kaeru.settings import Settings
from kaeru.worker_metrics import MetricsAddressInvalid, MetricsPortTaken, worker_runtime
from tests.conftest import make_settings
from tests.kaeru.test_cli import assert_clear_failure, kaeru


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another server holds."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


def test_port_zero_or_empty_turns_the_endpoint_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_runtime(make_settings("sqlite://", worker_metrics_port=0)) is None
    monkeypatch.setenv("KAERU_WORKER_METRICS_PORT", "")
    assert Settings(_env_file=None).worker_metrics_port == 0
    monkeypatch.delenv("KAERU_WORKER_METRICS_PORT")
    defaults = Settings(_env_file=None)
    assert (defaults.worker_metrics_host, defaults.worker_metrics_port) == ("127.0.0.1", 9464)


def test_the_runtime_serves_prometheus_text() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    runtime = worker_runtime(make_settings("sqlite://", worker_metrics_port=port))
    assert runtime is not None
    runtime.metric_meter.create_counter("kaeru_test_probe").add(1, {"kind": "cart"})
    scraped = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'kaeru_test_probe_total{kind="cart"' in scraped  # the exporter adds _total


def test_a_taken_port_names_the_setting(held_port: int) -> None:
    with pytest.raises(MetricsPortTaken, match="KAERU_WORKER_METRICS_PORT") as taken:
        worker_runtime(make_settings("sqlite://", worker_metrics_port=held_port))
    assert f"127.0.0.1:{held_port}" in str(taken.value)
    with pytest.raises(MetricsAddressInvalid, match="KAERU_WORKER_METRICS_HOST"):
        worker_runtime(make_settings("sqlite://", worker_metrics_host="metrics.internal"))


def test_kaeru_worker_on_a_taken_port_warns_and_runs_on(
    held_port: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second worker on the host: its metrics are off, it goes on to connect to Temporal (here
    unreachable, so that is where it stops, past the metrics)."""
    caplog.set_level(logging.WARNING, logger="kaeru.worker")
    result = kaeru(
        "worker",
        KAERU_WORKER_METRICS_PORT=str(held_port),
        KAERU_TEMPORAL_ADDRESS="127.0.0.1:1",
        KAERU_DATABASE_URL=f"sqlite:///{tmp_path / 'kaeru.db'}",
    )
    [warning] = [r for r in caplog.records if r.name == "kaeru.worker"]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert "metrics are off for this process" in message
    assert "KAERU_WORKER_METRICS_PORT" in message and f"127.0.0.1:{held_port}" in message
    assert_clear_failure(result, "127.0.0.1:1")
    assert "cannot serve the worker's metrics" not in result.stderr


def test_kaeru_worker_on_a_bad_host_fails_on_one_line(tmp_path: Path) -> None:
    result = kaeru(
        "worker",
        KAERU_WORKER_METRICS_HOST="metrics.internal",
        KAERU_TEMPORAL_ADDRESS="127.0.0.1:1",
        KAERU_DATABASE_URL=f"sqlite:///{tmp_path / 'kaeru.db'}",
    )
    assert_clear_failure(result, "KAERU_WORKER_METRICS_HOST", "metrics.internal")


def test_workflow_code_takes_the_names_from_an_import_free_module() -> None:
    """workflows/kit.py runs in Temporal's sandbox: it reads the metric names from
    kaeru/metric_names.py (passed through, imports nothing), not kaeru/worker_metrics.py (the
    settings, the SDK's runtime)."""
    import ast
    import subprocess
    import sys

    import kaeru.metric_names
    from worker import PASSTHROUGH

    tree = ast.parse(Path(kaeru.metric_names.__file__).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert "kaeru.metric_names" in PASSTHROUGH and "kaeru.worker_metrics" not in PASSTHROUGH
    probe = "import sys, workflows.kit; print('kaeru.worker_metrics' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True
    )
    assert found.stdout.strip() == "False", found.stderr
