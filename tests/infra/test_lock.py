"""requirements.lock pins what pyproject.toml asks for, and the check says when it does not.

The check (``python infra/lock.py check``, run by ``make lint``) is proved on copies: a changed
dependency fails it with the fix, a reordered or re-spaced list does not, and the real files pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest

from infra import lock

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """pyproject.toml, requirements.lock and the check itself, copied into ``tmp_path``."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    (tmp_path / "infra").mkdir()
    shutil.copy(ROOT / "infra" / "lock.py", tmp_path / "infra" / "lock.py")
    return tmp_path


def check(root: Path) -> subprocess.CompletedProcess[str]:
    """``python infra/lock.py check`` in ``root``, as ``make lint`` runs it."""
    return subprocess.run(
        [sys.executable, str(root / "infra" / "lock.py"), "check"],
        capture_output=True,
        text=True,
        check=False,
    )


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}: update this test"
    path.write_text(text.replace(old, new, 1))


def test_the_real_lock_is_current() -> None:
    result = check(ROOT)
    assert result.returncode == 0, result.stderr
    assert lock.problem(ROOT / "pyproject.toml", ROOT / "requirements.lock") is None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"httpx>=0.27"', '"httpx>=0.28"'),  # a bound changed
        ('"cryptography>=42",', '"cryptography>=42",\n    "rich>=13",'),  # a dependency added
        ('"pytest>=8",', ""),  # a dev dependency removed
        ('requires-python = ">=3.11"', 'requires-python = ">=3.12"'),
    ],
)
def test_a_changed_dependency_fails_the_check(copy: Path, old: str, new: str) -> None:
    assert check(copy).returncode == 0
    edit(copy / "pyproject.toml", old, new)
    result = check(copy)
    assert result.returncode == 1
    assert "requirements.lock is out of date: run make lock" in result.stderr


def test_order_spacing_and_other_tables_do_not_count(copy: Path) -> None:
    edit(copy / "pyproject.toml", '"temporalio>=1.35,<2",', '"temporalio >= 1.35, < 2",')
    edit(copy / "pyproject.toml", '    "ruff>=0.6",\n', "")
    edit(copy / "pyproject.toml", '    "mypy>=1.11",\n', '    "mypy>=1.11",\n    "ruff>=0.6",\n')
    edit(copy / "pyproject.toml", "line-length = 100", "line-length = 99")
    assert check(copy).returncode == 0, check(copy).stderr


def test_stamp_makes_a_changed_pyproject_current_again(copy: Path) -> None:
    edit(copy / "pyproject.toml", '"httpx>=0.27"', '"httpx>=0.28"')
    assert check(copy).returncode == 1
    lock.stamp(copy / "pyproject.toml", copy / "requirements.lock")
    assert check(copy).returncode == 0
    lines = (copy / "requirements.lock").read_text().splitlines()
    assert sum(line.startswith(lock.PREFIX) for line in lines) == 1  # replaced, not added


def test_a_lock_without_fingerprint_or_missing_is_refused(copy: Path) -> None:
    text = (copy / "requirements.lock").read_text().splitlines()
    (copy / "requirements.lock").write_text("\n".join(text[1:]) + "\n")
    assert "no fingerprint line: run make lock" in check(copy).stderr
    (copy / "requirements.lock").unlink()
    assert "requirements.lock is missing: run make lock" in check(copy).stderr


def pins(lock_file: Path) -> dict[str, str]:
    """``name: version`` of every line of the lock (markers ignored)."""
    found = {}
    for line in lock_file.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name, _, version = line.split(";")[0].strip().partition("==")
            found[name.lower().replace("_", "-")] = version
    return found


def test_the_tests_run_on_the_locked_versions() -> None:
    """What ``make`` installed is what the lock says: the tests prove the lock's versions."""
    locked = pins(ROOT / "requirements.lock")
    assert {"temporalio", "pyyaml", "pytest", "uv"} <= set(locked)
    installed = {
        d.metadata["Name"].lower().replace("_", "-"): d.version
        for d in distributions()
        if d.metadata["Name"] and d.metadata["Name"].lower() != "kaeru"
    }
    differ = {
        name: (version, installed[name])
        for name, version in locked.items()
        if name in installed and installed[name] != version
    }
    assert not differ, f"installed versions differ from the lock (locked, installed): {differ}"


def make_dry_run(*args: str) -> str:
    """What ``make`` would run (``-n``: nothing runs), in the repository."""
    done = subprocess.run(
        ["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_installs_from_the_lock_again_when_it_changes() -> None:
    stamp = ".venv/.kaeru-installed"
    if not (ROOT / stamp).exists():
        pytest.skip("not installed by make (no .venv/.kaeru-installed)")
    assert "pip install" not in make_dry_run(stamp)  # installed and current: nothing to do
    # -W: as if requirements.lock had just changed
    assert "pip install --quiet -c requirements.lock -e" in make_dry_run(
        "-W", "requirements.lock", stamp
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_lint_checks_the_lock_first() -> None:
    lines = make_dry_run("lint").splitlines()
    checks = [i for i, line in enumerate(lines) if line.endswith("infra/lock.py check")]
    ruff = [i for i, line in enumerate(lines) if "ruff check" in line]
    assert checks and ruff and checks[0] < ruff[0], lines
