"""Files on the local disk: content hashes, answers remembered between runs, and folders moved into place whole."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

_CHUNK = 1 << 20
# Names olive-grove keeps beside a step's files (its manifest, its evaluation samples); never published.
INTERNAL_PREFIX = ".olive-grove-"
# The file beside a published output that names the cache entry it was copied from.
SOURCE_STAMP = ".olive-grove-source"
# Answers that cost seconds to compute and depend only on what is installed and a model's config
# (~/.cache/olive-grove, or under XDG_CACHE_HOME where that is set, as other Linux tools do).
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olive-grove"

T = TypeVar("T")


def hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stamped_hash(path: Path) -> str:
    """hash_file, remembered by the file's path, size and mtime (as hash_files' memo does for models): a data
    file is hashed once, not by every check and run that fingerprints it."""
    stat = path.stat()
    return remembered("file-hash", [str(path.resolve()), stat.st_size, stat.st_mtime_ns], lambda: hash_file(path))


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


def remembered(kind: str, key: Any, compute: Callable[[], T]) -> T:
    """An answer that costs seconds (importing transformers, building an empty model) and depends only on
    `key` — installed versions, a config's values — computed once per key and kept in the user's cache."""
    memo = USER_CACHE / f"{kind}-{hash_value(key)}.json"
    value = read_memo(memo, None)
    if value is None:
        value = compute()
        write_memo(memo, value)
    return value


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


def move_into_place(staged: Path, target: Path) -> Path:
    """Rename a complete folder to `target` in one step; if a concurrent twin got there first, it wins."""
    try:
        os.rename(staged, target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staged, ignore_errors=True)
    return target


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
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns(f"{INTERNAL_PREFIX}*"))
    (staged / marker.name).write_text(stamp)
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        os.rename(target, old)
    os.rename(staged, target)
    shutil.rmtree(old, ignore_errors=True)
