"""Timelines for ``kaeru simulate``: one customer's scripted events, read from YAML or JSON.

A timeline names the customer, a ``start`` and the events in time order; each event has an
``at`` (ISO 8601, a weekday and time in ``start``'s week, or ``+2h``/``+1d`` after the previous
line) and one action: ``track`` (with ``properties``), ``identify`` (the traits), ``open`` or
``click`` (the email of a step; ``link``: which link, 0 for the first), ``ad_click``. An
optional ``shop_orders`` lists other shoppers' orders (``Order Completed`` properties), stored
a day before ``start``: the shop's history that best-sellers and "bought together" read.
Anything else is refused with the line it is on and the fix.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

#: Keys a timeline may have, and those of each of its events.
TIMELINE_KEYS = ("customer", "start", "events", "shop_orders")
CUSTOMER_KEYS = ("id", "email", "name")
ACTIONS = ("track", "identify", "open", "click", "ad_click")
EVENT_KEYS = ("at", *ACTIONS, "properties", "link")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_RELATIVE = re.compile(r"^\+\s*((?:\d+(?:\.\d+)?\s*[wdhms]\s*)+)$")
_RELATIVE_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])")
_UNIT = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_WEEKDAY_TIME = re.compile(r"^([a-z]+)\s+(\d{1,2}):(\d{2})$")


class TimelineError(Exception):
    """A timeline the simulator cannot play; the message names the line and the fix."""


@dataclass(frozen=True)
class Customer:
    id: str
    email: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Step:
    """One line of the timeline: what the customer does (``action``) and when."""

    line: int
    at: datetime
    action: str
    #: The event name (track), the email's step (open/click), or "" (identify, ad_click).
    target: str
    values: dict[str, Any]
    link: int = 0


@dataclass(frozen=True)
class Timeline:
    customer: Customer
    #: The line of ``customer`` (the simulator stores the customer's identify first).
    customer_line: int
    start: datetime
    steps: list[Step]
    #: Other shoppers' orders before ``start`` (line, ``Order Completed`` properties): the
    #: shop's history that best-sellers and "bought together" read.
    shop_orders: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def _lines(node: yaml.Node | None) -> dict[str, int]:
    """The line (1-based) of each key of a mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value): key.start_mark.line + 1 for key, _ in node.value}


