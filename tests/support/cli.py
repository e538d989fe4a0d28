"""The CLI as an operator runs it, for the tests of its commands (typer's CliRunner)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from kaeru.cli import app

runner = CliRunner()
#: A Temporal address nothing listens on.
UNREACHABLE = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No KAERU_ variable or .env of the developer's leaks in (import it into a test module
    to use it there)."""
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def run_kaeru(args: list[str], env: dict[str, str], columns: int = 250) -> Result:
    """``kaeru ARGS`` with ``env`` and a console ``columns`` wide (rich wraps at its width)."""
    return runner.invoke(app, args, env={"COLUMNS": str(columns), **env})


def assert_clear_failure(result: Result, *phrases: str, stream: str = "stderr") -> None:
    """Exit status 1, no traceback, and each phrase in ``stream`` (whitespace joined, as rich
    may wrap a line anywhere)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    said = result.stderr if stream == "stderr" else result.output
    for phrase in phrases:
        assert phrase in " ".join(said.split()), said
