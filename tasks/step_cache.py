"""The step cache on disk, whole: cache keys, step folders and their manifests, the check of every entry,
and the cache shared through a URL. Prefect's side of it (the cache policy, the locks) is in `caching.py`;
nothing here imports Prefect, so the CLI can read and check a cache without starting it.

Layout under the local cache folder: `steps/<step>/<key>/` holds a step's files (with a manifest of their
names, sizes and hashes), `results/<key>` Prefect's cache record, `locks/` the step locks. A shared cache
(`engine.cache_dir: az://...`) holds the same layout; this machine works in a local copy of it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.files import hash_file, hash_value, move_into_place
from olive_grove.tasks.storage import Remote

# Libraries whose versions decide what a step produces; a new version is a cache miss.
OUTPUT_LIBRARIES = ("torch", "transformers", "peft", "datasets", "tokenizers", "bitsandbytes", "onnxruntime-genai")
MANIFEST = ".olive-grove-manifest.json"
# Files up to this size are hashed on every cache hit; bigger ones when their size or mtime moved.
HASHED_ON_EVERY_HIT = 64 << 20


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
    """Where steps keep and find files on this machine; never part of a cache key, so a moved cache keeps
    its hits. `cache_dir` is always local: with a shared cache (`shared_url`) it is this machine's copy."""

    cache_dir: str
    shared_url: str | None = None
    downloads: str
    retries: int = 0
    retry_delay_seconds: float = 30

    def folder(self, step: str, key: str) -> StepFolder:
        return StepFolder(Path(self.cache_dir) / "steps" / step / key)

    def record(self, key: str) -> Path:
        return Path(self.cache_dir) / "results" / key

    def relative(self, path: Path) -> str:
        return path.relative_to(self.cache_dir).as_posix()

    def shared(self) -> SharedCache | None:
        return SharedCache(self.shared_url, Path(self.cache_dir)) if self.shared_url else None


def step_key(step: str, version: str, inputs: dict[str, Any]) -> str:
    """Hash of the step, its code version, its settings, its inputs' fingerprints and library versions."""
    parts: dict[str, Any] = {"step": step, "code": version, "libs": library_versions()}
    for name, value in sorted(inputs.items()):
        if isinstance(value, StepContext):
            continue
        parts[name] = _key_view(value)
    return f"{step}-{hash_value(parts)}"


def _key_view(value: Any) -> Any:
    if isinstance(value, Artifact):
        return value.fingerprint
    if isinstance(value, dict):
        return {k: _key_view(v) for k, v in value.items()}
    if hasattr(value, "cache_view"):
        return value.cache_view()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


# ------------------------------------------------------------------------------------ step folders


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
        """Write the manifest, then move the output into place atomically; a whole concurrent twin wins."""
        write_manifest(staged)
        if self.final.exists() and damage(self.final) is not None:
            remove_folder(self.final)
        move_into_place(staged, self.final)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.final


def write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        stat = path.stat()
        files[path.relative_to(folder).as_posix()] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                                      "hash": hash_file(path)}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(folder: Path, thorough: bool = False) -> str | None:
    """What is wrong with a step folder against its manifest, or None when it is whole.

    Names and sizes are always checked, and that no file was added; contents of small files always, of
    big ones when their mtime moved (a file found unchanged keeps its new mtime), of all with `thorough`.
    """
    if not folder.is_dir():
        return "it is not a folder" if folder.exists() else "its files are missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return "it has no readable manifest"
    moved = False
    for name, expected in files.items():
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            return f"{name} is missing"
        if stat.st_size != expected["size"]:
            return f"{name} has {stat.st_size} bytes, not {expected['size']}"
        stale = stat.st_mtime_ns != expected["mtime_ns"]
        if (thorough or stale or stat.st_size <= HASHED_ON_EVERY_HIT) and hash_file(path) != expected["hash"]:
            return f"{name} changed since it was cached"
        if stale:
            expected["mtime_ns"], moved = stat.st_mtime_ns, True
    added = sorted(
        {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - set(files) - {MANIFEST}
    )
    if added:
        return f"{added[0]} was added since it was cached"
    if moved:  # copied without its times (cp -r): the contents were checked once, so hits need not hash again
        with contextlib.suppress(OSError):
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return None


def remove_folder(path: Path) -> None:
    """Remove a step folder, or whatever stands where one should be."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- shared cache


def local_copy_of(url: str, root: Path) -> Path:
    """This machine's working copy of the shared cache at `url`, under `root`."""
    return root / hash_value(url.rstrip("/"))[:16]


class SharedCache:
    """A cache at a URL, shared by every machine that runs the flow.

    A step's files are uploaded before its record, so a record there means its files are complete; a
    machine that lacks a record fetches it, and the files with it, before the step runs, so Prefect sees
    another machine's result as a cache hit.
    """

    def __init__(self, url: str, local_dir: Path) -> None:
        self.remote = Remote(url, "")
        self.local_dir = local_dir

    def fetch(self, step: str, key: str, target: Path, log: Any) -> bool:
        """Bring another machine's result here, files checked against its manifest; False if there is none.

        A damaged shared result is dropped from the shared cache (its record first), so the run that
        computes it again shares it again.
        """
        if not self.remote.exists(f"results/{key}"):
            return False
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            self.remote.download_folder(f"steps/{step}/{key}", target)
        problem = damage(target, thorough=True)
        if problem is not None:
            log.warning("%s: the shared result %s is damaged (%s): computing it again", step, key, problem)
            remove_folder(target)
            self.remote.remove(f"results/{key}")
            return False
        record = self.local_dir / "results" / key
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{key}.tmp{os.getpid()}")
        self.remote.download_file(f"results/{key}", tmp)
        tmp.replace(record)
        return True

    def share(self, step: str, key: str, folder: Path) -> bool:
        """Upload a finished step (files, then its record) unless the shared cache has it; True if uploaded."""
        record = self.local_dir / "results" / key
        if not record.is_file() or self.remote.exists(f"results/{key}"):
            return False
        # Never removing first: a twin that uploads the same key must not empty files a record vouches for.
        self.remote.upload_folder(folder, f"steps/{step}/{key}", replace=False)
        self.remote.upload_file(record, f"results/{key}")
        return True


# ---------------------------------------------------------------------------------- grove cache ...


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
        if folder.name.startswith(".") or folder.name.endswith(".work"):
            continue
        files = folder.rglob("*") if folder.is_dir() else [folder]
        size = sum(p.stat().st_size for p in files if p.is_file())
        record = cache_dir / "results" / folder.name
        entries.append(CacheEntry(folder.parent.name, folder.name, folder, record, size, folder.stat().st_mtime))
    return entries


def remove_entry(entry: CacheEntry) -> None:
    """Record first, then files: a half-removed entry is a cache miss, never a hit without files."""
    entry.record.unlink(missing_ok=True)
    remove_folder(entry.folder)
    shutil.rmtree(entry.folder.with_name(entry.folder.name + ".work"), ignore_errors=True)


def leftovers(cache_dir: Path) -> list[Path]:
    """What failed or interrupted runs left: staging folders, checkpoints of steps that never finished,
    and records without a step folder (Prefect keeps one for each failed step)."""
    steps = cache_dir / "steps"
    found = sorted(steps.glob("*/.*.tmp-*"))
    found += sorted(p for p in steps.glob("*/*.work") if not p.with_name(p.name.removesuffix(".work")).exists())
    keys = {p.name for p in steps.glob("*/*")}
    found += sorted(p for p in (cache_dir / "results").glob("*") if p.is_file() and p.name not in keys)
    return found
