"""Azure Storage credentials: the standard environment first, else prefect-azure's block 'azure-storage'.

adlfs reads the environment itself; the block's values are handed to it through the same variables, in
this process (and the training processes it starts) only, so they reach no parameter, log line, cache
key, result or file.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

AZURE_STORAGE_BLOCK = "azure-storage"
# Any of these means the environment already says how to reach storage.
ENV_CREDENTIALS = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_ID",
)


_exported_from: set[str] = set()  # blocks whose values this process already exported


def use_azure_storage(block_name: str = AZURE_STORAGE_BLOCK) -> bool:
    """Export the block's credentials when the environment has none; True if the block's are in use."""
    if block_name in _exported_from:
        return True
    if any(os.environ.get(name) for name in ENV_CREDENTIALS):
        return False
    from prefect_azure import AzureBlobStorageCredentials

    try:
        block = AzureBlobStorageCredentials.load(block_name)
    except ValueError:  # Prefect's answer for a block that does not exist
        return False
    if block.connection_string:
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = block.connection_string.get_secret_value()
    elif block.account_url:
        os.environ["AZURE_STORAGE_ACCOUNT_NAME"] = urlparse(block.account_url).netloc.split(".")[0]
        for field, name in (
            ("client_id", "AZURE_STORAGE_CLIENT_ID"),
            ("tenant_id", "AZURE_STORAGE_TENANT_ID"),
            ("client_secret", "AZURE_STORAGE_CLIENT_SECRET"),
        ):
            value = getattr(block, field)
            if value:
                os.environ[name] = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    _exported_from.add(block_name)
    return True


def save_azure_storage(connection_string: str, block_name: str = AZURE_STORAGE_BLOCK) -> None:
    from prefect_azure import AzureBlobStorageCredentials

    AzureBlobStorageCredentials(connection_string=connection_string).save(block_name, overwrite=True)
