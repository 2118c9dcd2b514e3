"""Azure Storage credentials from prefect-azure's block when the environment has none (Azurite as the account)."""

from __future__ import annotations

import os

from grove_helpers import TONE_DATASET, grove, tiny_run_config, write_project

from olive_grove.blocks.azure import AZURE_STORAGE_BLOCK, save_azure_storage


def test_the_block_reaches_blob_storage_when_the_environment_has_no_credentials(tmp_path, tiny_phi3, azure_storage):
    from prefect.client.orchestration import get_client
    from prefect_azure import AzureBlobStorageCredentials

    data = azure_storage.container("data")
    azure_storage.filesystem.put_file(str(TONE_DATASET), f"{data}/train.jsonl")
    cfg = tiny_run_config(tiny_phi3)
    cfg["data_configs"][0]["load_dataset_config"]["data_files"] = f"az://{data}/train.jsonl"
    config = write_project(tmp_path, cfg)
    secret = os.environ.pop("AZURE_STORAGE_CONNECTION_STRING")  # the fixture's monkeypatch restores it

    assert "no storage credentials" in grove("validate", "--config", config).err
    save_azure_storage(secret)
    try:
        result = grove("validate", "--config", config)
        assert result.rc == 0, result.err
        assert "AZURE_STORAGE_CONNECTION_STRING" not in os.environ  # handed to adlfs for the check only
    finally:
        block_id = AzureBlobStorageCredentials.load(AZURE_STORAGE_BLOCK)._block_document_id
        with get_client(sync_client=True) as client:
            client.delete_block_document(block_id)
