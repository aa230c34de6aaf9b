"""Optional TLS: the same session over wss:// with the certificate and key from settings."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.errors import AgentConnectionError
from controller.wsclient import AgentClient
from edge.errors import SettingsError
from tests.fixtures.ws_helpers import TIMEOUT_S, TOKEN, Agent, add_event, running, ws_settings

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with Agent(tmp_path / "data") as agent:
        yield agent


async def test_download_over_wss(
    agent: Agent, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = certificate
    record = add_event(agent.store)
    trust = ssl.create_default_context(cafile=str(cert))
    server = agent.server(ws_settings(tls_cert_file=cert, tls_key_file=key))
    async with running(server):
        assert server.url.startswith("wss://")
        url = f"wss://127.0.0.1:{server.port}"
        async with AgentClient(url, TOKEN, "pc-1", "pull", ssl=trust) as client:
            path = await asyncio.wait_for(
                client.download(record.event_id, tmp_path, record.file), TIMEOUT_S
            )
        assert record.file is not None
        assert path.read_bytes() == (agent.store.file_for(record.event_id) or path).read_bytes()
        assert server.stats.bytes_sendfile == 0  # TLS encrypts in user space: no sendfile
        # A client that does not trust the certificate cannot connect.
        with pytest.raises(AgentConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            async with AgentClient(url, TOKEN, "pc-2", "pull", ssl=ssl.create_default_context()):
                pass


async def test_unreadable_certificate_names_the_setting(agent: Agent, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    server = agent.server(ws_settings(tls_cert_file=missing, tls_key_file=missing))
    with pytest.raises(SettingsError, match="SOUNDEDGE_WS__TLS_CERT_FILE"):
        await asyncio.wait_for(server.run(asyncio.Event()), TIMEOUT_S)


async def test_port_in_use_names_the_setting(agent: Agent) -> None:
    async with running(agent.server(ws_settings())) as first:
        second = agent.server(ws_settings(port=first.port))
        with pytest.raises(SettingsError, match="SOUNDEDGE_WS__PORT"):
            await asyncio.wait_for(second.run(asyncio.Event()), TIMEOUT_S)
