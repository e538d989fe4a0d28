"""mTLS to Temporal (``KAERU_TEMPORAL_TLS_*``): a real TLS handshake through
tests/support/tls_proxy.py, which requires a client certificate of its CA and forwards to the
dev server, and the messages of the settings that are wrong."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner, Result

from kaeru.cli import app
from kaeru.db import session
from kaeru.models import Customer
from kaeru.settings import Settings
from kaeru.temporal import TemporalTLSError, connect, tls_config
from tests.conftest import make_settings
from tests.support.smtp import SMTPTestServer
from tests.support.tls_proxy import CertificateAuthority, Issued, tls_proxy
from tests.workflows.conftest import SETTINGS, SHOE, Shopper
from worker import build_worker

SERVER_NAME = "temporal.kaeru.test"


@dataclass
class Pki:
    ca: CertificateAuthority
    client: Issued
    stranger: Issued  # a client certificate of another CA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority(tmp_path, "kaeru")
    other = CertificateAuthority(tmp_path, "other")
    return Pki(ca, ca.issue("worker", server=False), other.issue("worker", server=False))


@pytest.fixture
async def proxy(dev_server_env: WorkflowEnvironment, pki: Pki) -> AsyncIterator[str]:
    """TLS on loopback, its server certificate for 127.0.0.1."""
    server = pki.ca.issue("loopback", server=True, names=["127.0.0.1", "localhost"])
    async with tls_proxy(_upstream(dev_server_env), server, pki.ca.cert) as address:
        yield address


def _upstream(env: WorkflowEnvironment) -> str:
    return str(env.client.service_client.config.target_host)


def settings(address: str, **values: Any) -> Settings:
    return Settings(_env_file=None, temporal_address=address, **values)


async def namespace_of(s: Settings) -> str:
    client = await connect(s)
    answer = await client.workflow_service.describe_namespace(
        DescribeNamespaceRequest(namespace=s.temporal_namespace)
    )
    return answer.namespace_info.name


async def test_a_client_certificate_of_the_servers_ca_connects(proxy: str, pki: Pki) -> None:
    s = settings(
        proxy,
        temporal_tls_cert=pki.client.cert,
        temporal_tls_key=pki.client.key,
        temporal_tls_ca=pki.ca.cert,
    )
    assert await namespace_of(s) == "default"
    # Journeys can start over it: the worker and the API use this same client.
    client = await connect(s)
    assert (await client.count_workflows()).count >= 0


async def test_the_cli_reads_the_tls_settings_from_the_environment(
    proxy: str, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The paths come from the environment, as mounted secrets give them: the CLI reaches
    Temporal through the proxy (it finds no such journey), and without the key it cannot."""
    clean(monkeypatch, tmp_path)
    env = {
        "KAERU_TEMPORAL_ADDRESS": proxy,
        "KAERU_DATABASE_URL": f"sqlite:///{tmp_path / 'none.db'}",
        "KAERU_TEMPORAL_TLS_CERT": str(pki.client.cert),
        "KAERU_TEMPORAL_TLS_KEY": str(pki.client.key),
        "KAERU_TEMPORAL_TLS_CA": str(pki.ca.cert),
    }
    (tmp_path / "none.db").touch()
    result = await asyncio.to_thread(cli, ["journeys", "resume", "cart-abandonment-nobody"], env)
    assert result.exit_code == 1, result.output
    assert "there is no journey with id 'cart-abandonment-nobody'" in result.stderr
    del env["KAERU_TEMPORAL_TLS_CERT"], env["KAERU_TEMPORAL_TLS_KEY"]
    result = await asyncio.to_thread(cli, ["journeys", "resume", "cart-abandonment-nobody"], env)
    assert result.exit_code == 1 and "cannot reach Temporal" in result.stderr, result.output


