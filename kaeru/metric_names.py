"""kaeru's metric names (the worker's Prometheus endpoint, kaeru/worker_metrics.py).

Import-free on purpose: workflow code (workflows/kit.py) reads these names inside Temporal's
sandbox, which passes this module through (worker.py PASSTHROUGH) instead of pulling in the
settings and the SDK's runtime. The exporter appends ``_total`` to counters, so the names
below have none; durations are in seconds.

Every label value is bounded by the code (a journey kind, an outcome, a reason, a platform):
never a customer id, an address or anything else an event carries.
"""

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
