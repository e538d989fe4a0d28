"""A :class:`~kaeru.analytics.model.Report` as JSON, the one form `kaeru report --json`, the
dashboard and the weekly email read, and back (:func:`report_from_json`, for a stored one).

The JSON mirrors the dataclasses field by field: datetimes and dates as ISO 8601 strings,
tuples as lists, money as ``{"EUR": 1999}`` in minor units, rates as fractions or ``null``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import date, datetime
from typing import Any

from kaeru.analytics import model
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


def report_from_json(data: dict[str, Any]) -> Report:
    """The :class:`Report` that :func:`report_to_json` gave ``data`` (a stored report read back).

    Raises:
        ValueError: ``data`` is not such a report.
    """
    try:
        report = _typed(Report, data)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a report as report_to_json writes one ({exc!r})") from exc
    assert isinstance(report, Report)
    return report


def _typed(kind: Any, value: Any) -> Any:
    """``value`` (plain JSON) as ``kind``, a type of the report's fields."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _typed(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(kind) and isinstance(kind, type):
        hints = typing.get_type_hints(kind, vars(model))
        return kind(
            **{f.name: _typed(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)}
        )
    if origin is tuple:
        item = args[0]
        return tuple(_typed(item, v) for v in value)
    if origin is dict:
        return {str(k): _typed(args[1], v) for k, v in value.items()}
    if kind is datetime:
        return datetime.fromisoformat(value)
    if kind is date:
        return date.fromisoformat(value)
    if kind is float:
        return float(value)
    return value
