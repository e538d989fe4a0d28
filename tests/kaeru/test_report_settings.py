"""The dashboard's and the report's settings (stream D), read from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kaeru.settings import Settings


def test_report_recipients_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).report_recipients == []
    monkeypatch.setenv("KAERU_REPORT_TO", " ops@shop.example, ,owner@shop.example ")
    assert Settings(_env_file=None).report_recipients == ["ops@shop.example", "owner@shop.example"]


@pytest.mark.parametrize(
    "value", ["ops", "ops@localhost", "Ops <ops@shop.example>", "a@b.example;c@d.example"]
)
def test_a_report_recipient_that_is_not_an_address_is_refused_with_the_form(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAERU_REPORT_TO", value)
    with pytest.raises(ValidationError, match="ops@shop.example,owner@shop.example"):
        Settings(_env_file=None)


def test_the_temporal_ui_defaults_to_the_dev_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAERU_TEMPORAL_UI_PORT", "8299")
    assert Settings(_env_file=None).resolved_temporal_ui_url == "http://localhost:8299"
    monkeypatch.setenv("KAERU_TEMPORAL_UI_URL", "https://cloud.temporal.io/")
    assert Settings(_env_file=None).resolved_temporal_ui_url == "https://cloud.temporal.io"
