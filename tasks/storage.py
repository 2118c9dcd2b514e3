"""Files behind URLs (az://, abfs://, any fsspec protocol): opening them, moving folders, naming failures.

Credentials are never passed around: adlfs reads the standard Azure environment
(AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or a SAS token,
else DefaultAzureCredential), which `olive_grove.blocks.azure` may fill from a Prefect block for a run.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from olive_grove.tasks.errors import NoCredentials, Unreachable, UserError, first_line
from olive_grove.tasks.files import hash_value, move_into_place

CREDENTIALS_HINT = (
    "set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT_NAME with a key, SAS token or Azure login"
)


def is_url(path: str) -> bool:
    """A remote location: a URL whose protocol is not the local file system."""
    protocol, sep, _ = path.partition("://")
    return bool(sep) and protocol not in ("file", "local")


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def filesystem(url: str, where: str, storage_options: dict[str, Any] | None = None):
    """The fsspec file system and path for `url`; a missing library or credential is the user's to fix."""
    import fsspec

    # A fresh client each time: credentials come from the environment, which fsspec's instance cache ignores.
    options = {"skip_instance_cache": True, **(storage_options or {})}
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise UserError(where, f"{url}: {first_line(exc)}", "install the fsspec package for this protocol") from None
    except Exception as exc:  # each fsspec backend raises its own types for a bad account or options
        raise storage_error(exc, url, where) from None


def storage_error(exc: BaseException, url: str, where: str) -> UserError:
    """One line that names the URL and what to do: no credentials, no container or blob, access denied."""
    text = str(exc)
    code = getattr(exc, "error_code", None) or ""
    status = getattr(exc, "status_code", None)
    if "connection_string or account_name" in text or ("credential" in text.lower() and status is None):
        return NoCredentials(where, f"{url}: no storage credentials", CREDENTIALS_HINT)
    if isinstance(exc, FileNotFoundError) or status == 404 or "NotFound" in code:
        what = "container" if "Container" in code else "container or blob"
        return UserError(where, f"{url}: no such {what}", "check the account, container and path")
    if status in (401, 403) or "Authorization" in code or "Authentication" in code:
        return UserError(where, f"{url}: access denied ({code or status})", "check the credentials and their role")
    if type(exc).__name__ in ("ServiceRequestError", "ClientConnectorError", "ConnectionError", "TimeoutError"):
        return Unreachable(where, f"{url}: cannot be reached ({first_line(exc, 120)})", "check the network")
    return UserError(where, f"{url}: {first_line(exc)}")


def not_found(fs, path: str, url: str, where: str) -> UserError:
    """The error for a URL that names nothing: is the container missing, or only the blob?"""
    container = path.split("/")[0]
    if not fs.exists(container):
        return UserError(where, f"{url}: no such container '{container}'", "check the account and container")
    return UserError(where, f"{url}: no such blob or file", "check the path")


