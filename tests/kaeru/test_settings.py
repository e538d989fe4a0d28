"""Settings as an operator writes them: environment variables, durations in either form."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from kaeru.settings import Settings

DURATIONS = [name for name, field in Settings.model_fields.items() if field.annotation is timedelta]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("86400", 86400),
        ("86400.0", 86400),
        ("10", 10),
        ("5.5", 5.5),
        ("P1D", 86400),
        ("PT30M", 1800),
        ("01:00:00", 3600),
    ],
)
def test_every_duration_reads_seconds_or_iso_8601_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, seconds: float
) -> None:
    monkeypatch.setenv(f"KAERU_{name.upper()}", text)
    assert getattr(Settings(_env_file=None), name) == timedelta(seconds=seconds)


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("text", ["0", "-5", "soon", "inf", "nan"])
def test_a_duration_that_is_not_positive_or_not_a_duration_is_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    monkeypatch.setenv(f"KAERU_{name.upper()}", text)
    with pytest.raises(ValidationError, match=name):
        Settings(_env_file=None)


def test_there_are_durations_to_check() -> None:
    # The journeys' durations (KAERU_CART_EMAIL_DELAY...): tests/starter/test_routing.py.
    assert {"tracking_ttl", "audience_sweep_interval"} <= set(DURATIONS)


def test_the_temporal_address_follows_the_dev_server_port_until_it_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KAERU_TEMPORAL_ADDRESS", raising=False)
    monkeypatch.setenv("KAERU_TEMPORAL_PORT", "7444")
    assert Settings(_env_file=None).resolved_temporal_address == "127.0.0.1:7444"
    monkeypatch.setenv("KAERU_TEMPORAL_ADDRESS", "temporal.internal:7233")
    assert Settings(_env_file=None).resolved_temporal_address == "temporal.internal:7233"
