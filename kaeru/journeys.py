"""The journey registry: every journey kind, derived from the journey classes themselves.

A journey is found, not listed: every :class:`~workflows.kit.Journey` subclass with
``@workflow.defn`` in a module of the ``workflows`` package, and in the modules named by
``KAERU_JOURNEY_MODULES`` (a shop's own journeys). The worker's workflows, the router's routes
(:func:`deliveries`), ``kaeru settings-table`` and the README's settings table all come from
here, so a new journey is one class file and its templates.

Each journey's settings are ``KAERU_<PREFIX>_<FIELD>`` (``<PREFIX>``: its ``settings_prefix``,
else its ``kind`` upper-cased with ``-`` as ``_``), read from the environment and ``.env`` like
:class:`~kaeru.settings.Settings`, durations as seconds or ISO 8601 by the same reader; and
``KAERU_<PREFIX>_ENABLED`` switches the journey on or off.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from types import ModuleType
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

import workflows
from activities.types import EntryPlan
from kaeru.pseudonyms import VisibleIds, is_pseudonym
from kaeru.settings import Settings, positive_duration, seconds_or_iso
from workflows.kit import (
    CONSENT_WITHDRAWN,
    DEFAULT_PRIORITY,
    EMAIL_LINK_CLICKED,
    EMAIL_OPENED,
    IDENTIFY,
    IDENTITY_MERGED,
    ORDER_COMPLETED,
    Journey,
)

#: Events that carry ``properties.journey_id`` and go to that one journey.
TRACKING_EVENTS = frozenset({EMAIL_OPENED, EMAIL_LINK_CLICKED})

Duration = Annotated[timedelta, BeforeValidator(seconds_or_iso), AfterValidator(positive_duration)]


class JourneyError(ValueError):
    """A journey cannot be loaded or its settings are wrong; the message says what to fix."""


@dataclass(frozen=True)
class SettingInfo:
    """One ``KAERU_<PREFIX>_<FIELD>`` setting of a journey, for the settings table."""

    variable: str
    default: Any
    description: str
    duration: bool


@dataclass(frozen=True)
class JourneyRoute:
    """How one journey kind is fed, and with what settings (read once, at the registry's load)."""

    journey: type[Journey[Any]]
    workflow_name: str
    label: str
    starts_on: frozenset[str]
    starts_on_traits: frozenset[str]
    #: Events that reach a live journey only (its start events too, when it is disabled).
    listens_to: frozenset[str]
    enabled: bool
    journey_settings: Any
    #: Its send priority (``KAERU_<PREFIX>_PRIORITY``, else the class's ``priority``).
    priority: int = DEFAULT_PRIORITY
    #: How its journeys enter: ``KAERU_<PREFIX>_HOLDOUT_PERCENT`` and ``_EXPERIMENTS``.
    entry: EntryPlan = dataclasses.field(default_factory=EntryPlan)

    @property
    def kind(self) -> str:
        return self.journey.kind

    def workflow_id(self, customer_id: str) -> str:
        """``<kind>-<id>``: pass the customer's visible id (:mod:`kaeru.pseudonyms`) for a
        journey the router starts."""
        return f"{self.kind}-{customer_id}"

    def workflow_ids(self, customer_id: str, ids: VisibleIds | None) -> tuple[str, str | None]:
        """``(new, before)``: where a new journey of ``customer_id`` runs, and the clear id
        one started before its id was pseudonymised may still run under (None: the same)."""
        if ids is None:
            return self.workflow_id(customer_id), None
        return ids.workflow_ids(self.kind, customer_id)

    def make_input(self, customer_id: str, settings: Settings) -> Any:
        """The input the router starts this journey with (``settings``: the process's global
        settings; the journey's own were read when the registry loaded). An input with a
        ``priority`` field carries the kind's send priority, so a later change of
        ``KAERU_<PREFIX>_PRIORITY`` reaches only journeys started after it."""
        start = self.journey.start_input(customer_id, self.journey_settings)
        if dataclasses.is_dataclass(start) and not isinstance(start, type):
            names = {f.name for f in dataclasses.fields(start)}
            if "priority" in names:
                start = dataclasses.replace(start, priority=self.priority)
            if "entry" in names:
                # A copy: the input is encoded later, and no two journeys share one plan.
                entry = EntryPlan(self.entry.holdout_percent, list(self.entry.experiments))
                start = dataclasses.replace(start, entry=entry)
        return start

    def starts(self, name: str, properties: Mapping[str, Any]) -> bool:
        """Whether an event ``name`` with ``properties`` starts this journey."""
        if name in self.starts_on:
            return True
        changed = properties.get("changed_traits")
        return (
            name == IDENTIFY
            and isinstance(changed, list)
            and any(isinstance(t, str) and t in self.starts_on_traits for t in changed)
        )


@dataclass(frozen=True)
class Delivery:
    """One signal to send: to ``workflow_id``, starting ``route``'s journey if ``start``.

    ``before``: the workflow id the customer's journey had before its id was pseudonymised
    (:mod:`kaeru.pseudonyms`). A journey running there gets the event instead, and none is
    started under ``workflow_id`` while it runs.
    """

    route: JourneyRoute
    workflow_id: str
    start: bool
    before: str | None = None


@dataclass(frozen=True)
class Registry:
    """Every journey kind this process knows."""

    routes: tuple[JourneyRoute, ...]

    @property
    def workflows(self) -> list[type[Journey[Any]]]:
        return [route.journey for route in self.routes]

    def route(self, kind: str) -> JourneyRoute:
        """The route of ``kind``.

        Raises:
            KeyError: no journey of that kind.
        """
        for route in self.routes:
            if route.kind == kind:
                return route
        raise KeyError(kind)

    def deliveries(
        self,
        name: str | None,
        customer_id: str,
        properties: Mapping[str, Any],
        ids: VisibleIds | None = None,
    ) -> list[Delivery]:
        """Where an event goes, in order. Empty: no journey cares about it.

        An open or click goes only to a journey of the same customer: a ``journey_id`` naming
        someone else's journey (a forged or mistaken event) is not delivered; it may name the
        journey under its pseudonymous id or its clear one. A disabled journey is never
        started, but its events still reach a live one. ``ids``: how journeys show customer
        ids (None: in clear, and an open or click naming a pseudonymous journey is kept for
        the router, which can tell whose it is).
        """
        if name is None:
            return []
        if name in TRACKING_EVENTS:
            journey_id = properties.get("journey_id")
            if not isinstance(journey_id, str):
                return []
            return [
                Delivery(route, journey_id, start=False)
                for route in self.routes
                if _names_journey(route, journey_id, customer_id, ids)
            ]
        found: list[Delivery] = []
        for route in self.routes:
            new, before = route.workflow_ids(customer_id, ids)
            if route.enabled and route.starts(name, properties):
                found.append(Delivery(route, new, start=True, before=before))
            elif name in route.listens_to:
                found.append(Delivery(route, new, start=False, before=before))
        return found


def _names_journey(
    route: JourneyRoute, journey_id: str, customer_id: str, ids: VisibleIds | None
) -> bool:
    """Whether ``journey_id`` is ``customer_id``'s journey of ``route``'s kind.

    Without ``ids`` (ingestion, which only asks whether to keep an event for the router), a
    pseudonymous id of that kind may be the customer's: the router, which has the key, decides.
    """
    if ids is not None:
        return journey_id in route.workflow_ids(customer_id, ids)
    prefix = f"{route.kind}-"
    return journey_id == route.workflow_id(customer_id) or (
        journey_id.startswith(prefix) and is_pseudonym(journey_id[len(prefix) :])
    )


# ---- discovery --------------------------------------------------------------------------------


def _journeys_in(module: ModuleType) -> Iterator[type[Journey[Any]]]:
    for _, value in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(value, Journey)
            and value.__module__ == module.__name__
            and getattr(value, "__temporal_workflow_definition", None) is not None
        ):
            yield value


