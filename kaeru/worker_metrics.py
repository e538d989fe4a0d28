"""The worker's Prometheus endpoint: Temporal core's exporter.

The Temporal SDK's core serves ``/metrics`` itself on ``KAERU_WORKER_METRICS_HOST:PORT``
(a :class:`~temporalio.runtime.Runtime` with a :class:`~temporalio.runtime.PrometheusConfig`):
its own metrics (schedule-to-start latency, sticky cache, task slots, polls) and the ones
kaeru records through ``workflow.metric_meter()`` (replay-safe: a replayed task counts
nothing) and ``activity.metric_meter()``; their names are in :mod:`kaeru.metric_names`
(re-exported here).
"""

from __future__ import annotations

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from kaeru.metric_names import (
    AD_API_CALLS,
    AD_API_ERRORS,
    JOURNEYS_ENDED,
    JOURNEYS_STARTED,
    MESSAGES_FAILED,
    MESSAGES_SENT,
    MESSAGES_SUPPRESSED,
)
from kaeru.settings import Settings

__all__ = [
    "AD_API_CALLS",
    "AD_API_ERRORS",
    "JOURNEYS_ENDED",
    "JOURNEYS_STARTED",
    "MESSAGES_FAILED",
    "MESSAGES_SENT",
    "MESSAGES_SUPPRESSED",
    "MetricsAddressInvalid",
    "MetricsPortTaken",
    "MetricsUnavailable",
    "worker_runtime",
]


class MetricsUnavailable(RuntimeError):
    """The worker's metrics endpoint could not bind its address."""


class MetricsPortTaken(MetricsUnavailable):
    """Another process holds the port (a second worker on this host): the worker runs on
    without its endpoint."""


class MetricsAddressInvalid(MetricsUnavailable):
    """``KAERU_WORKER_METRICS_HOST`` is no address of this host: a setting to fix."""


def worker_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime that serves the worker's metrics; None when
    ``KAERU_WORKER_METRICS_PORT`` is 0 (off). Give it to ``Client.connect(runtime=...)``: the
    worker uses its client's runtime. Create it once per process (it binds the port).

    Raises:
        MetricsPortTaken: the port is taken; the message names the setting.
        MetricsAddressInvalid: the host is no usable address; the message names the settings.
    """
    if not settings.worker_metrics_port:
        return None
    address = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
    config = PrometheusConfig(
        bind_address=address, counters_total_suffix=True, durations_as_seconds=True
    )
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=config))
    except (ValueError, RuntimeError, OSError) as exc:
        if "in use" not in str(exc).lower():
            raise MetricsAddressInvalid(
                f"cannot serve the worker's metrics on {address} ({exc}): set "
                "KAERU_WORKER_METRICS_HOST to an IP address of this host (127.0.0.1, or 0.0.0.0 "
                "for every interface), or KAERU_WORKER_METRICS_PORT=0 to turn the endpoint off"
            ) from exc
        raise MetricsPortTaken(
            f"cannot serve the worker's metrics on {address} ({exc}): another process holds "
            "the port (a second worker on this host?). Set KAERU_WORKER_METRICS_PORT to a free "
            "port (one per worker process), or to 0 to turn the endpoint off"
        ) from exc
