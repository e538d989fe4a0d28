"""infra/ agrees with kaeru: every service, port and variable checked against its settings.

No container runs here, so the files are parsed (compose, the collector's config, the
Dockerfile, the Caddyfile, both Helm values files; Helm templates are read as text) and every
``KAERU_*`` name must be a setting whose value validates, every port must agree between the
process that listens, its healthcheck and whoever connects to it, and every endpoint given to
kaeru must be a receiver that exists. The checker is proved by mutated copies it must refuse.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from kaeru.cli import app, settings_problem
from kaeru.journeys import discover, setting_infos
from kaeru.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"

#: The Temporal SDK's metrics port on every worker (KAERU_WORKER_METRICS_PORT).
WORKER_METRICS_PORT = 9464
KAERU_NAME = re.compile(r"\bKAERU_[A-Z0-9_]*[A-Z0-9]\b")
#: Files whose every KAERU_* mention must be a setting (comments included: they are docs).
FILES = [
    "compose.yaml",
    "otel-collector.yaml",
    "Caddyfile",
    "Dockerfile",
    "Dockerfile.dockerignore",
    "kaeru.env.example",
    "helm/temporal-values.yaml",
    "helm/kaeru/Chart.yaml",
    "helm/kaeru/values.yaml",
    "helm/kaeru/templates/configmap.yaml",
    "helm/kaeru/templates/secret.yaml",
    "helm/kaeru/templates/migrate-job.yaml",
    "helm/kaeru/templates/worker.yaml",
    "helm/kaeru/templates/api.yaml",
    "helm/kaeru/templates/_helpers.tpl",
]


def setting_names() -> set[str]:
    """Every ``KAERU_*`` variable kaeru reads: Settings' and every journey's."""
    names = {f"KAERU_{name.upper()}" for name in Settings.model_fields}
    names |= {info.variable for journey in discover() for info in setting_infos(journey)}
    return names


def kaeru_commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


# ---- compose's interpolation -----------------------------------------------------------------

#: A value compose cannot know here (``${VAR:?message}``: the operator must set it).
REQUIRED = "\0required"
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """``value`` as compose would make it with nothing set: defaults used, required marked."""

    def one(match: re.Match[str]) -> str:
        operator, rest = match.group(2), match.group(3) or ""
        if operator in (":?", "?"):
            return REQUIRED
        return rest if operator in (":-", "-") else ""

    return _INTERPOLATION.sub(one, value.replace("$$", "$"))


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): interpolate(str(v)) for k, v in raw.items()}


#: A port a healthcheck asks: ``host:7233``, ``-p 5432``, ``--port 5432``.
_PROBED_PORT = re.compile(r"(?::|-p |--port )(\d{2,5})\b")


def port_of(url_or_address: str) -> tuple[str, int]:
    """``(host, port)`` of ``http://host:port/...`` or ``host:port``."""
    parts = urlsplit(url_or_address if "//" in url_or_address else f"//{url_or_address}")
    assert parts.hostname is not None and parts.port is not None, url_or_address
    return parts.hostname, parts.port


def listens_on(service: dict[str, Any]) -> set[int]:
    """Container ports a compose service exposes or publishes."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for published in service.get("ports", []):
        ports.add(int(interpolate(str(published)).split(":")[-1].split("/")[0]))
    return ports


@dataclass(frozen=True)
class Hook:
    """A template's Helm hook annotations."""

    events: frozenset[str]
    weight: int
    delete_policy: frozenset[str]


def hook_of(template: str) -> Hook | None:
    """The ``helm.sh/hook*`` annotations of a template (read as text: a template with
    ``{{ if }}`` lines is no YAML); None when it is no hook."""

    def annotation(name: str) -> str | None:
        match = re.search(rf'^\s*"?helm\.sh/{name}"?:\s*"?([^"\n]*)"?\s*$', template, re.M)
        return match.group(1).strip() if match else None

    events = annotation("hook")
    if events is None:
        return None
    return Hook(
        events=frozenset(e.strip() for e in events.split(",")),
        weight=int(annotation("hook-weight") or 0),
        delete_policy=frozenset(
            p.strip() for p in (annotation("hook-delete-policy") or "").split(",") if p
        ),
    )


