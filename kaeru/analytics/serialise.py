"""A :class:`~kaeru.analytics.model.Report` as JSON, the one form `kaeru report --json`, the
dashboard and the weekly email read.

The JSON mirrors the dataclasses field by field: datetimes and dates as ISO 8601 strings,
tuples as lists, money as ``{"EUR": 1999}`` in minor units, rates as fractions or ``null``.
"""

from __future__ import annotations

import dataclasses
from datetime import date, datetime
from typing import Any

from kaeru.analytics.model import Report


def report_to_json(report: Report) -> dict[str, Any]:
    """``report`` as a JSON-ready dict (``json.dumps`` needs nothing more)."""
    data = _plain(report)
    assert isinstance(data, dict)
    return data


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value
