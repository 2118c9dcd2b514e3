"""A cache at a URL (`engine.cache_dir: az://container/path`), shared by every machine that runs the flow.

Steps always work in a local folder (a working copy of the shared cache); the shared cache holds the
same layout: `steps/<step>/<key>/` with a step's files and `results/<key>` with Prefect's cache record.
The record is uploaded after the files, so a record in the shared cache means its files are complete.
Before a step runs, its record is fetched if this machine lacks it, so Prefect sees another machine's
result as a cache hit; the files follow when the flow needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

from olive_grove.tasks.artifact import hash_value
from olive_grove.tasks.storage import Remote


def local_copy_of(url: str) -> Path:
    """This machine's working copy of a shared cache (OLIVE_GROVE_LOCAL_CACHE moves them all)."""
    root = Path(os.environ.get("OLIVE_GROVE_LOCAL_CACHE") or Path.home() / ".cache" / "olive-grove" / "shared")
    return root / hash_value(url.rstrip("/"))[:16]


class SharedCache:
    def __init__(self, url: str, local_dir: Path) -> None:
        self.remote = Remote(url, "engine.cache_dir")
        self.local_dir = local_dir

    def _record(self, key: str) -> Path:
        return self.local_dir / "results" / key

    def fetch_record(self, key: str) -> bool:
        """Bring another machine's cache record here, so the step becomes a cache hit; False if none."""
        record = self._record(key)
        if record.is_file():
            return True
        if not self.remote.exists(f"results/{key}"):
            return False
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{key}.tmp{os.getpid()}")
        self.remote.download_file(f"results/{key}", tmp)
        tmp.replace(record)
        return True

    def fetch_folder(self, step: str, key: str, target: Path) -> bool:
        """Download a step's files into `target`; False when the shared cache does not hold them whole."""
        if not self.remote.exists(f"results/{key}"):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        self.remote.download_folder(f"steps/{step}/{key}", target)
        return True

    def share(self, step: str, key: str, folder: Path) -> bool:
        """Upload a finished step (files, then its record) unless the shared cache has it; True if uploaded."""
        record = self._record(key)
        if not record.is_file() or self.remote.exists(f"results/{key}"):
            return False
        # Never removing first: a twin that uploads the same key must not empty files a record vouches for.
        self.remote.upload_folder(folder, f"steps/{step}/{key}", replace=False)
        self.remote.upload_file(record, f"results/{key}")
        return True
