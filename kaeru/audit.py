"""The audit log: every operator action that changes something, with who did it.

Callers record after the action succeeded (an action that failed changed nothing). Reading is
``entries`` (newest first); ``kaeru audit`` prints it.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlmodel import col, select

from kaeru.db import session
from kaeru.models import AuditEntry


def cli_actor() -> str:
    """The actor of a CLI command run on the deployment: ``cli:<os user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = "unknown"
    return f"cli:{user}"


def record(
    database_url: str, actor: str, action: str, target: str, detail: dict[str, Any] | None = None
) -> AuditEntry:
    """Append one entry. ``action`` is a dotted verb such as ``journey.cancel`` or
    ``write_key.revoke``; ``detail`` holds ids and counts, never personal data."""
    entry = AuditEntry(actor=actor, action=action, target=target, detail=detail or {})
    with session(database_url) as s:
        s.add(entry)
    return entry


def entries(
    database_url: str,
    *,
    since: datetime | None = None,
    action: str | None = None,
    actor: str | None = None,
    limit: int = 100,
) -> Sequence[AuditEntry]:
    """The newest entries first, optionally since a time, of one action (or a prefix such as
    ``journey.``), or by one actor."""
    query = select(AuditEntry)
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    if action is not None:
        query = query.where(
            col(AuditEntry.action).startswith(action)
            if action.endswith(".")
            else col(AuditEntry.action) == action
        )
    if actor is not None:
        query = query.where(col(AuditEntry.actor) == actor)
    query = query.order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc()).limit(limit)
    with session(database_url) as s:
        return list(s.exec(query).all())
