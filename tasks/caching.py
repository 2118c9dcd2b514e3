"""Content-addressed step results: cache keys, step folders, and publishing files only when complete."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.artifact import Artifact, hash_value

# Libraries whose versions decide what a step produces; a new version is a cache miss.
OUTPUT_LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "datasets",
    "tokenizers",
    "bitsandbytes",
    "onnxruntime-genai",
)


@functools.cache
def library_versions() -> dict[str, str]:
    versions = {}
    for name in OUTPUT_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


class StepContext(BaseModel):
    """Where a step keeps its files; not part of any cache key, so moving the cache keeps its hits."""

    cache_dir: str

    def folder(self, step: str, key: str) -> StepFolder:
        return StepFolder(Path(self.cache_dir) / "steps" / step / key)


def step_key(step: str, code_version: str, inputs: dict[str, Any]) -> str:
    """Hash of the step, its code version, its settings, its inputs' fingerprints and library versions."""
    parts: dict[str, Any] = {"step": step, "code": code_version, "libs": library_versions()}
    for name, value in sorted(inputs.items()):
        if isinstance(value, StepContext):
            continue
        if isinstance(value, Artifact):
            parts[name] = value.fingerprint
        elif isinstance(value, BaseModel):
            parts[name] = value.model_dump(mode="json")
        else:
            parts[name] = value
    return f"{step}-{hash_value(parts)}"


@dataclass(frozen=True)
class StepFolder:
    """A step's final folder, plus a scratch folder that survives crashes (checkpoints live there)."""

    final: Path

    @property
    def work(self) -> Path:
        return self.final.with_name(self.final.name + ".work")

    def staging(self) -> Path:
        """A fresh, uniquely named folder to write outputs into before `publish`."""
        path = self.final.with_name(f".{self.final.name}.tmp-{uuid.uuid4().hex[:8]}")
        path.mkdir(parents=True)
        return path

    def publish(self, staged: Path) -> Path:
        """Move a complete output into place atomically; a folder already there (a concurrent twin) wins."""
        try:
            os.rename(staged, self.final)
        except OSError:
            if not self.final.exists():
                raise
            shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.final

    @property
    def done(self) -> bool:
        return self.final.is_dir()


def publish_copy(source: Path, target: Path) -> None:
    """Place a copy of `source` at `target` (hard links where the disk allows), replacing what was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, staged, copy_function=link_or_copy)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)
