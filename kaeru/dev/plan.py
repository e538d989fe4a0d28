"""What ``kaeru dev`` starts, and where a person on this machine reaches it.

The dev stack (:mod:`kaeru.dev.devstack`) and the demo shopper (:mod:`kaeru.dev.demo`) both
read the plan; this module imports neither, so they import it without a circle.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydantic import SecretStr

from kaeru.serving import DEV_WRITE_KEY, local_url
from kaeru.settings import Settings
from starter.limits import dev_hosts
from workflows.kit import SEARCH_ATTRIBUTES

#: Every embedded service listens on loopback only.
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class DevPlan:
    """What ``kaeru dev`` starts, and the settings the worker and the API run with."""

    settings: Settings
    temporal: bool
    mail_catcher: bool
    dev_write_key: bool
    #: KAERU_OPERATOR_TOKEN was unset: the admin API's token is made for this run.
    dev_operator_token: bool = False

    @property
    def api_url(self) -> str:
        return local_url(self.settings.api_host, self.settings.api_port)

    @property
    def inbox_url(self) -> str | None:
        return local_url(LOOPBACK, self.settings.mail_catcher_port) if self.mail_catcher else None

    @property
    def temporal_dev_address(self) -> str | None:
        """The embedded Temporal server's gRPC address (``temporal --address``), if it runs."""
        return f"{LOOPBACK}:{self.settings.temporal_port}" if self.temporal else None

    @property
    def temporal_ui_url(self) -> str | None:
        return f"http://localhost:{self.settings.temporal_ui_port}" if self.temporal else None


def plan_dev(settings: Settings) -> DevPlan:
    """Fill what is not configured with the embedded stack (ARCHITECTURE: embedded defaults)."""
    update: dict[str, Any] = {}
    temporal = settings.temporal_address is None
    if temporal:
        update["temporal_address"] = f"{LOOPBACK}:{settings.temporal_port}"
    mail_catcher = settings.smtp_host is None
    if mail_catcher:
        update |= {
            "smtp_host": LOOPBACK,
            "smtp_starttls": False,
            "smtp_tls": False,
            "smtp_username": None,
            "smtp_password": None,
        }
    dev_write_key = settings.write_key is None
    if dev_write_key:
        update["write_key"] = SecretStr(DEV_WRITE_KEY)
    dev_operator_token = settings.operator_token is None
    if dev_operator_token:
        # A fresh one each start: only this process and the person who reads it know it.
        update["operator_token"] = SecretStr(secrets.token_urlsafe(24))
    if "public_url" not in settings.model_fields_set:
        # Tracking links must reach this API even when KAERU_API_PORT moved it.
        update["public_url"] = local_url(settings.api_host, settings.api_port)
    planned = settings.model_copy(update=update)
    # A page on any site can resolve its name to 127.0.0.1 (DNS rebinding): the dev stack's
    # servers answer only for loopback names and the public URL's host.
    planned = planned.model_copy(update={"allowed_hosts": dev_hosts(planned)})
    return DevPlan(
        settings=planned,
        temporal=temporal,
        mail_catcher=mail_catcher,
        dev_write_key=dev_write_key,
        dev_operator_token=dev_operator_token,
    )


def journeys_url(ui_url: str, namespace: str) -> str:
    """The Temporal UI's workflow list, filtered to kaeru's journeys."""
    query = quote(f"{SEARCH_ATTRIBUTES[0].name} IS NOT NULL", safe="")
    return f"{ui_url}/namespaces/{quote(namespace, safe='')}/workflows?query={query}"


def workflow_url(ui_url: str, namespace: str, workflow_id: str, run_id: str | None) -> str:
    """The Temporal UI page of one journey (its history when the run is known)."""
    ns, wid = quote(namespace, safe=""), quote(workflow_id, safe="")
    base = f"{ui_url}/namespaces/{ns}/workflows/{wid}"
    return f"{base}/{run_id}/history" if run_id else base
