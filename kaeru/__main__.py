"""``python -m kaeru``: the same as the ``kaeru`` command."""

from kaeru.cli import app

app()
