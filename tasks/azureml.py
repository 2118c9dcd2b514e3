"""Azure ML, behind one small interface: where a datastore's blobs live, and a registry model's files.

Only `AzureMLWorkspace` talks to Azure ML (through azure-ai-ml, the `azureml` extra); everything else
sees the `AzureML` protocol, so tests point it at a storage emulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from olive_grove.tasks.errors import Unreachable, UserError, first_line


@dataclass(frozen=True)
class BlobLocation:
    """A datastore's storage account and container."""

    account_name: str
    container: str

    def url(self, relative_path: str) -> str:
        return f"az://{self.container}/{relative_path.lstrip('/')}"


class AzureML(Protocol):
    def datastore(self, name: str) -> BlobLocation:
        """The blob container behind a workspace datastore."""

    def download_model(self, registry_name: str, name: str, version: str, target: Path) -> None:
        """A registry model's files, written under `target`."""


class AzureMLWorkspace:
    """The real Azure ML, reached with DefaultAzureCredential (az login, managed identity, env vars)."""

    def __init__(self, client: dict[str, Any], where: str) -> None:
        try:
            from azure.ai.ml import MLClient
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise Unreachable(
                where, "Azure ML needs the azure-ai-ml package", "pip install 'olive-grove[azureml]'"
            ) from None
        self._where, self._client, self._credential = where, client, DefaultAzureCredential()
        self._ml_client = MLClient

    def _workspace(self):
        client = self._client
        if client.get("aml_config_path"):
            return self._ml_client.from_config(self._credential, path=client["aml_config_path"])
        missing = [k for k in ("subscription_id", "resource_group", "workspace_name") if not client.get(k)]
        if missing:
            raise UserError(f"{self._where}.{missing[0]}", "is required", "or give aml_config_path")
        return self._ml_client(
            self._credential, client["subscription_id"], client["resource_group"], client["workspace_name"]
        )

    def datastore(self, name: str) -> BlobLocation:
        try:
            store = self._workspace().datastores.get(name)
        except UserError:
            raise
        except Exception as exc:  # azure-ai-ml raises service errors of many types
            raise _service_error(self._where, f"datastore {name!r}", exc) from None
        if not getattr(store, "container_name", None):
            raise UserError(self._where, f"datastore {name!r} is not a blob container", "use a blob datastore")
        return BlobLocation(account_name=store.account_name, container=store.container_name)

    def download_model(self, registry_name: str, name: str, version: str, target: Path) -> None:
        try:  # the client looks the registry up as it is made: sign-in failures surface here too
            registry = self._ml_client(self._credential, registry_name=registry_name)
            registry.models.download(name=name, version=version, download_path=str(target))
        except Exception as exc:  # not found, no access, network: all mean this model cannot be had
            raise _service_error(self._where, f"registry model {registry_name}/{name}:{version}", exc) from None


def _service_error(where: str, what: str, exc: Exception) -> UserError:
    text = f"{what}: {first_line(exc)}"
    if "credential" in text.lower() or "connect" in text.lower():
        return Unreachable(
            where, text, "sign in with az login, a managed identity or AZURE_CLIENT_ID/_SECRET/TENANT_ID"
        )
    return UserError(where, text)


def connect(client: dict[str, Any] | None, where: str) -> AzureML:
    """The Azure ML that a config's `azureml_client` names."""
    return AzureMLWorkspace(client or {}, where)


def find_model_folder(root: Path, where: str) -> Path:
    """The folder holding config.json: registry models nest it (MLflow's data/model, for one)."""
    found = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not found:
        raise UserError(where, f"the downloaded model in {root} has no config.json", "register a Hugging Face model")
    return found[0].parent
