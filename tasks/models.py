"""Base models: where they come from, what they are made of, and how they are loaded."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.artifact import Artifact, hash_files, hash_value, read_memo, write_memo
from tasks.errors import UserError

# Answers that cost seconds to compute and depend only on what is installed and the model's config.
NAMES_MEMO = Path.home() / ".cache" / "olive-grove"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files that decide what a model computes and how its text is tokenized.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.py", "*.tiktoken")


class ModelSource(BaseModel):
    """A base model named by the config: a local folder or a Hugging Face hub id."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def is_local(self) -> bool:
        return Path(self.name).is_dir()


def check_model_source(source: ModelSource, where: str) -> None:
    if source.is_local:
        if not (Path(source.name) / "config.json").exists():
            raise UserError(where, f"{source.name} has no config.json", "point it at a Hugging Face model folder")
    elif not HUB_ID.match(source.name):
        raise UserError(where, f"no folder {source.name}, and it is not a hub id", "give a model folder or org/name")


def model_files(root: Path) -> list[str]:
    names = {p.relative_to(root).as_posix() for pattern in MODEL_FILE_PATTERNS for p in root.glob(pattern)}
    return sorted(names)


def resolve_model(source: ModelSource, memo: Path | None = None) -> Artifact:
    """Fingerprint a base model: a local folder by its files' bytes, a hub model by its commit."""
    if source.is_local:
        root = Path(source.name).resolve()
        fingerprint = hash_files(root, model_files(root), memo=memo)
        return Artifact(kind="model", path=str(root), fingerprint=fingerprint, metadata={"source": "local"})
    # Steps load the downloaded folder, so the revision fingerprinted is the one trained on.
    folder = _download(source)
    commit = Path(folder).name  # the hub cache keeps each snapshot under its commit hash
    return Artifact(
        kind="model",
        path=folder,
        fingerprint=f"hub:{source.name}@{commit}",
        metadata={"source": "hub", "model": source.name, "revision": commit},
    )


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
            raise UserError("input_model.model_path", f"cannot get hub model {source.name}: {exc}") from None


def linear_module_names(model_path: str, trust_remote_code: bool = False) -> set[str]:
    """Short names of the model's linear layers, read from an empty (meta) copy: no weights are loaded.

    Building even an empty model imports its modeling code (seconds), so the answer is kept per model
    config and transformers version.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        problem = f"cannot read the model's config: {exc}".splitlines()[0]
        raise UserError("input_model.model_path", problem) from None
    version = importlib.metadata.version("transformers")
    memo = NAMES_MEMO / f"linear-names-{hash_value([config.to_dict(), version])}.json"
    names = read_memo(memo, None)
    if names is None:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        write_memo(memo, names)
    return set(names)


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