class Remote:
    """A folder at a URL. Every call turns a storage failure into a UserError naming the URL."""

    def __init__(self, url: str, where: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url, self.where = url.rstrip("/"), where
        self.fs, self.root = filesystem(self.url, where, storage_options)
        self.root = self.root.rstrip("/")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:  # any backend error means this URL cannot be used as asked
            raise storage_error(exc, join(self.url, what) if what else self.url, self.where) from None

    def path(self, relative: str, name: str = "") -> str:
        """The backend path of `relative` (and of `name` inside it); "" is the folder at the URL itself."""
        return "/".join(p for p in (self.root, relative, name) if p)

    def check_container(self) -> None:
        """The container (or bucket) is there and these credentials may see it."""
        container = self.root.split("/")[0]
        if not self._call("", self.fs.exists, container):
            raise UserError(self.where, f"{self.url}: no such container '{container}'", "create it first")

    def exists(self, relative: str) -> bool:
        return self._call(relative, self.fs.exists, self.path(relative))

    def listing(self, relative: str) -> dict[str, dict[str, Any]]:
        """The files under `relative` (names relative to it) with their metadata; empty when there is none."""
        base = self.path(relative).rstrip("/")
        found = self._call(relative, self.fs.find, base, detail=True)
        return {p[len(base) + 1 :]: info for p, info in sorted(found.items()) if p.startswith(base + "/")}

    def files(self, relative: str) -> list[str]:
        return list(self.listing(relative))

    def read_bytes(self, relative: str) -> bytes:
        return self._call(relative, self.fs.cat_file, self.path(relative))

    def remove(self, relative: str) -> None:
        self._call(relative, self.fs.rm, self.path(relative))

    def write_bytes(self, relative: str, data: bytes) -> None:
        self._call(relative, self.fs.pipe_file, self.path(relative), data)

    def download_file(self, relative: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        self._call(relative, self.fs.get_file, self.path(relative), str(target))

    def upload_file(self, source: Path, relative: str) -> None:
        self._call(relative, self.fs.put_file, str(source), self.path(relative))

    def download_folder(self, relative: str, target: Path, names: list[str] | None = None) -> Path:
        """Copy a folder (or the named files in it) down, whole or not at all: staged, then renamed."""
        names = self.files(relative) if names is None else names
        if not names:
            raise UserError(self.where, f"{join(self.url, relative)}: no such folder", "check the path")
        staged = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            for name in names:
                (staged / name).parent.mkdir(parents=True, exist_ok=True)
            self._call(
                relative,
                self.fs.get,
                [self.path(relative, n) for n in names],
                [str(staged / n) for n in names],
            )
            move_into_place(staged, target)  # a concurrent download of the same files may finish first
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return target

    def upload_folder(self, source: Path, relative: str, replace: bool = True) -> None:
        """Copy a folder's files up (first removing what was there, if `replace`). Not atomic: callers write
        a marker last."""
        if replace and self.exists(relative):
            self._call(relative, self.fs.rm, self.path(relative), recursive=True)
        files = sorted(p for p in source.rglob("*") if p.is_file())
        if files:
            names = [p.relative_to(source).as_posix() for p in files]
            self._call(relative, self.fs.put, [str(p) for p in files], [self.path(relative, n) for n in names])


def is_pattern(path: str) -> bool:
    return any(c in path for c in "*?[")


def file_fingerprint(info: dict[str, Any]) -> str:
    tag = info.get("etag") or info.get("ETag") or info.get("mtime") or info.get("last_modified") or ""
    return f"{str(tag).strip(chr(34))}:{info.get('size')}"


def fetch_files(pattern: str, where: str, storage_options: dict[str, Any] | None, cache_root: Path) -> list[Path]:
    """Local copies of the files a URL or pattern names, each downloaded once per content (ETag and size).

    Our own download rather than `datasets`': that one refuses every URL when HF_HUB_OFFLINE is set, which
    is for the hub, not for a team's own storage.
    """
    fs, path = filesystem(pattern, where, storage_options)
    try:
        names = sorted(fs.expand_path(path)) if is_pattern(path) else [path]
        copies = []
        for name in names:
            info = fs.info(name)
            if info["type"] != "file":
                continue
            copy = cache_root / hash_value([fs.unstrip_protocol(name), file_fingerprint(info)])[:20] / Path(name).name
            if not copy.is_file():
                copy.parent.mkdir(parents=True, exist_ok=True)
                tmp = copy.with_name(f".{copy.name}.tmp-{uuid.uuid4().hex[:8]}")
                try:
                    fs.get_file(name, str(tmp))
                    tmp.replace(copy)
                finally:
                    tmp.unlink(missing_ok=True)
            copies.append(copy)
    except Exception as exc:  # the backend's own errors: no container or blob, access denied
        raise storage_error(exc, pattern, where) from None
    if not copies:
        raise not_found(fs, path, pattern, where)
    return copies