def discover(journey_modules: str = "") -> list[type[Journey[Any]]]:
    """Every journey class: in the ``workflows`` package, then in ``journey_modules``
    (comma-separated module names, ``KAERU_JOURNEY_MODULES``).

    Raises:
        JourneyError: a module cannot be imported, or two journeys share a kind.
    """
    names = [f"{workflows.__name__}.{m.name}" for m in pkgutil.iter_modules(workflows.__path__)]
    extra = [part.strip() for part in journey_modules.split(",") if part.strip()]
    found: dict[str, type[Journey[Any]]] = {}
    for name in [*names, *extra]:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise JourneyError(
                f"KAERU_JOURNEY_MODULES names {name!r}, which cannot be imported ({exc}): give "
                "comma-separated module names importable by the worker and the API, e.g. "
                "shop.journeys"
            ) from exc
        for journey in _journeys_in(module):
            other = found.get(journey.kind)
            if other is not None and other is not journey:
                raise JourneyError(
                    f"journeys {other.__qualname__} and {journey.__qualname__} both have kind "
                    f"{journey.kind!r}: each kind must be unique (it prefixes workflow ids)"
                )
            found[journey.kind] = journey
    return list(found.values())


# ---- per-journey settings ---------------------------------------------------------------------


def prefix_of(journey: type[Journey[Any]]) -> str:
    """``KAERU_<PREFIX>_``'s ``<PREFIX>``: declared, or from the kind (``post-purchase`` →
    ``POST_PURCHASE``)."""
    return journey.settings_prefix or journey.kind.upper().replace("-", "_")


