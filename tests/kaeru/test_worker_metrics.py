"""The worker's metrics endpoint: its settings, and a taken port told on one line."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kaeru.settings import Settings
from kaeru.worker_metrics import MetricsPortTaken, worker_runtime
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
    with pytest.raises(MetricsPortTaken, match="KAERU_WORKER_METRICS_HOST"):
        worker_runtime(make_settings("sqlite://", worker_metrics_host="metrics.internal"))


def test_kaeru_worker_on_a_taken_port_fails_on_one_line(held_port: int, tmp_path: Path) -> None:
    result = kaeru(
        "worker",
        KAERU_WORKER_METRICS_PORT=str(held_port),
        KAERU_DATABASE_URL=f"sqlite:///{tmp_path / 'kaeru.db'}",
    )
    assert_clear_failure(result, "KAERU_WORKER_METRICS_PORT", f"127.0.0.1:{held_port}")
