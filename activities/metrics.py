"""kaeru's counters in the worker, recorded through ``activity.metric_meter()``.

They reach the worker's Prometheus endpoint (kaeru/metric_names.py has the names). Labels
are bounded by the code: the journey's kind (from its workflow id, by the registry), a reason
or a platform; never an id or an address.
"""

from __future__ import annotations

from temporalio import activity

from kaeru.journeys import kind_of_workflow_id

#: The ``kind`` of a message no journey sent (the operators' report), or of an unknown kind.
NO_KIND = "other"


def kind_of(journey_id: str) -> str:
    """The journey kind of ``journey_id`` for a label: ``other`` when it is no journey."""
    return kind_of_workflow_id(journey_id) or NO_KIND


def count(name: str, description: str, **labels: str) -> None:
    """Add one to the worker's counter ``name`` with ``labels``; nothing outside an activity
    (a CLI command calling the same code)."""
    if not activity.in_activity():
        return
    counter = activity.metric_meter().create_counter(name, description)
    counter.add(1, labels)
