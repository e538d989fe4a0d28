"""Is ``requirements.lock`` current with ``pyproject.toml``? Answered offline, from a fingerprint.

``make lock`` resolves the lock with uv and then runs ``python infra/lock.py stamp``, which
writes on the lock's first line a hash of what pyproject asks for (``requires-python``, the
dependencies and the ``dev`` extra). ``python infra/lock.py check`` (run by ``make lint``, so
by ``make test`` and CI) computes the hash again and fails when pyproject's dependencies
changed since the lock was made. Only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: The extras the lock holds (``uv pip compile ... --extra dev``).
LOCKED_EXTRAS = ("dev",)
PREFIX = "# pyproject-fingerprint: sha256:"
STALE = "requirements.lock is out of date: run make lock"


def fingerprint(pyproject: Path) -> str:
    """A hash of what ``pyproject`` asks to install; order and spacing do not count."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project.get("optional-dependencies", {})

    def canonical(requirements: list[str]) -> list[str]:
        return sorted("".join(r.split()).lower() for r in requirements)

    asked = {
        "requires-python": project.get("requires-python", ""),
        "dependencies": canonical(project.get("dependencies", [])),
        "extras": {name: canonical(extras.get(name, [])) for name in LOCKED_EXTRAS},
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def recorded(lock: Path) -> str | None:
    """The fingerprint written in ``lock``, or None when it has none."""
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line.startswith(PREFIX):
            return line.removeprefix(PREFIX).strip()
    return None


def problem(pyproject: Path, lock: Path) -> str | None:
    """Why ``lock`` does not pin what ``pyproject`` asks for; None when it is current."""
    if not lock.exists():
        return f"{lock.name} is missing: run make lock"
    found = recorded(lock)
    if found is None:
        return f"{lock.name} has no fingerprint line: run make lock"
    if found != fingerprint(pyproject):
        return f"{STALE} (pyproject.toml's dependencies changed since it was made)"
    return None


def stamp(pyproject: Path, lock: Path) -> None:
    """Write the fingerprint of ``pyproject`` as the first line of ``lock``."""
    lines = [
        line
        for line in lock.read_text(encoding="utf-8").splitlines()
        if not line.startswith(PREFIX)
    ]
    lock.write_text("\n".join([PREFIX + fingerprint(pyproject), *lines]) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    pyproject, lock = ROOT / "pyproject.toml", ROOT / "requirements.lock"
    if argv == ["stamp"]:
        stamp(pyproject, lock)
        return 0
    if argv == ["check"]:
        if found := problem(pyproject, lock):
            print(found, file=sys.stderr)
            return 1
        return 0
    print("usage: python infra/lock.py check|stamp", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
