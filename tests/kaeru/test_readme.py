"""Every command the README shows runs as typed: its program exists where the README says.

Commands to type are in shell blocks; prose may name ``kaeru …`` and ``temporal …`` commands
once the README has said how to reach them (``. .venv/bin/activate``), never before.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import typer.main

from kaeru.cli import app

ROOT = Path(__file__).resolve().parents[2]
#: Programs a reader's machine has before kaeru is installed (the README's "You need").
SYSTEM_TOOLS = {"make", "curl", "python3"}
_FENCE = re.compile(r"^ *```(console|sh|shell|bash)\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
_INLINE_COMMAND = re.compile(r"`((?:kaeru|temporal) [a-z][^`]*)`")
ACTIVATE = ". .venv/bin/activate"


def readme_commands(text: str) -> list[list[str]]:
    """The commands of the README's shell blocks (``$ `` lines in console blocks), as words.

    A command after ``. .venv/bin/activate`` in the same block gets ``.venv/bin/`` prefixed
    to its program when that program is installed there (the shell would find it).
    """
    commands = []
    for kind, body in _FENCE.findall(text):
        lines = [line.strip() for line in body.splitlines()]
        if kind == "console":
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        activated = False
        pending = ""
        for line in lines:
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue  # a comment or the answer shown after a command
            pending += line + "\n"
            if pending.endswith("\\\n"):
                continue  # continued on the next line
            try:
                words = shlex.split(pending.replace("\\\n", " "))
            except ValueError:
                continue  # a quote still open: the command goes on
            pending = ""
            while words and _ASSIGNMENT.match(words[0]):
                words.pop(0)  # VAR=value before the program
            if activated and (Path(sys.executable).parent / words[0]).exists():
                words[0] = f".venv/bin/{words[0]}"
            activated = activated or words == [".", ".venv/bin/activate"]
            commands.append(words)
        assert not pending, f"a README command never ends: {pending!r}"
    return commands


def problem_of(words: list[str], kaeru_commands: set[str]) -> str | None:
    """Why ``words`` would not run as typed in a fresh clone after ``make run``; None if it does."""
    program = words[0]
    if program in (".", "source"):  # the shell reads a file: it must be there
        words = words[1:]
        program = words[0]
    if program in SYSTEM_TOOLS:
        return None if shutil.which(program) else f"{program} is not installed here"
    if not program.startswith(".venv/bin/"):
        return f"`{program}` is not on PATH as typed: write .venv/bin/{program}"
    installed = Path(sys.executable).parent / program.removeprefix(".venv/bin/")
    if not installed.exists() and not (ROOT / program).exists():
        return f"{program} is not installed by `make run`"
    subcommand = words[1] if len(words) > 1 and not words[1].startswith("-") else None
    if installed.name == "kaeru" and subcommand and subcommand not in kaeru_commands:
        return f"`kaeru {words[1]}` is no command of kaeru"
    return None


def test_every_command_in_the_readme_runs_as_typed() -> None:
    commands = readme_commands((ROOT / "README.md").read_text())
    kaeru_commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert any(words[0] == "curl" for words in commands)  # the probe reads the README's blocks
    problems = [
        f"{shlex.join(words)}: {problem}"
        for words in commands
        if (problem := problem_of(words, kaeru_commands))
    ]
    assert problems == []


def unreachable_inline_commands(text: str) -> list[str]:
    """``kaeru …`` / ``temporal …`` in prose before the README says how to reach them."""
    activate = next((m.start() for m in _FENCE.finditer(text) if ACTIVATE in m.group(2)), len(text))
    return [m.group(1) for m in _INLINE_COMMAND.finditer(text, 0, activate)]


def test_the_readme_says_how_to_reach_kaeru_before_it_names_a_command() -> None:
    text = (ROOT / "README.md").read_text()
    assert ACTIVATE in text
    assert unreachable_inline_commands(text) == []


def test_a_bare_kaeru_or_temporal_command_is_caught() -> None:
    text = "```console\n$ kaeru demo\n```\n```sh\nKAERU_X=1 temporal workflow list\n```\n"
    found = [problem_of(words, {"demo"}) for words in readme_commands(text)]
    assert found == [
        "`kaeru` is not on PATH as typed: write .venv/bin/kaeru",
        "`temporal` is not on PATH as typed: write .venv/bin/temporal",
    ]
    assert problem_of([".venv/bin/kaeru", "nosuch"], {"demo"}) == (
        "`kaeru nosuch` is no command of kaeru"
    )
    prose = "Run `kaeru demo`.\n```console\n$ . .venv/bin/activate\n```\nThen `kaeru dev`.\n"
    assert unreachable_inline_commands(prose) == ["kaeru demo"]
