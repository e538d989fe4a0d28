"""``kaeru api`` refuses keys anyone could guess; settings keep secrets out of reprs and logs."""

from __future__ import annotations

import socket

import pytest

from kaeru.settings import Settings
from tests.kaeru.test_cli import assert_clear_failure, clean_environment, kaeru

__all__ = ["clean_environment"]  # the autouse fixture: no KAERU_ variable leaks in

GOOD = "a-long-random-server-key-0123456789"


@pytest.mark.parametrize(
    ("env", "phrases"),
    [
        ({"KAERU_WRITE_KEY": "dev-write-key"}, ("dev key", "KAERU_WRITE_KEY")),
        ({"KAERU_WRITE_KEY": "short-key"}, ("at least 16", "KAERU_WRITE_KEY")),
        (
            {"KAERU_WRITE_KEY": GOOD, "KAERU_BROWSER_WRITE_KEY": GOOD},
            ("KAERU_BROWSER_WRITE_KEY", "differ"),
        ),
        (
            {"KAERU_WRITE_KEY": GOOD, "KAERU_OPERATOR_TOKEN": "short"},
            ("KAERU_OPERATOR_TOKEN", "at least 16"),
        ),
    ],
)
def test_api_refuses_guessable_keys(env: dict[str, str], phrases: tuple[str, ...]) -> None:
    assert_clear_failure(kaeru("api", **env), *phrases)


def test_api_accepts_a_long_key() -> None:
    # The key check passes; the port in use is then the one problem reported.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = kaeru(
            "api",
            KAERU_WRITE_KEY=GOOD,
            KAERU_BROWSER_WRITE_KEY="public-browser-key",
            KAERU_API_PORT=str(port),
        )
    assert_clear_failure(result, f"127.0.0.1:{port}", "KAERU_API_PORT")


def test_secrets_are_not_in_the_settings_repr() -> None:
    settings = Settings(
        _env_file=None,
        write_key="server-secret-key-123",
        browser_write_key="browser-key-456",
        operator_token="operator-secret-789",
        database_url="postgresql+psycopg://kaeru:db-password-0@db.internal/kaeru",
    )
    shown = f"{settings!r} {settings}"
    for secret in ("server-secret-key-123", "operator-secret-789", "db-password-0"):
        assert secret not in shown
    assert settings.write_key is not None
    assert settings.write_key.get_secret_value() == "server-secret-key-123"