# ---- the checker -----------------------------------------------------------------------------


@dataclass
class Checker:
    """Reads a copy of infra/ and collects every disagreement as one line."""

    root: Path
    problems: list[str] = field(default_factory=list)

    def text(self, name: str) -> str:
        return (self.root / name).read_text()

    def yaml(self, name: str) -> Any:
        return yaml.safe_load(self.text(name))

    def problem(self, line: str) -> None:
        self.problems.append(line)

    def check(self) -> list[str]:
        known = setting_names()
        for name in FILES:
            for variable in sorted(set(KAERU_NAME.findall(self.text(name))) - known):
                self.problem(f"{name}: {variable} is not a kaeru setting")
        compose = self.yaml("compose.yaml")
        collector = self.yaml("otel-collector.yaml")
        self.check_compose(compose, collector)
        self.check_collector(collector)
        self.check_dockerfile()
        self.check_helm(collector)
        return self.problems

    def settings_valid(self, where: str, env: dict[str, str]) -> None:
        """The KAERU_* values that are known here validate as kaeru's Settings."""
        values = {
            name.removeprefix("KAERU_").lower(): value
            for name, value in env.items()
            if name.startswith("KAERU_") and REQUIRED not in value
        }
        values = {k: v for k, v in values.items() if k in Settings.model_fields}
        try:
            Settings.model_validate(values)  # these values alone, not this machine's env
        except ValidationError as exc:
            self.problem(f"{where}: {settings_problem(exc)}")

    # compose ----------------------------------------------------------------------------------

    def check_compose(self, compose: dict[str, Any], collector: dict[str, Any]) -> None:
        services: dict[str, dict[str, Any]] = compose["services"]
        commands = kaeru_commands()
        kaeru = {
            name: s
            for name, s in services.items()
            if isinstance(s.get("command"), list) and s["command"][:1] == ["kaeru"]
        }
        for name, service in kaeru.items():
            if service["command"][1] not in commands:
                self.problem(f"compose {name}: `kaeru {service['command'][1]}` is no command")
            env = environment_of(service)
            self.settings_valid(f"compose {name}", env)
            self.check_connections(f"compose {name}", env, services, collector)
        for role in ("migrate", "setup", "worker", "api"):
            if not any(s["command"][1] == role for s in kaeru.values()):
                self.problem(f"compose: no service runs `kaeru {role}`")
        for name, service in services.items():
            probe = " ".join(service.get("healthcheck", {}).get("test", []))
            for port in map(int, _PROBED_PORT.findall(probe)):
                if port not in listens_on(service):
                    self.problem(f"compose {name}: its healthcheck asks port {port}, not its own")
            for target, how in (service.get("depends_on") or {}).items():
                condition = how.get("condition") if isinstance(how, dict) else None
                if target not in services:
                    self.problem(f"compose {name}: depends on {target}, which is no service")
                elif condition == "service_healthy" and "healthcheck" not in services[target]:
                    self.problem(f"compose {name}: waits for {target} healthy; it has no check")
                elif condition == "service_completed_successfully":
                    if services[target].get("restart", "no") != "no":
                        self.problem(f"compose {target}: one-shot, so restart must be no")
        for name, service in kaeru.items():
            if service["command"][1] in ("worker", "api"):
                before = {
                    services[t]["command"][1]
                    for t, how in (service.get("depends_on") or {}).items()
                    if t in kaeru and how.get("condition") == "service_completed_successfully"
                }
                if not {"migrate", "setup"} <= before:
                    self.problem(f"compose {name}: must start after `kaeru migrate` and `setup`")
            if service["command"][1] == "api":
                self.check_api(name, service, services, collector)
            if service["command"][1] == "worker":
                self.check_worker(name, service, collector)
        self.check_proxy(services, kaeru)
        ui = next(s for s in services.values() if "temporalio/ui" in s.get("image", ""))
        ui_env = environment_of(ui)
        self.check_temporal_address("compose temporal-ui", ui_env["TEMPORAL_ADDRESS"], services)
        if not ui_env.get("TEMPORAL_CODEC_ENDPOINT", "").endswith("/codec/"):
            self.problem("compose temporal-ui: TEMPORAL_CODEC_ENDPOINT must be kaeru's /codec/")
        ui_origin = f"http://localhost:{ui_env.get('TEMPORAL_UI_PORT', '8080')}"
        for name, service in kaeru.items():
            origins = environment_of(service).get("KAERU_CODEC_CORS_ORIGINS", "")
            if ui_origin not in origins.split(","):
                self.problem(f"compose {name}: KAERU_CODEC_CORS_ORIGINS lacks {ui_origin}")

    def check_connections(
        self,
        where: str,
        env: dict[str, str],
        services: dict[str, dict[str, Any]],
        collector: dict[str, Any],
    ) -> None:
        self.check_temporal_address(where, env.get("KAERU_TEMPORAL_ADDRESS", ""), services)
        url = make_url(env["KAERU_DATABASE_URL"])
        db = services.get(url.host or "")
        if url.get_backend_name() != "postgresql" or db is None:
            self.problem(f"{where}: KAERU_DATABASE_URL's host {url.host} is no PostgreSQL service")
        else:
            db_env = environment_of(db)
            expected = {
                "user": (url.username, db_env.get("POSTGRES_USER")),
                "password": (url.password, db_env.get("POSTGRES_PASSWORD")),
                "database": (url.database, db_env.get("POSTGRES_DB", db_env.get("POSTGRES_USER"))),
            }
            if url.port not in listens_on(db):
                self.problem(f"{where}: KAERU_DATABASE_URL's port {url.port} is not {url.host}'s")
            for what, (given, served) in expected.items():
                if given != served:
                    self.problem(f"{where}: KAERU_DATABASE_URL's {what} {given} is not {served}")
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            host, port = port_of(endpoint)
            grpc = env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc"
            receiver = collector["receivers"]["otlp"]["protocols"]["grpc" if grpc else "http"]
            if host not in services or port not in listens_on(services[host]):
                self.problem(f"{where}: nothing listens on {host}:{port} (OTEL endpoint)")
            if port_of(receiver["endpoint"])[1] != port:
                self.problem(f"{where}: the collector's OTLP receiver is not on port {port}")

    def check_temporal_address(
        self, where: str, address: str, services: dict[str, dict[str, Any]]
    ) -> None:
        if not address:
            self.problem(f"{where}: no Temporal address (KAERU_TEMPORAL_ADDRESS)")
            return
        host, port = port_of(address)
        if host not in services or port not in listens_on(services[host]):
            self.problem(f"{where}: Temporal at {address}: no service listens there")

    def check_api(
        self,
        name: str,
        service: dict[str, Any],
        services: dict[str, dict[str, Any]],
        collector: dict[str, Any],
    ) -> None:
        env = environment_of(service)
        port = int(env.get("KAERU_API_PORT", Settings.model_fields["api_port"].default))
        if env.get("KAERU_API_HOST") != "0.0.0.0":
            self.problem(f"compose {name}: KAERU_API_HOST must be 0.0.0.0 in a container")
        if port not in listens_on(service):
            self.problem(f"compose {name}: KAERU_API_PORT {port} is not exposed")
        probe = " ".join(service.get("healthcheck", {}).get("test", []))
        if f":{port}/healthz" not in probe:
            self.problem(f"compose {name}: its healthcheck does not ask :{port}/healthz")
        if self.scrape_port(collector, name) != port:
            self.problem(f"otel-collector.yaml: scrapes {name} on another port than {port}")

    def check_worker(self, name: str, service: dict[str, Any], collector: dict[str, Any]) -> None:
        env = environment_of(service)
        port = int(env.get("KAERU_WORKER_METRICS_PORT", "0"))
        if port != WORKER_METRICS_PORT:
            self.problem(f"compose {name}: KAERU_WORKER_METRICS_PORT is {port}, not 9464")
        if port not in listens_on(service):
            self.problem(f"compose {name}: its metrics port {port} is not exposed")
        probe = " ".join(service.get("healthcheck", {}).get("test", []))
        if f":{port}/metrics" not in probe:
            self.problem(f"compose {name}: its healthcheck does not ask :{port}/metrics")
        if self.scrape_port(collector, name) != port:
            self.problem(f"otel-collector.yaml: scrapes {name} on another port than {port}")
        # The worker's graceful shutdown (worker.py) must fit in compose's grace period.
        needed = float(env.get("KAERU_SMTP_TIMEOUT", Settings.model_fields["smtp_timeout"].default))
        grace = str(service.get("stop_grace_period", "10s"))
        if not grace.endswith("s") or float(grace[:-1]) < needed + 10:
            self.problem(f"compose {name}: stop_grace_period {grace} < KAERU_SMTP_TIMEOUT + 10 s")

    def scrape_port(self, collector: dict[str, Any], service: str) -> int | None:
        for job in collector["receivers"]["prometheus"]["config"]["scrape_configs"]:
            for sd in job.get("dns_sd_configs", []):
                if service in sd["names"]:
                    return int(sd["port"])
        return None

    def check_proxy(
        self, services: dict[str, dict[str, Any]], kaeru: dict[str, dict[str, Any]]
    ) -> None:
        caddy = self.text("Caddyfile")
        upstream = re.search(r"dynamic a (\S+) (\d+)", caddy)
        if upstream is None:
            self.problem("Caddyfile: no `dynamic a <service> <port>` upstream")
            return
        target, port = upstream.group(1), int(upstream.group(2))
        api = kaeru.get(target)
        if api is None or api["command"][1] != "api":
            self.problem(f"Caddyfile: upstream {target} is not the kaeru API service")
        elif int(environment_of(api).get("KAERU_API_PORT", "8000")) != port:
            self.problem(f"Caddyfile: upstream port {port} is not {target}'s KAERU_API_PORT")
        proxy = next((s for s in services.values() if "caddy" in s.get("image", "")), None)
        if proxy is None or not any("Caddyfile" in v for v in proxy.get("volumes", [])):
            self.problem("compose: no proxy service mounts the Caddyfile")
        elif 80 not in listens_on(proxy) or ":80 {" not in caddy:
            self.problem("compose proxy: publishes another port than the Caddyfile's :80")

    # the collector ------------------------------------------------------------------------------

    def check_collector(self, collector: dict[str, Any]) -> None:
        for pipeline, parts in collector["service"]["pipelines"].items():
            for kind in ("receivers", "processors", "exporters"):
                for part in parts.get(kind, []):
                    if part not in collector.get(kind, {}):
                        self.problem(f"otel-collector.yaml: {pipeline} uses undefined {part}")
        if "otlp" not in collector["service"]["pipelines"].get("traces", {}).get("receivers", []):
            self.problem("otel-collector.yaml: no traces pipeline receives OTLP")

    # the image ----------------------------------------------------------------------------------

    def check_dockerfile(self) -> None:
        text = self.text("Dockerfile")
        base = re.search(r"^FROM python:3\.(\d+)", text, re.MULTILINE)
        if base is None or int(base.group(1)) < 11:
            self.problem("Dockerfile: not FROM python:3.11 or newer")
        if not re.search(r"pip install -c requirements\.lock \.", text):
            self.problem("Dockerfile: does not install kaeru with -c requirements.lock")
        copied = set()
        for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE):
            sources = line.split()[:-1]
            for source in sources:
                copied.add(source.rstrip("/"))
                if not (ROOT / source).exists():
                    self.problem(f"Dockerfile: COPY {source}: no such file in the repository")
        for needed in ("requirements.lock", "pyproject.toml", "kaeru", "workflows", "activities"):
            if needed not in copied:
                self.problem(f"Dockerfile: does not copy {needed}")
        ignored = set(self.text("Dockerfile.dockerignore").split())
        for needed in (".venv", ".kaeru", ".git"):
            if needed not in ignored:
                self.problem(f"Dockerfile.dockerignore: {needed} would be sent to the build")
        for source in copied & ignored:
            self.problem(f"Dockerfile: copies {source}, which Dockerfile.dockerignore leaves out")
        exposed = {
            int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()
        }
        if not {8000, WORKER_METRICS_PORT} <= exposed:
            self.problem("Dockerfile: EXPOSE lacks the API's or the worker's metrics port")

    # Helm ---------------------------------------------------------------------------------------

    def check_helm(self, collector: dict[str, Any]) -> None:
        chart = self.yaml("helm/kaeru/Chart.yaml")
        if chart.get("apiVersion") != "v2" or chart.get("name") != "kaeru":
            self.problem("helm Chart.yaml: not a Helm 3 chart (apiVersion v2) named kaeru")
        values = self.yaml("helm/kaeru/values.yaml")
        config, secrets = values["config"], values["secrets"]
        for key in [*config, *secrets]:
            if not (key.startswith("KAERU_") or key.startswith("OTEL_")):
                self.problem(f"helm values: {key} is neither a KAERU_ setting nor OTEL_")
        env = {k: str(v) for k, v in config.items()}
        env.update({k: str(v) for k, v in secrets.items() if v})
        self.settings_valid("helm values", env)
        if int(config.get("KAERU_API_PORT", 0)) != values["api"]["port"]:
            self.problem("helm values: KAERU_API_PORT is not api.port")
        if int(config.get("KAERU_WORKER_METRICS_PORT", 0)) != values["worker"]["metricsPort"]:
            self.problem("helm values: KAERU_WORKER_METRICS_PORT is not worker.metricsPort")
        if values["worker"]["metricsPort"] != WORKER_METRICS_PORT:
            self.problem("helm values: worker.metricsPort is not 9464")
        if config.get("KAERU_API_HOST") != "0.0.0.0":
            self.problem("helm values: KAERU_API_HOST must be 0.0.0.0 in a pod")
        if port_of(config["KAERU_TEMPORAL_ADDRESS"])[1] != self.temporal_frontend_port():
            self.problem("helm values: KAERU_TEMPORAL_ADDRESS's port is not the frontend's")
        _, otlp_port = port_of(config["OTEL_EXPORTER_OTLP_ENDPOINT"])
        if otlp_port != port_of(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1]:
            self.problem("helm values: OTEL_EXPORTER_OTLP_ENDPOINT is not the collector's port")
        templates = self.root / "helm" / "kaeru" / "templates"
        for template in sorted(templates.iterdir()):
            text = template.read_text()
            for path in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
                node: Any = values
                for part in path.split("."):
                    if not isinstance(node, dict) or part not in node:
                        self.problem(f"helm {template.name}: .Values.{path} is not in values")
                        break
                    node = node[part]
        worker = (templates / "worker.yaml").read_text()
        api = (templates / "api.yaml").read_text()
        job = (templates / "migrate-job.yaml").read_text()
        for text, role, port in (
            (worker, "worker", "{{ .Values.worker.metricsPort }}"),
            (api, "api", "{{ .Values.api.port }}"),
        ):
            if f'command: ["kaeru", "{role}"]' not in text:
                self.problem(f"helm {role}.yaml: does not run `kaeru {role}`")
            if f"containerPort: {port}" not in text:
                self.problem(f"helm {role}.yaml: containerPort is not {port}")
            if 'include "kaeru.env"' not in text:
                self.problem(f"helm {role}.yaml: does not read the settings ConfigMap/Secret")
        if "path: /healthz" not in api:
            self.problem("helm api.yaml: its probes do not ask /healthz")
        if "kaeru migrate && kaeru setup" not in job or "pre-install,pre-upgrade" not in job:
            self.problem("helm migrate-job.yaml: no pre-install/upgrade `kaeru migrate`/`setup`")
        self.check_hook_order(templates)
        secret = (templates / "secret.yaml").read_text()
        for name in ("KAERU_DATABASE_URL", "KAERU_METRICS_TOKEN"):
            if not re.search(rf'required\s+"[^"]*"\s+\.Values\.secrets\.{name}\b', secret):
                self.problem(f"helm secret.yaml: renders with an empty {name} (no `required`)")
        temporal = self.yaml("helm/temporal-values.yaml")
        persistence = temporal["server"]["config"]["persistence"]
        for store in ("default", "visibility"):
            sql = persistence[store].get("sql", {})
            if persistence[store].get("driver") != "sql" or sql.get("driver") != "postgres12":
                self.problem(f"helm temporal-values: {store} store is not PostgreSQL")
        if not temporal.get("web", {}).get("enabled"):
            self.problem("helm temporal-values: the Web UI is off")
        if temporal.get("cassandra", {}).get("enabled", True):
            self.problem("helm temporal-values: the chart's Cassandra is still on")

    def check_hook_order(self, templates: Path) -> None:
        """The migrate Job is a pre-install/pre-upgrade hook reading the settings ConfigMap and
        Secret; Helm creates hooks (by weight) before every other resource, so both must be
        hooks of the same events with a lower weight, recreated each time."""
        job = hook_of((templates / "migrate-job.yaml").read_text())
        if job is None:
            self.problem("helm migrate-job.yaml: not a Helm hook")
            return
        for name in ("configmap.yaml", "secret.yaml"):
            hook = hook_of((templates / name).read_text())
            if hook is None or not {"pre-install", "pre-upgrade"} <= hook.events:
                self.problem(
                    f"helm {name}: not a pre-install,pre-upgrade hook, so the migrate Job "
                    "starts before it exists"
                )
                continue
            if hook.weight >= job.weight:
                self.problem(
                    f"helm {name}: hook weight {hook.weight} is not below the migrate Job's "
                    f"{job.weight}"
                )
            if "before-hook-creation" not in hook.delete_policy:
                self.problem(f"helm {name}: no hook-delete-policy before-hook-creation")

    def temporal_frontend_port(self) -> int:
        temporal = self.yaml("helm/temporal-values.yaml")
        return int(temporal["server"]["frontend"]["service"]["port"])


