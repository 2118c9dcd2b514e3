"""Azure Storage credentials: the standard environment first, else prefect-azure's block 'azure-storage'.

adlfs reads the environment itself; the block's values are handed to it through the same variables, for
the duration of one run (and the training processes it starts) only, so they reach no parameter, log
line, cache key, result or file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from urllib.parse import urlparse

from olive_grove.blocks.env import scoped_environment

AZURE_STORAGE_BLOCK = "azure-storage"
SAVE_HINT = f"or save the '{AZURE_STORAGE_BLOCK}' block (grove blocks set-azure-storage)"
# Any of these means the environment already says how to reach storage.
ENV_CREDENTIALS = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_ID",
)


@contextlib.contextmanager
def azure_storage_credentials(block_name: str = AZURE_STORAGE_BLOCK) -> Iterator[bool]:
    """The block's credentials in the environment inside the block, where the environment has none of its
    own; yields whether the block's are in use."""
    values = {} if any(os.environ.get(name) for name in ENV_CREDENTIALS) else _block_values(block_name)
    with scoped_environment(values):
        yield bool(values)


def _block_values(block_name: str) -> dict[str, str]:
    from prefect_azure import AzureBlobStorageCredentials

    try:
        block = AzureBlobStorageCredentials.load(block_name)
    except ValueError:  # Prefect's answer for a block that does not exist
        return {}
    if block.connection_string:
        return {"AZURE_STORAGE_CONNECTION_STRING": block.connection_string.get_secret_value()}
    if not block.account_url:
        return {}
    values = {"AZURE_STORAGE_ACCOUNT_NAME": urlparse(block.account_url).netloc.split(".")[0]}
    for field, name in (
        ("client_id", "AZURE_STORAGE_CLIENT_ID"),
        ("tenant_id", "AZURE_STORAGE_TENANT_ID"),
        ("client_secret", "AZURE_STORAGE_CLIENT_SECRET"),
    ):
        value = getattr(block, field)
        if value:
            values[name] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return values


def save_azure_storage(connection_string: str, block_name: str = AZURE_STORAGE_BLOCK) -> None:
    from prefect_azure import AzureBlobStorageCredentials

    AzureBlobStorageCredentials(connection_string=connection_string).save(block_name, overwrite=True)
