"""Base models: where they come from, what they are made of, and how they are loaded.

Errors name keys relative to `input_model.model_path`; the flow puts them there.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from olive_grove.tasks.artifact import Artifact, StepInfo
from olive_grove.tasks.azureml import connect, find_model_folder
from olive_grove.tasks.errors import Unreachable, UserError, first_line
from olive_grove.tasks.files import hash_files, hash_value, move_into_place, remembered
from olive_grove.tasks.storage import Remote, file_fingerprint, is_url

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files that decide what a model computes and how its text is tokenized.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.py", "*.tiktoken")
SourceKind = Literal["local", "url", "azureml", "hub"]


class ModelSource(BaseModel):
    """A base model named by the config: a local folder, a folder URL, an Azure ML registry model or a hub id."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False
    registry_name: str | None = Field(None, description="set for an Azure ML registry model")
    version: str | None = None
    azureml_client: dict[str, Any] | None = None

    @property
    def kind(self) -> SourceKind:
        if self.registry_name:
            return "azureml"
        if is_url(self.name):
            return "url"
        return "local" if Path(self.name).is_dir() else "hub"


class ModelInfo(StepInfo):
    """A Hugging Face model folder: where it came from, and how it must be loaded."""

    source: SourceKind | Literal["merged"]
    name: str
    revision: str | None = None
    trust_remote_code: bool = False


class ModelFacts:
    """What can be read about the base model before the run fetches or loads it; None where it cannot."""

    def __init__(self, source: ModelSource) -> None:
        self.source = source

    @functools.cached_property
    def _config(self) -> dict[str, Any] | None:
        if self.source.kind != "local":
            return None
        try:
            return json.loads((Path(self.source.name) / "config.json").read_text())
        except (OSError, ValueError):
            return None

    def model_type(self) -> str | None:
        kind = (self._config or {}).get("model_type")
        return kind if isinstance(kind, str) else None

    def max_positions(self) -> int | None:
        """The longest sequence the model was built for (its position embeddings)."""
        size = (self._config or {}).get("max_position_embeddings")
        return size if isinstance(size, int) and size > 0 else None

    def num_layers(self) -> int | None:
        count = (self._config or {}).get("num_hidden_layers")
        return count if isinstance(count, int) and count > 0 else None

    def hidden_size(self) -> int | None:
        size = (self._config or {}).get("hidden_size")
        return size if isinstance(size, int) else None

    @functools.cached_property
    def _linear_names(self) -> set[str] | UserError | None:
        if self.source.kind not in ("local", "hub"):
            return None  # read once the run fetches the model
        try:
            return linear_module_names(self.source.name, self.source.trust_remote_code)
        except UserError as exc:
            return exc

    def check(self) -> None:
        """A local model whose config transformers cannot read is a mistake to report now."""
        if self.source.kind == "local" and isinstance(self._linear_names, UserError):
            raise self._linear_names

    def linear_names(self) -> set[str] | None:
        """The short names of its linear layers; None where they are only known once the run has the model."""
        names = self._linear_names
        return None if isinstance(names, UserError) else names


def check_model_source(source: ModelSource) -> None:
    if source.kind == "local":
        check_model_folder(Path(source.name))
    elif source.kind == "url":
        if not Remote(source.name, "").exists("config.json"):
            raise UserError("", f"{source.name} has no config.json", "point it at a Hugging Face model folder")
    elif source.kind == "azureml":
        connect(source.azureml_client, "")  # the Azure ML client library is there
    elif not HUB_ID.match(source.name):
        raise UserError("", f"no folder {source.name}, and it is not a hub id", "give a model folder or org/name")
    elif _hub_offline() and not _in_hub_cache(source):
        raise Unreachable("", f"no folder {source.name}, and the hub is offline (HF_HUB_OFFLINE) with no copy of "
                          "that model in its cache", "give a model folder, or let the hub be reached")  # fmt: skip