def clean(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """No KAERU_ variable or .env of the developer's leaks into the CLI."""
    for name in list(os.environ):
        if name.startswith("KAERU_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(directory)


def cli(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(app, args, env={"COLUMNS": "200", **env})


async def test_a_worker_over_mtls_runs_a_journey_to_its_email(
    dev_server_env: WorkflowEnvironment, proxy: str, pki: Pki, sqlite_url: str
) -> None:
    """The worker's long polls and its activities' results travel through the handshake."""
    async with SMTPTestServer() as smtp:
        s = make_settings(
            sqlite_url,
            smtp_port=smtp.port,
            temporal_address=proxy,
            temporal_tls_cert=pki.client.cert,
            temporal_tls_key=pki.client.key,
            temporal_tls_ca=pki.ca.cert,
        )
        client = await connect(s)
        async with httpx.AsyncClient() as http, build_worker(client, s, http):
            shopper = Shopper(
                dev_server_env,
                sqlite_url,
                smtp,
                s.task_queue,
                settings=dataclasses.replace(SETTINGS, email_delay=0.5),
            )
            with session(sqlite_url) as db:
                db.add(Customer(customer_id=shopper.customer_id, email=shopper.email))
            await shopper.cart("Product Added", **SHOE)
            try:
                assert len(await shopper.wait_for_emails(1)) == 1
            finally:
                await shopper.handle.terminate("test over")


async def test_without_a_client_certificate_the_server_refuses(proxy: str, pki: Pki) -> None:
    s = settings(proxy, temporal_tls=True, temporal_tls_ca=pki.ca.cert)
    with pytest.raises(RuntimeError, match=f"cannot reach Temporal at {proxy}") as raised:
        await namespace_of(s)
    assert "may want a client certificate: set KAERU_TEMPORAL_TLS_CERT" in str(raised.value)


async def test_a_certificate_of_another_ca_is_refused(proxy: str, pki: Pki) -> None:
    s = settings(
        proxy,
        temporal_tls_cert=pki.stranger.cert,
        temporal_tls_key=pki.stranger.key,
        temporal_tls_ca=pki.ca.cert,
    )
    with pytest.raises(RuntimeError, match="accepts the certificate of KAERU_TEMPORAL_TLS_CERT"):
        await namespace_of(s)


async def test_a_server_certificate_of_an_unknown_ca_is_refused(proxy: str, pki: Pki) -> None:
    s = settings(proxy, temporal_tls_cert=pki.client.cert, temporal_tls_key=pki.client.key)
    with pytest.raises(RuntimeError, match="set KAERU_TEMPORAL_TLS_CA to the PEM file"):
        await namespace_of(s)  # the system roots do not know the test CA


async def test_plain_grpc_is_not_tls(proxy: str, pki: Pki) -> None:
    """The proxy really is TLS: the client without TLS settings does not get through."""
    with pytest.raises(RuntimeError, match="cannot reach Temporal"):
        await namespace_of(settings(proxy))


async def test_the_server_name_override_verifies_a_certificate_for_another_name(
    dev_server_env: WorkflowEnvironment, pki: Pki
) -> None:
    server = pki.ca.issue("named", server=True, names=[SERVER_NAME])
    mtls = {
        "temporal_tls_cert": pki.client.cert,
        "temporal_tls_key": pki.client.key,
        "temporal_tls_ca": pki.ca.cert,
    }
    async with tls_proxy(_upstream(dev_server_env), server, pki.ca.cert) as address:
        with pytest.raises(RuntimeError, match="set KAERU_TEMPORAL_TLS_SERVER_NAME"):
            await namespace_of(settings(address, **mtls))  # 127.0.0.1 is not its name
        named = settings(address, temporal_tls_server_name=SERVER_NAME, **mtls)
        assert await namespace_of(named) == "default"


def test_no_tls_setting_means_plain_grpc_and_tls_alone_uses_the_system_roots() -> None:
    assert tls_config(settings("127.0.0.1:7233")) is None
    tls = tls_config(settings("x.tmprl.cloud:7233", temporal_tls=True))
    assert tls is not None
    assert (tls.client_cert, tls.server_root_ca_cert, tls.domain) == (None, None, None)


@pytest.mark.parametrize("given", ["temporal_tls_cert", "temporal_tls_key"])
def test_a_certificate_needs_its_key_and_the_reverse(given: str, pki: Pki) -> None:
    with pytest.raises(ValidationError) as raised:
        settings("127.0.0.1:7233", **{given: pki.client.cert})
    message = str(raised.value)
    assert "KAERU_TEMPORAL_TLS_CERT and KAERU_TEMPORAL_TLS_KEY together" in message
    missing = (
        "KAERU_TEMPORAL_TLS_KEY" if given == "temporal_tls_cert" else "KAERU_TEMPORAL_TLS_CERT"
    )
    assert f"{missing} is missing" in message


def test_the_cli_says_which_tls_setting_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pki: Pki
) -> None:
    clean(monkeypatch, tmp_path)
    result = CliRunner().invoke(
        app,
        ["kill-switch", "status"],
        env={"COLUMNS": "200", "KAERU_TEMPORAL_TLS_CERT": str(pki.client.cert)},
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    said = " ".join(result.stderr.split())
    assert "KAERU_TEMPORAL_TLS_KEY is missing" in said, said


def test_an_unreadable_file_is_named_with_its_setting(tmp_path: Path, pki: Pki) -> None:
    gone = tmp_path / "nowhere.pem"
    s = settings("127.0.0.1:7233", temporal_tls_cert=gone, temporal_tls_key=pki.client.key)
    with pytest.raises(TemporalTLSError, match=f"KAERU_TEMPORAL_TLS_CERT={gone} cannot be read"):
        tls_config(s)


def test_a_file_that_is_not_pem_or_not_the_right_pem_is_refused(tmp_path: Path, pki: Pki) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    s = settings("127.0.0.1:7233", temporal_tls_ca=junk)
    with pytest.raises(TemporalTLSError, match=r"KAERU_TEMPORAL_TLS_CA=.* \(it is not PEM\)"):
        tls_config(s)
    swapped = settings(
        "127.0.0.1:7233", temporal_tls_cert=pki.client.key, temporal_tls_key=pki.client.key
    )
    with pytest.raises(TemporalTLSError, match="holds no PEM certificate .it holds PRIVATE KEY"):
        tls_config(swapped)
    # The checker accepts what it should: the real pair passes.
    good = settings(
        "127.0.0.1:7233", temporal_tls_cert=pki.client.cert, temporal_tls_key=pki.client.key
    )
    config = tls_config(good)
    assert config is not None and config.client_cert == pki.client.cert.read_bytes()