# ---- tests -----------------------------------------------------------------------------------


def test_infra_agrees_with_kaeru() -> None:
    assert Checker(INFRA).check() == []


def test_every_file_is_read() -> None:
    """A new file under infra/ must be listed here, so the checker reads it."""
    on_disk = {
        str(p.relative_to(INFRA))
        for p in INFRA.rglob("*")
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    }
    assert on_disk == set(FILES)


@pytest.fixture
def mutable(tmp_path: Path) -> Path:
    shutil.copytree(INFRA, tmp_path / "infra", ignore=shutil.ignore_patterns("*.py", "__py*"))
    return tmp_path / "infra"


MUTATIONS = [
    ("compose.yaml", "stop_grace_period: 60s", "stop_grace_period: 10s", "stop_grace_period 10s <"),
    (
        "compose.yaml",
        '"--address", "temporal:7233"',
        '"--address", "temporal:7243"',
        "compose temporal: its healthcheck asks port 7243, not its own",
    ),
    (
        "compose.yaml",
        '"-d", "kaeru", "-p", "5432"',
        '"-d", "kaeru", "-p", "5433"',
        "compose kaeru-db: its healthcheck asks port 5433",
    ),
    # a misspelt variable, in compose, the env example and Helm values
    (
        "compose.yaml",
        "KAERU_TEMPORAL_ADDRESS: temporal",
        "KAERU_TEMPORAL_ADRESS: temporal",
        "KAERU_TEMPORAL_ADRESS is not a kaeru setting",
    ),
    (
        "kaeru.env.example",
        "KAERU_SMTP_PASSWORD=",
        "KAERU_SMTP_PASWORD=",
        "KAERU_SMTP_PASWORD is not a kaeru setting",
    ),
    (
        "helm/kaeru/values.yaml",
        "  KAERU_TASK_QUEUE: kaeru",
        "  KAERU_TASKQUEUE: kaeru",
        "KAERU_TASKQUEUE is not a kaeru setting",
    ),
    # a value kaeru refuses
    (
        "compose.yaml",
        "KAERU_MAX_CONCURRENT_ACTIVITIES:-100}",
        "KAERU_MAX_CONCURRENT_ACTIVITIES:-0}",
        "KAERU_MAX_CONCURRENT_ACTIVITIES='0' is not valid",
    ),
    (
        "helm/kaeru/values.yaml",
        'KAERU_SMTP_STARTTLS: "true"',
        'KAERU_SMTP_STARTTLS: "maybe"',
        "KAERU_SMTP_STARTTLS='maybe' is not valid",
    ),
    # wrong ports
    (
        "compose.yaml",
        "127.0.0.1:8000/healthz",
        "127.0.0.1:8001/healthz",
        "its healthcheck does not ask :8000/healthz",
    ),
    (
        "compose.yaml",
        "      KAERU_API_PORT: 8000",
        "      KAERU_API_PORT: 8080",
        "KAERU_API_PORT 8080 is not exposed",
    ),
    (
        "compose.yaml",
        "http://otel-collector:4318",
        "http://otel-collector:4319",
        "nothing listens on otel-collector:4319",
    ),
    (
        "compose.yaml",
        "KAERU_TEMPORAL_ADDRESS: temporal:7233",
        "KAERU_TEMPORAL_ADDRESS: temporal:7234",
        "Temporal at temporal:7234: no service listens there",
    ),
    (
        "compose.yaml",
        "kaeru-db:5432/kaeru",
        "kaeru-db:5432/shop",
        "KAERU_DATABASE_URL's database shop is not kaeru",
    ),
    (
        "Caddyfile",
        "dynamic a api 8000",
        "dynamic a api 8080",
        "upstream port 8080 is not api's KAERU_API_PORT",
    ),
    ("otel-collector.yaml", "port: 9464", "port: 9465", "scrapes worker on another port"),
    (
        "otel-collector.yaml",
        "endpoint: 0.0.0.0:4318",
        "endpoint: 0.0.0.0:4320",
        "the collector's OTLP receiver is not on port 4318",
    ),
    ("helm/kaeru/values.yaml", "  port: 8000", "  port: 8001", "KAERU_API_PORT is not api.port"),
    (
        "helm/kaeru/templates/api.yaml",
        "{{ .Values.api.port }}",
        "{{ .Values.api.httpPort }}",
        ".Values.api.httpPort is not in values",
    ),
    # order and commands
    (
        "compose.yaml",
        'command: ["kaeru", "migrate"]',
        'command: ["kaeru", "migrat"]',
        "`kaeru migrat` is no command",
    ),
    (
        "Dockerfile",
        "pip install -c requirements.lock .",
        "pip install .",
        "does not install kaeru with -c requirements.lock",
    ),
    # the settings must exist before the migrate Job (hooks, a lower weight)
    (
        "helm/kaeru/templates/configmap.yaml",
        '"helm.sh/hook-weight": "-5"',
        '"helm.sh/hook-weight": "5"',
        "helm configmap.yaml: hook weight 5 is not below the migrate Job's 0",
    ),
    (
        "helm/kaeru/templates/secret.yaml",
        '"helm.sh/hook": pre-install,pre-upgrade',
        "helm.sh/not-a-hook: true",
        "helm secret.yaml: not a pre-install,pre-upgrade hook",
    ),
    (
        "helm/kaeru/templates/configmap.yaml",
        '"helm.sh/hook": pre-install,pre-upgrade',
        '"helm.sh/hook": pre-install',
        "helm configmap.yaml: not a pre-install,pre-upgrade hook",
    ),
    (
        "helm/kaeru/templates/secret.yaml",
        '"helm.sh/hook-delete-policy": before-hook-creation',
        '"helm.sh/hook-delete-policy": hook-succeeded',
        "helm secret.yaml: no hook-delete-policy before-hook-creation",
    ),
    (
        "helm/kaeru/templates/migrate-job.yaml",
        '"helm.sh/hook-weight": "0"',
        '"helm.sh/hook-weight": "-10"',
        "helm secret.yaml: hook weight -5 is not below the migrate Job's -10",
    ),
    # an empty database URL or metrics token must not render
    (
        "helm/kaeru/templates/secret.yaml",
        '{{- $_ := required "secrets.KAERU_DATABASE_URL',
        '{{- $_ := default "secrets.KAERU_DATABASE_URL',
        "renders with an empty KAERU_DATABASE_URL",
    ),
    (
        "helm/kaeru/templates/secret.yaml",
        '{{- $_ := required "secrets.KAERU_METRICS_TOKEN',
        '{{- $_ := default "secrets.KAERU_METRICS_TOKEN',
        "renders with an empty KAERU_METRICS_TOKEN",
    ),
    (
        "helm/temporal-values.yaml",
        "driver: postgres12",
        "driver: mysql8",
        "store is not PostgreSQL",
    ),
]


