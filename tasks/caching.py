"""Content-addressed step results: cache keys, step folders, and publishing files only when complete."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager
from pydantic import BaseModel

from olive_grove.tasks.artifact import Artifact, hash_value, move_into_place
from olive_grove.tasks.shared_cache import SharedCache

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


# The file beside a published output that names the cache entry it was copied from.
SOURCE_STAMP = ".olive-grove-source"

# Inputs that only say where to point an error message; they change nothing a step produces.
MESSAGE_ONLY_INPUTS = {"where"}


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
    """Where a step keeps its files; not part of any cache key, so moving the cache keeps its hits.

    `cache_dir` is always a local folder; with a shared cache (`shared_url`) it is this machine's copy.
    """

    cache_dir: str
    shared_url: str | None = None
    retries: int = 0
    retry_delay_seconds: float = 30

    def folder(self, step: str, key: str) -> StepFolder:
        return StepFolder(Path(self.cache_dir) / "steps" / step / key)

    def shared(self) -> SharedCache | None:
        return SharedCache(self.shared_url, Path(self.cache_dir)) if self.shared_url else None


def step_key(step: str, code_version: str, inputs: dict[str, Any]) -> str:
    """Hash of the step, its code version, its settings, its inputs' fingerprints and library versions."""
    parts: dict[str, Any] = {"step": step, "code": code_version, "libs": library_versions()}
    for name, value in sorted(inputs.items()):
        if isinstance(value, StepContext) or name in MESSAGE_ONLY_INPUTS:
            continue
        if isinstance(value, Artifact):
            parts[name] = value.fingerprint
        elif hasattr(value, "cache_view"):
            parts[name] = value.cache_view()
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
        """A fresh, uniquely named folder to write outputs into before `publish`.

        The step holds its key's lock while it runs, so older staging folders of this key were left by
        runs that died: they are removed.
        """
        for stale in self.final.parent.glob(f".{self.final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        path = self.final.with_name(f".{self.final.name}.tmp-{uuid.uuid4().hex[:8]}")
        path.mkdir(parents=True)
        return path

    def publish(self, staged: Path) -> Path:
        """Move a complete output into place atomically; a folder already there (a concurrent twin) wins."""
        move_into_place(staged, self.final)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.final


def publish_copy(source: Path, target: Path, stamp: str) -> None:
    """Place a copy of `source` at `target`, whole or not at all, replacing what was there.

    A copy, not links: editing an output must never change the cache. `stamp` (the cache key) is
    written beside the files, and a target already stamped with it is left as it is.
    """
    marker = target / SOURCE_STAMP
    if marker.is_file() and marker.read_text() == stamp:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staged)
    (staged / marker.name).write_text(stamp)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)


class LiveHolderLockManager(FileSystemLockManager):
    """Prefect's file locks, except that a lock whose holder died on this machine is free.

    Prefect's own file locks never expire; after a `kill -9` mid-step the next run would wait forever.
    Each lock records its holder's host and PID, and a dead PID on this host releases it.
    """

    def _stamp(self, holder: str) -> str:
        suffix = f"|{socket.gethostname()}|{os.getpid()}"
        return holder if holder.endswith(suffix) else holder + suffix

    def acquire_lock(self, key: str, holder: str, acquire_timeout=None, hold_timeout=None) -> bool:
        return super().acquire_lock(key, self._stamp(holder), acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, self._stamp(holder))

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return super().is_lock_holder(key, self._stamp(holder))

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        info = self._get_lock_info(key, use_cache=use_cache)
        if info is not None and _holder_died(info["holder"]):
            Path(info["path"]).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return super().is_locked(key, use_cache=use_cache)


def _holder_died(holder: str) -> bool:
    _, _, tail = holder.partition("|")
    host, _, pid = tail.partition("|")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's lock: only its own expiry can free it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class CacheEntry:
    """One step result in the cache: its folder, its Prefect record, its size and when it was written."""

    step: str
    key: str
    folder: Path
    record: Path
    size_bytes: int
    modified: float


def list_cache(cache_dir: Path) -> list[CacheEntry]:
    entries = []
    for folder in sorted((cache_dir / "steps").glob("*/*")):
        if not folder.is_dir() or folder.name.startswith(".") or folder.name.endswith(".work"):
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        record = cache_dir / "results" / folder.name
        entries.append(CacheEntry(folder.parent.name, folder.name, folder, record, size, folder.stat().st_mtime))
    return entries


def remove_entry(entry: CacheEntry) -> None:
    """Record first, then files: a half-removed entry is a cache miss, never a hit without files."""
    entry.record.unlink(missing_ok=True)
    shutil.rmtree(entry.folder, ignore_errors=True)
    shutil.rmtree(entry.folder.with_name(entry.folder.name + ".work"), ignore_errors=True)
