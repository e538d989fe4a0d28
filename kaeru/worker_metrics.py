"""The worker's Prometheus endpoint: Temporal core's exporter, and kaeru's metric names.

The Temporal SDK's core serves ``/metrics`` itself on ``KAERU_WORKER_METRICS_HOST:PORT``
(a :class:`~temporalio.runtime.Runtime` with a :class:`~temporalio.runtime.PrometheusConfig`):
its own metrics (schedule-to-start latency, sticky cache, task slots, polls) and the ones
kaeru records through ``workflow.metric_meter()`` (replay-safe: a replayed task counts
nothing) and ``activity.metric_meter()``. The exporter appends ``_total`` to counters, so the
names below have none; durations are in seconds.

Every label value is bounded by the code (a journey kind, an outcome, a reason, a platform):
never a customer id, an address or anything else an event carries.
"""

from __future__ import annotations

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from kaeru.settings import Settings

#: Journeys that began (a new journey, not a continue-as-new of a long one), by ``kind``.
JOURNEYS_STARTED = "kaeru_journeys_started"
#: Journeys that ended, by ``kind`` and ``outcome`` (purchased, not_opened, holdout, ...).
JOURNEYS_ENDED = "kaeru_journeys_ended"
#: Messages handed to the SMTP relay, by ``kind``.
MESSAGES_SENT = "kaeru_messages_sent"
#: Send attempts that failed, by ``kind`` and ``reason`` (bounced, unconfirmed, error).
MESSAGES_FAILED = "kaeru_messages_failed"
#: Messages not sent on purpose, by ``kind`` and ``reason`` (not_consented, topic, ...).
MESSAGES_SUPPRESSED = "kaeru_messages_suppressed"
#: Calls to an ad platform's API, by ``platform`` (meta, google).
AD_API_CALLS = "kaeru_ad_api_calls"
#: Ad API calls that failed (no answer, or an error answer), by ``platform``.
AD_API_ERRORS = "kaeru_ad_api_errors"


class MetricsPortTaken(RuntimeError):
    """The worker's metrics endpoint could not bind its address (taken, or not an address)."""


def worker_runtime(settings: Settings) -> Runtime | None:
    """A Temporal runtime that serves the worker's metrics; None when
    ``KAERU_WORKER_METRICS_PORT`` is 0 (off). Give it to ``Client.connect(runtime=...)``: the
    worker uses its client's runtime. Create it once per process (it binds the port).

    Raises:
        MetricsPortTaken: the address is taken or unusable; the message names the settings.
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
            raise MetricsPortTaken(
                f"cannot serve the worker's metrics on {address} ({exc}): set "
                "KAERU_WORKER_METRICS_HOST to an IP address of this host (127.0.0.1, or 0.0.0.0 "
                "for every interface), or KAERU_WORKER_METRICS_PORT=0 to turn the endpoint off"
            ) from exc
        raise MetricsPortTaken(
            f"cannot serve the worker's metrics on {address} ({exc}): another process holds "
            "the port (a second worker on this host?). Set KAERU_WORKER_METRICS_PORT to a free "
            "port (one per worker process), or to 0 to turn the endpoint off"
        ) from exc