def check_model_folder(root: Path) -> None:
    """A Hugging Face model folder that can load: its config, every weight file whole, a tokenizer.

    Cheap: weights are checked by their headers against their sizes, nothing is loaded.
    """
    hint = "point it at a Hugging Face model folder"
    config = _json_file(root / "config.json", f"{root} has no config.json", hint)
    if not isinstance(config, dict):
        raise UserError("", f"{root / 'config.json'} is not a model config")
    weights = weight_files(root)
    if not weights:
        raise UserError("", f"{root} has no weights (model.safetensors or pytorch_model.bin)", hint)
    for path in weights:
        if not path.is_file():
            raise UserError("", f"{path} is missing (its index lists it)", "copy the whole model folder")
        problem = weights_damage(path)
        if problem:
            raise UserError("", f"{path} {problem}", "download or save the model again")
    tokenizers = [root / name for name in TOKENIZER_FILES if (root / name).is_file()]
    if not tokenizers:
        raise UserError("", f"{root} has no tokenizer ({' or '.join(TOKENIZER_FILES)})",
                        "save the tokenizer beside the model: tokenizer.save_pretrained(folder)")  # fmt: skip
    for path in tokenizers:
        if _lfs_pointer(path):
            raise UserError("", f"{path} {LFS}", "fetch the files themselves: git lfs pull")
    if (root / "tokenizer.json").is_file():
        tokenizer = _json_file(root / "tokenizer.json", "", "")
        if not isinstance(tokenizer, dict) or "model" not in tokenizer:
            raise UserError("", f"{root / 'tokenizer.json'} is not a tokenizer (it has no model)", "save it again")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
LFS = "is a git-lfs pointer, not the file it points to"