def _setting_fields(journey: type[Journey[Any]]) -> Iterator[tuple[dataclasses.Field[Any], str]]:
    cls = journey.settings_class
    if cls is None:
        return
    for f in dataclasses.fields(cls):
        if "kaeru_setting" in f.metadata:
            suffix = f.metadata.get("name") or f.name.upper()
            yield f, f"KAERU_{prefix_of(journey)}_{suffix}"


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise JourneyError(f"setting {f.name} has no default: every journey setting needs one")


def setting_infos(journey: type[Journey[Any]]) -> list[SettingInfo]:
    """The journey's settings, ``KAERU_<PREFIX>_ENABLED`` first."""
    infos = [
        SettingInfo(
            f"KAERU_{prefix_of(journey)}_ENABLED",
            journey.enabled_by_default,
            f"run the {journey.label or journey.kind} journey (false: none starts; live ones "
            "still end properly)",
            duration=False,
        )
    ]
    infos.append(
        SettingInfo(
            f"KAERU_{prefix_of(journey)}_PRIORITY",
            journey.priority,
            "its marketing messages' place when they compete with other journeys' for the "
            "customer's frequency cap: lower goes first",
            duration=False,
        )
    )
    if not journey.transactional:
        infos.append(
            SettingInfo(
                f"KAERU_{prefix_of(journey)}_HOLDOUT_PERCENT",
                0.0,
                "the share of customers (0 to 100, by a hash of their id) who enter it, are "
                "recorded and get nothing: the holdout its lift is measured against",
                duration=False,
            )
        )
    if journey.experiments:
        infos.append(
            SettingInfo(
                f"KAERU_{prefix_of(journey)}_EXPERIMENTS",
                ",".join(_default_experiments(journey)) or None,
                "the experiments that run, comma-separated, of those it declares: "
                f"{', '.join(journey.experiments)} (empty: none)",
                duration=False,
            )
        )
    for f, variable in _setting_fields(journey):
        default = _default_of(f)
        duration = bool(f.metadata.get("duration"))
        infos.append(
            SettingInfo(
                variable,
                timedelta(seconds=default) if duration else default,
                str(f.metadata["kaeru_setting"]),
                duration,
            )
        )
    return infos


