"""Production entry points never load the dev tooling in kaeru.dev."""

import subprocess
import sys


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