@pytest.mark.parametrize(("name", "old", "new", "expected"), MUTATIONS)
def test_the_checker_refuses_a_broken_copy(
    mutable: Path, name: str, old: str, new: str, expected: str
) -> None:
    path = mutable / name
    text = path.read_text()
    assert old in text, f"{old!r} is not in {name}: update this mutation"
    path.write_text(text.replace(old, new, 1))
    problems = Checker(mutable).check()
    assert any(expected in p for p in problems), problems


def test_a_worker_started_before_migrate_is_refused(mutable: Path) -> None:
    compose = yaml.safe_load((mutable / "compose.yaml").read_text())
    broken = copy.deepcopy(compose)
    del broken["services"]["worker"]["depends_on"]["migrate"]
    (mutable / "compose.yaml").write_text(yaml.safe_dump(broken))
    assert any("worker: must start after `kaeru migrate`" in p for p in Checker(mutable).check())


def caddy_or_skip() -> str:
    """Caddy's path; without it, a failure on CI (``.ci/run`` installs it) and a skip with
    the fix elsewhere, as for the browser tests."""
    found = shutil.which("caddy")
    if found:
        return found
    missing = "caddy is not installed: apt-get install caddy (.ci/run does it on CI)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing)
    pytest.skip(missing)


def test_caddy_reads_the_caddyfile() -> None:
    """Caddy itself parses the proxy's config (``caddy adapt``): its upstreams are the API's."""
    done = subprocess.run(
        [caddy_or_skip(), "adapt", "--config", str(INFRA / "Caddyfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    handler = json.loads(done.stdout)["apps"]["http"]["servers"]["srv0"]["routes"][0]["handle"][0]
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    api_port = environment_of(compose["services"]["api"])["KAERU_API_PORT"]
    assert handler["dynamic_upstreams"] == {
        "source": "a",
        "name": "api",
        "port": api_port,
        "refresh": 5_000_000_000,
    }
