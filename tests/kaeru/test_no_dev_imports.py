"""Production entry points never load the dev tooling in kaeru.dev."""

import ast
import subprocess
import sys
from pathlib import Path


def test_production_entry_points_import_no_dev_tooling() -> None:
    probe = (
        "import sys\n"
        "import kaeru.cli, kaeru.serving, starter.app, worker\n"
        "print(sorted(m for m in sys.modules if m == 'kaeru.dev' or m.startswith('kaeru.dev.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip() == "[]", done.stdout


def _kaeru_dev_imports(path: Path) -> set[str]:
    """The ``kaeru.dev`` modules ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name.startswith("kaeru.dev.")}
    return found


def test_the_dev_modules_import_each_other_in_no_circle() -> None:
    dev = Path(__file__).resolve().parents[2] / "kaeru" / "dev"
    modules = {f"kaeru.dev.{p.stem}": p for p in dev.glob("*.py") if p.stem != "__init__"}
    graph = {name: _kaeru_dev_imports(path) & modules.keys() for name, path in modules.items()}
    assert graph["kaeru.dev.devstack"], "the probe must see devstack's imports to prove anything"

    def reaches(start: str, goal: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(
            nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
            for nxt in graph[start]
        )

    circles = sorted(name for name in graph if reaches(name, name))
    assert circles == [], f"these kaeru.dev modules import themselves through others: {circles}"
