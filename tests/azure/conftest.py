"""A real Azure Blob endpoint: the Azurite emulator (npm package `azurite`), started once on loopback."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from grove_helpers import free_port, listening

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE = REPO_ROOT / "node_modules" / ".bin" / "azurite-blob"
# Azurite's well-known development account; it is public and only opens the local emulator.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def connection_string(port: int, key: str = ACCOUNT_KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


@pytest.fixture(scope="session")
def azurite_port(tmp_path_factory) -> int:
    if not AZURITE.exists():
        pytest.fail(f"{AZURITE} is missing: run `npm ci` in the repository (the README's test command does)")
    port = free_port()
    log = tmp_path_factory.mktemp("azurite") / "azurite.log"
    process = subprocess.Popen(
        [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
         "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent"],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    if not listening(port, process, 60):
        process.kill()
        pytest.fail(f"Azurite did not start: {log.read_text()[-2000:]}")
    yield port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def azure_storage(azurite_port: int, monkeypatch):
    """This test's credentials in the standard variable, and a helper that makes fresh containers."""
    for name in [n for n in os.environ if n.startswith("AZURE_STORAGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string(azurite_port))
    import fsspec

    fs = fsspec.filesystem("az", connection_string=connection_string(azurite_port), skip_instance_cache=True)

    class Storage:
        account = ACCOUNT
        filesystem = fs

        @staticmethod
        def connection_string(key: str = ACCOUNT_KEY) -> str:
            return connection_string(azurite_port, key)

        @staticmethod
        def container(prefix: str) -> str:
            name = f"{prefix}-{uuid.uuid4().hex[:8]}"
            fs.mkdir(name)
            return name

    return Storage