def read_settings(journey: type[Journey[Any]]) -> tuple[bool, Any]:
    """Read whether ``journey`` is enabled and its settings dataclass from the environment.

    Raises:
        JourneyError: a value is wrong; the message names the variable and the fix.
    """
    enabled_var = f"KAERU_{prefix_of(journey)}_ENABLED"
    hints = typing.get_type_hints(journey.settings_class) if journey.settings_class else {}
    fields: dict[str, Any] = {
        "enabled": (bool, Field(journey.enabled_by_default, validation_alias=enabled_var))
    }
    variables = {"enabled": enabled_var}
    for f, variable in _setting_fields(journey):
        duration = bool(f.metadata.get("duration"))
        default = _default_of(f)
        kind: Any = Duration if duration else hints[f.name]
        value = timedelta(seconds=default) if duration else default
        fields[f.name] = (kind, Field(value, validation_alias=variable))
        variables[f.name] = variable
    model = create_model(
        f"{journey.__name__}Settings",
        __base__=_JourneySettingsBase,
        **fields,
    )
    try:
        values = model().model_dump()
    except ValidationError as exc:
        problems = []
        durations = False
        for e in exc.errors():
            variable = str(e["loc"][0]) if e["loc"] else "?"
            value = e.get("input")
            shown = f"={value!r}" if isinstance(value, str | int | float) else ""
            problems.append(f"{variable}{shown} is not valid ({e['msg']})")
            durations = durations or variable in {
                v for n, v in variables.items() if fields[n][0] is Duration
            }
        fix = "Fix it in the environment or in .env"
        if durations:
            fix += "; durations are seconds (86400) or ISO 8601 (P1D, PT30M)"
        raise JourneyError("; ".join(problems) + f". {fix}") from None
    enabled = bool(values.pop("enabled"))
    if journey.settings_class is None:
        return enabled, None
    kwargs = {k: v.total_seconds() if isinstance(v, timedelta) else v for k, v in values.items()}
    built = journey.settings_class(**kwargs)
    check = getattr(built, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            message = str(exc)
            for name, variable in variables.items():
                if message.startswith(name + " "):
                    shown = getattr(built, name)
                    message = f"{variable}={shown!r} is not valid ({message[len(name) + 1 :]})"
            raise JourneyError(f"{message}. Fix it in the environment or in .env") from None
    return enabled, built


def read_priority(journey: type[Journey[Any]]) -> int:
    """Read ``KAERU_<PREFIX>_PRIORITY`` (an integer), else the class's ``priority``.

    Raises:
        JourneyError: not an integer; the message names the variable.
    """
    variable = f"KAERU_{prefix_of(journey)}_PRIORITY"
    model = create_model(
        f"{journey.__name__}Priority",
        __base__=_JourneySettingsBase,
        priority=(int, Field(journey.priority, validation_alias=variable)),
    )
    try:
        return int(model().model_dump()["priority"])
    except ValidationError as exc:
        value = exc.errors()[0].get("input")
        raise JourneyError(
            f"{variable}={value!r} is not valid (it must be a whole number, lower goes "
            "first, e.g. 10). Fix it in the environment or in .env"
        ) from None


def _default_experiments(journey: type[Journey[Any]]) -> list[str]:
    return [n for n, e in journey.experiments.items() if e.enabled_by_default]


def read_entry(journey: type[Journey[Any]]) -> EntryPlan:
    """Read ``KAERU_<PREFIX>_HOLDOUT_PERCENT`` (0 to 100; transactional journeys have none)
    and ``KAERU_<PREFIX>_EXPERIMENTS`` (names the class declares).

    Raises:
        JourneyError: a value is wrong; the message names the variable and the fix.
    """
    prefix = prefix_of(journey)
    holdout_var = f"KAERU_{prefix}_HOLDOUT_PERCENT"
    experiments_var = f"KAERU_{prefix}_EXPERIMENTS"
    model = create_model(
        f"{journey.__name__}Entry",
        __base__=_JourneySettingsBase,
        holdout=(float, Field(0.0, ge=0, le=100, validation_alias=holdout_var)),
        experiments=(
            str,
            Field(",".join(_default_experiments(journey)), validation_alias=experiments_var),
        ),
    )
    try:
        values = model().model_dump()
    except ValidationError as exc:
        value = exc.errors()[0].get("input")
        raise JourneyError(
            f"{holdout_var}={value!r} is not valid (it must be a percentage from 0 to 100, "
            "e.g. 10). Fix it in the environment or in .env"
        ) from None
    names = [n.strip() for n in str(values["experiments"]).split(",") if n.strip()]
    unknown = [n for n in names if n not in journey.experiments]
    if unknown:
        declared = ", ".join(journey.experiments) or "none"
        raise JourneyError(
            f"{experiments_var} names {unknown}, which the {journey.kind} journey does not "
            f"declare (it declares: {declared}). Fix it in the environment or in .env"
        )
    if journey.transactional and values["holdout"]:
        raise JourneyError(
            f"{holdout_var} is set, but the {journey.kind} journey is transactional and never "
            "holds a customer out: remove it from the environment or .env"
        )
    return EntryPlan(holdout_percent=float(values["holdout"]), experiments=names)


class _JourneySettingsBase(BaseSettings):
    """Reads like :class:`~kaeru.settings.Settings`: the environment, then ``.env``."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=False)


# ---- the registry -----------------------------------------------------------------------------


def load_registry(settings: Settings) -> Registry:
    """Discover every journey and read its settings.

    Raises:
        JourneyError: a journey module or a journey setting is wrong.
    """
    routes = []
    for journey in discover(settings.journey_modules):
        enabled, journey_settings = read_settings(journey)
        listens = (
            journey.listens_to
            | journey.starts_on
            | frozenset(journey.exits_on)
            | {IDENTITY_MERGED}
            | (frozenset() if journey.transactional else {CONSENT_WITHDRAWN})
            | ({ORDER_COMPLETED} if journey.ends_on_purchase else frozenset())
            | ({IDENTIFY} if journey.starts_on_traits else frozenset())
        )
        routes.append(
            JourneyRoute(
                journey=journey,
                workflow_name=_workflow_name(journey),
                label=journey.label or journey.kind,
                starts_on=journey.starts_on,
                starts_on_traits=journey.starts_on_traits,
                listens_to=listens,
                enabled=enabled,
                journey_settings=journey_settings,
                priority=read_priority(journey),
                entry=read_entry(journey),
            )
        )
    return Registry(tuple(routes))


def _workflow_name(journey: type[Journey[Any]]) -> str:
    name = journey.__temporal_workflow_definition.name  # type: ignore[attr-defined]
    return str(name)


@lru_cache
def registry() -> Registry:
    """The process's registry, loaded once from the environment (``registry.cache_clear()``
    after changing it, in tests)."""
    return load_registry(Settings())


def deliveries(
    name: str | None,
    customer_id: str,
    properties: Mapping[str, Any],
    ids: VisibleIds | None = None,
) -> list[Delivery]:
    """Where an event goes, by the process's registry (see :meth:`Registry.deliveries`)."""
    return registry().deliveries(name, customer_id, properties, ids)


def kind_of_workflow_id(workflow_id: str) -> str | None:
    """The journey kind of ``workflow_id`` (``<kind>-<customer id>``), by the process's
    registry; None for a workflow that is no journey (the audience sweeper, a typo).

    The longest registered kind wins: with ``cart`` and ``cart-abandonment`` both
    registered, ``cart-abandonment-u1`` is a ``cart-abandonment`` journey. Kinds switched off
    count too: their journeys may still be running.
    """
    kinds = sorted((route.kind for route in registry().routes), key=len, reverse=True)
    for kind in kinds:
        if workflow_id.startswith(f"{kind}-") and len(workflow_id) > len(kind) + 1:
            return kind
    return None