def _json_file(path: Path, missing: str, hint: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError("", missing, hint) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError("", f"{path} is not valid JSON: {first_line(exc, 80)}") from None


def _lfs_pointer(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(40).startswith(b"version https://git-lfs.github.com/spec")


def check_adapter_folder(root: Path) -> None:
    """A PEFT adapter folder: its config, and its weights whole."""
    hint = "point it at a PEFT adapter folder"
    try:
        json.loads((root / "adapter_config.json").read_text())
    except OSError:
        raise UserError("", f"{root} has no adapter_config.json", hint) from None
    except ValueError as exc:
        raise UserError("", f"{root / 'adapter_config.json'} is not valid JSON: {str(exc)[:80]}") from None
    weights = [root / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (root / n).is_file()]
    if not weights:
        raise UserError("", f"{root} has no adapter weights (adapter_model.safetensors)", hint)
    problem = weights_damage(weights[0])
    if problem:
        raise UserError("", f"{weights[0]} {problem}", "train or save the adapter again")


def weight_files(root: Path) -> list[Path]:
    """The weight files a model folder loads from: an index's shards, else the single file."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):  # fmt: skip
        if (root / index).is_file():
            data = _json_file(root / index, "", "")
            shards = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(shards, dict) or not all(isinstance(n, str) for n in shards.values()):
                raise UserError("", f"{root / index} is not a weight index (no weight_map of file names)")
            return [root / name for name in sorted(set(shards.values()))]
        if (root / single).is_file():
            return [root / single]
    return []


def weights_damage(path: Path) -> str | None:
    """What is wrong with a weight file, read from its first bytes and size; None if it looks whole."""
    if _lfs_pointer(path):
        return LFS
    if path.suffix == ".safetensors":
        return safetensors_damage(path)
    with path.open("rb") as f:  # torch.save writes a zip file
        return None if f.read(4) == b"PK\x03\x04" else "is not a PyTorch checkpoint (no zip header)"


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file, read from its header and size; None if it looks whole."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or length > size - 8:
                return f"is truncated ({size:,} bytes)"
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError):
        return "has no readable safetensors header"
    tensors = [t for k, t in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    ends = [t.get("data_offsets") for t in tensors or [] if isinstance(t, dict)]
    if tensors is None or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[1], int) for e in ends):
        return "has a damaged safetensors header"
    needed = 8 + length + max((e[1] for e in ends), default=0)
    return f"is truncated ({size:,} bytes, its header says {needed:,})" if size < needed else None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(source: ModelSource) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(source.name, revision=source.revision, allow_patterns=["config.json"], local_files_only=True)
    except Exception:  # the hub client's many kinds of "not here"
        return False
    return True


def model_files(root: Path) -> list[str]:
    names = {p.relative_to(root).as_posix() for pattern in MODEL_FILE_PATTERNS for p in root.glob(pattern)}
    return sorted(names)


def resolve_model(source: ModelSource, downloads: Path, memo: Path | None = None) -> Artifact[ModelInfo]:
    """Fingerprint a base model, fetched into `downloads` once: steps always load local files.

    A local folder counts by its files' bytes, a URL by its blobs' ETags, a registry model by its
    (immutable) name and version, a hub model by its commit.
    """
    info = {"name": source.name, "trust_remote_code": source.trust_remote_code}
    if source.kind == "local":
        root = Path(source.name).resolve()
        fingerprint = hash_files(root, model_files(root), memo=memo)
        return Artifact(path=str(root), fingerprint=fingerprint, info=ModelInfo(source="local", **info))
    if source.kind == "url":
        folder, fingerprint = _fetch_url(source, downloads)
    elif source.kind == "azureml":
        folder, fingerprint = _fetch_registry_model(source, downloads)
    else:
        folder = Path(_download(source))
        # Steps load the downloaded folder, so the revision fingerprinted is the one trained on.
        fingerprint, info["revision"] = f"hub:{source.name}@{folder.name}", folder.name
    return Artifact(path=str(folder), fingerprint=fingerprint, info=ModelInfo(source=source.kind, **info))


def _fetch_url(source: ModelSource, downloads: Path) -> tuple[Path, str]:
    """A model folder behind a URL: listed (names, ETags), downloaded once per content."""
    remote = Remote(source.name, "")
    listing = remote.listing("")
    names = sorted(n for n in listing if "/" not in n and any(fnmatch.fnmatch(n, p) for p in MODEL_FILE_PATTERNS))
    if "config.json" not in names:
        raise UserError("", f"{source.name} has no config.json", "point it at a model folder")
    fingerprint = hash_value({n: file_fingerprint(listing[n]) for n in names})
    folder = downloads / "models" / "url" / fingerprint
    if not folder.is_dir():
        remote.download_folder("", folder, names)
    return folder, f"url:{fingerprint}"


def _fetch_registry_model(source: ModelSource, downloads: Path) -> tuple[Path, str]:
    """An Azure ML registry model, downloaded once: a registered version never changes."""
    version = str(source.version)
    folder = downloads / "models" / "azureml" / str(source.registry_name) / source.name.replace("/", "--") / version
    if not folder.is_dir():
        staged = folder.with_name(f".{version}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            connect(source.azureml_client, "").download_model(str(source.registry_name), source.name, version, staged)
            move_into_place(staged, folder)  # a concurrent run may fetch the same version first
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    return find_model_folder(folder, ""), f"azureml:{source.registry_name}/{source.name}:{version}"


def _download(source: ModelSource) -> str:
    """The model's files from the hub cache; downloaded when online, the cached snapshot when offline."""
    from huggingface_hub import snapshot_download

    patterns = list(MODEL_FILE_PATTERNS)
    try:
        return snapshot_download(source.name, revision=source.revision, allow_patterns=patterns)
    except Exception:  # no network, or the hub refused: a snapshot already here still serves
        try:
            return snapshot_download(
                source.name, revision=source.revision, allow_patterns=patterns, local_files_only=True
            )
        except Exception as exc:  # the hub client raises many types; all mean "cannot get this model"
            raise UserError("", f"cannot get hub model {source.name}: {exc}") from None


def linear_module_names(model_path: str, trust_remote_code: bool = False) -> set[str]:
    """Short names of the model's linear layers, read from an empty (meta) copy: no weights are loaded.

    Building even an empty model imports its modeling code (seconds), so the answer is kept per model
    config and transformers version.
    """
    config_file = Path(model_path) / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise UserError("", f"cannot read the model's config: {first_line(exc)}") from None
    if config is None:  # a hub model: its config is read through transformers
        return set(_linear_names_of_empty_model(model_path, trust_remote_code))
    key = [config, importlib.metadata.version("transformers")]
    return set(remembered("linear-names", key, lambda: _linear_names_of_empty_model(model_path, trust_remote_code)))


def _linear_names_of_empty_model(model_path: str, trust_remote_code: bool) -> list[str]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds for a config it cannot read
        raise UserError("", f"cannot read the model's config: {first_line(exc)}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_causal_lm(path: str, dtype: str, trust_remote_code: bool = False, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs
    )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
