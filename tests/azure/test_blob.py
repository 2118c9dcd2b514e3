"""Cloud data and storage against a real Blob endpoint (Azurite): data, a shared cache, outputs, models,
Azure ML datastores and registry models, and the errors a user meets when something is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from grove_helpers import SHARED_CONFIGS, TONE_DATASET, grove, read_report, step, tiny_run_config, write_project

from olive_grove.tasks.azureml import BlobLocation
from olive_grove.tasks.data import DataConfig, fingerprint_data, local_data_files
from olive_grove.tasks.models import ModelSource, resolve_model
from olive_grove.tasks.storage import Remote


def put_folder(storage, local: Path, url: str) -> None:
    Remote(url, "test").upload_folder(local, "")


@pytest.mark.slow
def test_data_and_cache_on_blob_are_shared_by_a_second_machine(tmp_path, tiny_phi3, azure_storage, monkeypatch):
    fs = azure_storage.filesystem
    data, cache, out = (azure_storage.container(p) for p in ("data", "cache", "outputs"))
    fs.put_file(str(TONE_DATASET), f"{data}/tone/train.jsonl")
    cfg = tiny_run_config(tiny_phi3, cache_dir=f"az://{cache}/olive", output_dir="outputs/a")
    cfg["data_configs"][0]["load_dataset_config"]["data_files"] = f"az://{data}/tone/*.jsonl"
    config = write_project(tmp_path, cfg)

    monkeypatch.setenv("OLIVE_GROVE_LOCAL_CACHE", str(tmp_path / "machine-a"))
    first = grove("run", "--config", config)
    assert first.rc == 0, first.err[-3000:]
    assert read_report(config)["cached_steps"] == []
    records = fs.ls(f"{cache}/olive/results", detail=False)
    assert len(records) == 7  # dataset, adapter, merged model, ONNX model, and the quality of base, merged, ONNX
    for name in ("prepare_dataset", "train_adapter", "merge_adapter", "build_onnx_model", "measure_model"):
        assert fs.ls(f"{cache}/olive/steps/{name}", detail=False), name

    # Another machine: nothing on its disk, outputs to Blob. Every step comes from the shared cache.
    monkeypatch.setenv("OLIVE_GROVE_LOCAL_CACHE", str(tmp_path / "machine-b"))
    second = grove("run", "--config", config, "--set", f"engine.output_dir=az://{out}/run")
    assert second.rc == 0, second.err[-3000:]
    report = json.loads(fs.cat_file(f"{out}/run/report.json"))
    assert sorted(report["cached_steps"]) == ["builder", "lora", "lora/dataset", "merge", "quality/base",
                                              "quality/merged", "quality/onnx/int4-cpu"]  # fmt: skip
    local_onnx = next((tmp_path / "outputs/a/onnx").rglob("model.onnx"))
    blob_onnx = f"{out}/run/onnx/{local_onnx.parent.name}/model.onnx"
    assert fs.cat_file(blob_onnx) == local_onnx.read_bytes()
    assert fs.exists(f"{out}/run/adapter/adapter_model.safetensors")
    adapter_key = Path(step(report, "lora")["path"]).name
    assert fs.cat_file(f"{out}/run/adapter/.olive-grove-source").decode() == adapter_key  # complete, and whose


def test_remote_data_is_fingerprinted_by_metadata_and_downloaded_once(tmp_path, azure_storage, monkeypatch):
    fs = azure_storage.filesystem
    data = azure_storage.container("data")
    fs.put_file(str(TONE_DATASET), f"{data}/train.jsonl")
    config = DataConfig.model_validate(
        {"name": "d", "load_dataset_config": {"data_name": "json", "data_files": [f"az://{data}/train.jsonl"]}}
    )
    copies = tmp_path / "copies"
    before = fingerprint_data(config)
    assert not copies.exists()  # fingerprinting downloads nothing
    [copy] = local_data_files(config.load_dataset_config, "data_files", copies)
    stamp = Path(copy).stat().st_mtime_ns
    assert local_data_files(config.load_dataset_config, "data_files", copies) == [copy]
    assert Path(copy).stat().st_mtime_ns == stamp  # the second read uses the first download
    assert fingerprint_data(config) == before

    fs.pipe_file(f"{data}/train.jsonl", TONE_DATASET.read_bytes() + b'{"phrase": "new", "tone": "Joy"}\n')
    assert fingerprint_data(config) != before
    [fresh] = local_data_files(config.load_dataset_config, "data_files", copies)
    assert fresh != copy and Path(fresh).read_bytes().endswith(b'"Joy"}\n')


class AzuriteWorkspace:
    """Azure ML, played by the emulator: the datastore is a container, the registry a folder of blobs."""

    def __init__(self, account: str, container: str) -> None:
        self.account, self.container, self.downloads = account, container, 0

    def datastore(self, name: str) -> BlobLocation:
        assert name == "workspaceblobstore"
        return BlobLocation(account_name=self.account, container=self.container)

    def download_model(self, registry_name: str, name: str, version: str, target: Path) -> None:
        self.downloads += 1
        url = f"az://{self.container}/registries/{registry_name}/{name}/{version}"
        Remote(url, "registry").download_folder("", target / "mlflow_model_folder" / "data" / "model")


@pytest.mark.skipif(not SHARED_CONFIGS.is_dir(), reason=f"no Olive configs at {SHARED_CONFIGS} (the seed documents)")
def test_the_guides_datastore_config_reads_its_blob(tmp_path, tiny_phi3, azure_storage, monkeypatch):
    fs = azure_storage.filesystem
    store = azure_storage.container("workspaceblobstore")
    rows = [{"Question": "Why?", "Best Answer": "Because."}] * 40
    fs.pipe_file(f"{store}/UI/qa/train.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    workspace = AzuriteWorkspace(azure_storage.account, store)
    monkeypatch.setattr("olive_grove.flows.preflight.connect", lambda client, where: workspace)
    monkeypatch.setattr("olive_grove.tasks.models.connect", lambda client, where: workspace)
    put_folder(azure_storage, tiny_phi3, f"az://{store}/registries/azureml-msr/microsoft/Phi-3-mini-4k-instruct/11")
    guide = SHARED_CONFIGS / "fragments-cloud-data-registry-model.json"
    path = "data_configs.0.load_dataset_config.data_files.relative_path=UI/qa/train.jsonl"
    result = grove("validate", "--config", guide, "--set", path)
    assert result.rc == 0, result.err
    from olive_grove.flows.config import load_run_config
    from olive_grove.flows.preflight import resolve_datastores

    cfg, _ = load_run_config(guide, [path])
    resolve_datastores(cfg)
    assert cfg.data_configs[0].load_dataset_config.data_files == f"az://{store}/UI/qa/train.jsonl"

    # The registry model: downloaded once, found inside MLflow's layout, fingerprinted by name and version.
    source = cfg.model_source()
    model = resolve_model(source, tmp_path)
    again = resolve_model(source, tmp_path)
    assert workspace.downloads == 1
    assert Path(model.path).name == "model" and (Path(model.path) / "config.json").is_file()
    assert model.fingerprint == again.fingerprint == "azureml:azureml-msr/microsoft/Phi-3-mini-4k-instruct:11"


def test_a_model_folder_url_is_fetched_once_and_trained_on(tmp_path, tiny_phi3, azure_storage, monkeypatch):
    models = azure_storage.container("models")
    put_folder(azure_storage, tiny_phi3, f"az://{models}/tiny-phi3")
    source = ModelSource(name=f"az://{models}/tiny-phi3")
    first, second = resolve_model(source, tmp_path), resolve_model(source, tmp_path)
    assert first == second and first.fingerprint.startswith("url:")
    assert len(list((tmp_path / "models" / "url").iterdir())) == 1

    cfg = tiny_run_config(f"az://{models}/tiny-phi3", passes={"lora": tiny_run_config(tiny_phi3)["passes"]["lora"]})
    result = grove("run", "--config", write_project(tmp_path / "project", cfg))
    assert result.rc == 0, result.err[-3000:]
    assert (tmp_path / "project/outputs/run/adapter/adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no credentials", "data_files: az://{data}/train.jsonl: no storage credentials"),
        ("wrong key", "data_files: az://{data}/train.jsonl: access denied"),
        ("no container", "data_files: az://missing-container/train.jsonl: no such container 'missing-container'"),
        ("no blob", "data_files: az://{data}/absent.jsonl: no such blob or file"),
        ("no cache container", "error: cache_dir: az://missing-cache/olive: no such container 'missing-cache'"),
    ],
)
def test_storage_mistakes_are_one_line_naming_the_uri(tmp_path, tiny_phi3, azure_storage, monkeypatch, case, expected):
    data = azure_storage.container("data")
    azure_storage.filesystem.put_file(str(TONE_DATASET), f"{data}/train.jsonl")
    files = {"no container": "az://missing-container/train.jsonl", "no blob": f"az://{data}/absent.jsonl"}
    cfg = tiny_run_config(tiny_phi3)
    cfg["data_configs"][0]["load_dataset_config"]["data_files"] = files.get(case, f"az://{data}/train.jsonl")
    if case == "no cache container":
        cfg["cache_dir"] = "az://missing-cache/olive"
    if case == "no credentials":
        monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
        monkeypatch.setattr("olive_grove.blocks.azure._block_values", lambda name: {})  # nor a block
    if case == "wrong key":
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_storage.connection_string("d3Jvbmc="))
    config = write_project(tmp_path, cfg)
    result = grove("run", "--config", config)
    assert result.rc == 2
    assert len(result.errors) == 1, result.err
    assert result.errors[0].startswith("error: data_configs[0].load_dataset_config." * ("cache" not in case))
    assert expected.format(data=data) in result.errors[0]
    assert "Traceback" not in result.err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "cache").exists()


def test_a_damaged_shared_result_is_computed_again_and_shared_whole(tmp_path, tiny_phi3, azure_storage, monkeypatch,
                                                                    caplog):  # fmt: skip
    fs = azure_storage.filesystem
    cache = azure_storage.container("shared-cache")
    passes = {name: tiny_run_config(tiny_phi3)["passes"][name] for name in ("lora", "merge")}
    config = write_project(tmp_path, tiny_run_config(tiny_phi3, passes, cache_dir=f"az://{cache}/olive"))
    for machine in ("a", "b", "c"):
        monkeypatch.setenv("OLIVE_GROVE_LOCAL_CACHE", str(tmp_path / f"machine-{machine}"))
        result = grove("run", "--config", config)
        assert result.rc == 0, result.err[-3000:]
        if machine == "a":  # then someone damages the shared merged model
            [weights] = fs.glob(f"{cache}/olive/steps/merge_adapter/*/model.safetensors")
            fs.pipe_file(weights, b"\0" * 1000)
        elif machine == "b":
            # The damaged merge is made again under the same key, so its measurements are still reused.
            assert read_report(config)["cached_steps"] == ["lora/dataset", "lora", "quality/base", "quality/merged"]
            assert "the shared result" in caplog.text and "is damaged" in caplog.text
    assert read_report(config)["cached_steps"] == [
        "lora/dataset",
        "lora",
        "merge",
        "quality/base",
        "quality/merged",
    ]  # machine c: shared whole again
    assert fs.size(weights) > 1000