def aware(value: datetime) -> datetime:
    """``value`` in UTC; a time written without a zone is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _absolute(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return aware(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return aware(datetime.fromisoformat(value.strip()))
    return None


def parse_time(value: Any, start: datetime, previous: datetime) -> datetime | None:
    """``value`` as a time: ISO 8601, ``Monday 10:00`` (in ``start``'s week) or ``+1d2h``
    (after ``previous``). None: not a time in any of those forms."""
    if (absolute := _absolute(value)) is not None:
        return absolute
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if match := _RELATIVE.match(text):
        seconds = sum(float(n) * _UNIT[unit] for n, unit in _RELATIVE_PART.findall(match.group(1)))
        return previous + timedelta(seconds=seconds)
    if (match := _WEEKDAY_TIME.match(text)) and match.group(1) in WEEKDAYS:
        hour, minute = int(match.group(2)), int(match.group(3))
        if hour > 23 or minute > 59:
            return None
        monday = (start - timedelta(days=start.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        day = monday + timedelta(days=WEEKDAYS.index(match.group(1)))
        return day.replace(hour=hour, minute=minute)
    return None


TIME_FORMS = (
    "an ISO 8601 time (2026-03-02T10:00:00Z), a weekday and time in start's week "
    "(Monday 10:00) or a delay after the previous line (+2h, +1d, +1d6h, +30m)"
)


def _unknown_keys(
    found: dict[str, Any], allowed: tuple[str, ...], where: str, lines: dict[str, int], line: int
) -> None:
    """Refuse a key not in ``allowed``, naming the line it is on (``lines``; else ``line``)."""
    unknown = [str(key) for key in found if key not in allowed]
    if unknown:
        raise TimelineError(
            f"line {lines.get(unknown[0], line)}: unknown key {unknown[0]!r} in {where}; "
            f"the keys are {', '.join(allowed)}"
        )


def load_timeline(path: Path) -> Timeline:
    """Read a YAML or JSON timeline.

    Raises:
        TimelineError: the file is missing, not YAML/JSON, or breaks the format; the message
            names the line and the fix.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TimelineError(f"cannot read the timeline {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TimelineError(f"the timeline {path} is not UTF-8 text") from exc
    data, root = _parse(text, path)
    if not isinstance(data, dict):
        raise TimelineError(
            "line 1: a timeline is a mapping with the keys customer, start and events"
        )
    top = _lines(root)
    _unknown_keys(data, TIMELINE_KEYS, "the timeline", top, 1)
    customer = _customer(data.get("customer"), top.get("customer", 1))
    start_line = top.get("start", 1)
    start = _absolute(data.get("start"))
    if start is None:
        raise TimelineError(
            f"line {start_line}: start must be an ISO 8601 time, e.g. start: 2026-03-02T10:00:00Z"
        )
    events = data.get("events")
    if not isinstance(events, list) or not events:
        raise TimelineError(
            f"line {top.get('events', 1)}: events must be a list of at least one event "
            "(- at: Monday 10:00, track: Product Added)"
        )
    nodes = _value(root, "events")
    items = nodes.value if isinstance(nodes, yaml.SequenceNode) else []
    steps: list[Step] = []
    previous = start
    for index, raw in enumerate(events):
        node = items[index] if index < len(items) else None
        step = _step(raw, node, start, previous)
        steps.append(step)
        previous = step.at
    return Timeline(
        customer=customer,
        customer_line=top.get("customer", 1),
        start=start,
        steps=steps,
        shop_orders=_shop_orders(data.get("shop_orders", []), _value(root, "shop_orders")),
    )


def _shop_orders(raw: Any, node: yaml.Node | None) -> list[tuple[int, dict[str, Any]]]:
    """``shop_orders``: a list of ``Order Completed`` properties, each with its line."""
    line = node.start_mark.line + 1 if node is not None else 1
    if not isinstance(raw, list) or not all(isinstance(order, dict) for order in raw):
        raise TimelineError(
            f"line {line}: shop_orders must be a list of other shoppers' orders, e.g. "
            "- {order_id: o1, total: 20, products: [{product_id: belt-1, name: Belt, price: 20}]}"
        )
    items = node.value if isinstance(node, yaml.SequenceNode) else []
    return [
        (items[n].start_mark.line + 1 if n < len(items) else line, order)
        for n, order in enumerate(raw)
    ]


def _parse(text: str, path: Path) -> tuple[Any, yaml.Node | None]:
    """The timeline's data, and its YAML node tree for line numbers (None if unavailable)."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TimelineError(
                f"line {exc.lineno}: not valid JSON ({exc.msg}); fix the syntax there "
                "(a missing comma, quote or bracket)"
            ) from exc
        try:
            # Only for line numbers: YAML refuses the tabs JSON may be indented with.
            return data, yaml.compose(text.expandtabs())
        except yaml.YAMLError:
            return data, None
    try:
        return yaml.safe_load(text), yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else "the file"
        raise TimelineError(
            f"{where}: not valid YAML ({exc.problem or exc.context}); fix the syntax there "
            "(indentation, a missing ':' or a quote)"
        ) from exc
    except yaml.YAMLError as exc:
        raise TimelineError(f"the timeline is not valid YAML: {exc}") from exc


def _value(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((value for name, value in node.value if name.value == key), None)


def _customer(raw: Any, line: int) -> Customer:
    if not isinstance(raw, dict) or not isinstance(raw.get("id"), str | int) or raw["id"] == "":
        raise TimelineError(
            f"line {line}: customer must be a mapping with an id, e.g. "
            "customer: {id: ada, email: ada@example.com, name: Ada}"
        )
    _unknown_keys(raw, CUSTOMER_KEYS, "customer", {}, line)
    for key in ("email", "name"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise TimelineError(f"line {line}: customer {key} must be text")
    return Customer(id=str(raw["id"]), email=raw.get("email"), name=raw.get("name"))


def _step(raw: Any, node: yaml.Node | None, start: datetime, previous: datetime) -> Step:
    line = node.start_mark.line + 1 if node is not None else 1
    if not isinstance(raw, dict):
        raise TimelineError(
            f"line {line}: an event is a mapping, e.g. - at: Monday 10:00, track: Product Added"
        )
    _unknown_keys(raw, EVENT_KEYS, "an event", _lines(node), line)
    actions = [key for key in ACTIONS if key in raw]
    if len(actions) != 1:
        raise TimelineError(
            f"line {line}: an event needs exactly one of {', '.join(ACTIONS)}"
            + (f" (it has {', '.join(actions)})" if actions else "")
        )
    action = actions[0]
    if "at" not in raw:
        raise TimelineError(f"line {line}: the event has no 'at': give {TIME_FORMS}")
    at = parse_time(raw["at"], start, previous)
    at_line = _lines(node).get("at", line)
    if at is None:
        # As written: YAML reads a bare 10:00 as the number 600.
        written = _value(node, "at")
        text = written.value if isinstance(written, yaml.ScalarNode) else raw["at"]
        raise TimelineError(f"line {at_line}: {str(text)[:40]!r} is not a time: give {TIME_FORMS}")
    if at < previous:
        raise TimelineError(
            f"line {at_line}: {at:%a %Y-%m-%d %H:%M} is before the previous line's time "
            f"({previous:%a %Y-%m-%d %H:%M}, or start): list the events in time order"
        )
    values: dict[str, Any] = {}
    target = ""
    value = raw[action]
    if action in ("track", "open", "click"):
        if not isinstance(value, str) or not value.strip():
            what = (
                "an event name (track: Product Added)"
                if action == "track"
                else (f"the step of the email to {action} ({action}: cart_email)")
            )
            raise TimelineError(f"line {line}: {action} needs {what}")
        target = value.strip()
    elif action == "identify":
        if not isinstance(value, dict):
            raise TimelineError(
                f"line {line}: identify takes the traits, e.g. identify: {{email: ada@example.com}}"
            )
        values = value
    elif value is not None and not isinstance(value, dict):
        raise TimelineError(
            f"line {line}: ad_click takes nothing or a mapping of properties, e.g. ad_click: {{}}"
        )
    if "properties" in raw and action not in ("track", "ad_click"):
        raise TimelineError(f"line {line}: properties belong to a track or an ad_click")
    if "properties" in raw and not isinstance(raw["properties"], dict):
        raise TimelineError(f"line {line}: properties must be a mapping (properties: {{k: v}})")
    if action in ("track", "ad_click"):
        values = {**(value if isinstance(value, dict) else {}), **raw.get("properties", {})}
    link = raw.get("link", 0)
    if "link" in raw and (
        action != "click" or isinstance(link, bool) or not isinstance(link, int) or link < 0
    ):
        raise TimelineError(
            f"line {line}: link belongs to a click and is the link's number in the email "
            "(0 for the first)"
        )
    return Step(line=line, at=at, action=action, target=target, values=values, link=link)
