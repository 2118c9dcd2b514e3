"""What steps hand each other: where the files are, a content fingerprint, a little metadata."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

ArtifactKind = Literal["model", "adapter", "dataset", "onnx"]

_CHUNK = 1 << 20


class Artifact(BaseModel):
    """A step's output on disk. Models and datasets travel by path, never pickled into a Prefect result."""

    kind: ArtifactKind
    path: str
    fingerprint: str
    metadata: dict[str, Any] = Field(default_factory=dict)


def hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_files(root: Path, names: list[str] | None = None, memo: Path | None = None) -> str:
    """Hash the bytes of the files under `root` (or the named ones), keyed by relative name.

    `memo` keeps (size, mtime) → hash for big files, so a 7 GB base model is hashed once, not every run.
    """
    paths = [root / n for n in names] if names is not None else sorted(p for p in root.rglob("*") if p.is_file())
    known = read_memo(memo, {})
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        stat = path.stat()
        stamp = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        file_hash = known.get(stamp) or hash_file(path)
        known[stamp] = file_hash
        digest.update(f"{path.relative_to(root).as_posix()}={file_hash};".encode())
    write_memo(memo, known)
    return digest.hexdigest()


def move_into_place(staged: Path, target: Path) -> Path:
    """Rename a complete folder to `target` in one step; if a concurrent twin got there first, it wins."""
    try:
        os.rename(staged, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staged, ignore_errors=True)
    return target


def hash_value(value: Any) -> str:
    """A stable hash of JSON-able settings."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def read_memo(memo: Path | None, default: Any) -> Any:
    """A remembered answer (JSON), or `default` when there is none or it cannot be read."""
    if memo is None:
        return default
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        return default


def write_memo(memo: Path | None, value: Any) -> None:
    """Remember an answer, atomically; a memo that cannot be written only costs recomputing it."""
    if memo is None:
        return
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        tmp.replace(memo)
    except OSError:
        pass
