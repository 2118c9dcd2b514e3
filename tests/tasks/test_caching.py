"""Content-addressed step results: keys, whole-or-nothing folders, manifests, published copies, memoised hashes,
locks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from grove_helpers import free_port

from olive_grove.tasks.adapter_settings import LoRASettings
from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.files import hash_files, publish_copy
from olive_grove.tasks.locks import LiveHolderLockManager
from olive_grove.tasks.models import ModelInfo
from olive_grove.tasks.step_cache import (
    HASHED_ON_EVERY_HIT,
    MANIFEST,
    StepContext,
    StepFolder,
    damage,
    library_versions,
    list_cache,
    remove_entry,
    step_key,
)


def _artifact(fingerprint: str, path: str = "/somewhere") -> Artifact:
    return Artifact(path=path, fingerprint=fingerprint, info=ModelInfo(source="local", name=path))


def _ctx(cache_dir: str = "/cache/a", **extra) -> StepContext:
    return StepContext(cache_dir=cache_dir, downloads="/downloads", **extra)


def _key(**overrides) -> str:
    inputs = {
        "settings": LoRASettings(train_data_config="d", r=4),
        "inputs": {"model": _artifact("m1"), "eval_dataset": None},
        "ctx": _ctx(),
    }
    inputs.update(overrides)
    return step_key("train_adapter", "1", inputs)


def test_step_key_is_stable_and_named_by_step():
    assert _key() == _key()
    assert _key().startswith("train_adapter-")


def test_step_key_follows_settings_inputs_and_code():
    assert _key(settings=LoRASettings(train_data_config="d", r=8)) != _key()
    assert _key(inputs={"model": _artifact("m2"), "eval_dataset": None}) != _key()
    assert _key(inputs={"model": _artifact("m1"), "eval_dataset": _artifact("d1")}) != _key()
    assert step_key("train_adapter", "2", {"model": _artifact("m1")}) != step_key(
        "train_adapter", "1", {"model": _artifact("m1")}
    )


def test_step_key_ignores_where_things_are():
    assert _key(ctx=_ctx("/elsewhere", retries=3)) == _key()
    moved = {"model": _artifact("m1", path="/moved"), "eval_dataset": None}
    assert _key(inputs=moved) == _key()  # an artifact counts by its fingerprint


def test_library_versions_are_recorded():
    versions = library_versions()
    assert set(versions) >= {"torch", "transformers", "peft", "datasets", "onnxruntime-genai"}
    assert versions["torch"] != "absent"


# --------------------------------------------------------------------------------------------- folders


def test_step_folder_publishes_whole_folders(tmp_path: Path):
    folder = _ctx(str(tmp_path)).folder("merge_adapter", "merge_adapter-k")
    assert folder.final == tmp_path / "steps" / "merge_adapter" / "merge_adapter-k"
    folder.work.mkdir(parents=True)
    (folder.work / "checkpoint").write_text("scratch")
    staged = folder.staging()
    assert staged.name.startswith(".merge_adapter-k.tmp-") and staged.is_dir()
    (staged / "model.safetensors").write_text("weights")
    assert not folder.final.exists()
    assert folder.publish(staged) == folder.final
    assert (folder.final / "model.safetensors").read_text() == "weights"
    assert not staged.exists() and not folder.work.exists()  # scratch goes once the result is in place
    manifest = json.loads((folder.final / MANIFEST).read_text())["files"]
    assert list(manifest) == ["model.safetensors"] and manifest["model.safetensors"]["size"] == 7


def _published(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = StepFolder(tmp_path / "steps" / "s" / "s-k")
    staged = folder.staging()
    for name, data in files.items():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        (staged / name).write_bytes(data)
    return folder.publish(staged)


def test_a_whole_entry_has_no_damage(tmp_path: Path):
    final = _published(tmp_path, {"adapter_model.safetensors": b"w" * 100, "sub/tokenizer.json": b"{}"})
    assert damage(final) is None and damage(final, thorough=True) is None


@pytest.mark.parametrize(
    ("harm", "problem"),
    [
        (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"w" * 50), "has 50 bytes, not 100"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(os.urandom(100)), "changed since it was cached"),
        (lambda f: (f / MANIFEST).unlink(), "it has no readable manifest"),
        (lambda f: __import__("shutil").rmtree(f), "its files are missing"),
    ],
    ids=["deleted", "truncated", "overwritten", "no-manifest", "folder-gone"],
)
def test_a_damaged_entry_says_what_is_wrong(tmp_path: Path, harm, problem: str):
    final = _published(tmp_path, {"adapter_model.safetensors": b"w" * 100})
    harm(final)
    assert problem in (damage(final) or "")


def test_big_files_are_hashed_when_their_mtime_moved(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("olive_grove.tasks.step_cache.HASHED_ON_EVERY_HIT", 10)
    final = _published(tmp_path, {"model.safetensors": b"a" * 100})
    path = final / "model.safetensors"
    stat = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: not hashed on a hit
    assert damage(final) is None
    assert "changed since it was cached" in damage(final, thorough=True)  # grove cache verify hashes all
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert "changed since it was cached" in damage(final)
    assert HASHED_ON_EVERY_HIT > 1 << 20


def test_a_concurrent_twin_keeps_the_first_result(tmp_path: Path):
    folder = StepFolder(tmp_path / "steps" / "s" / "s-k")
    first = folder.staging()
    (first / "f").write_text("first")
    folder.publish(first)
    second = folder.staging()  # a run that computed the same key again
    (second / "f").write_text("second")
    folder.publish(second)
    assert (folder.final / "f").read_text() == "first"
    assert sorted(p.name for p in folder.final.parent.iterdir()) == ["s-k"]


def test_staging_clears_what_a_dead_run_left(tmp_path: Path):
    folder = StepFolder(tmp_path / "steps" / "s" / "s-k")
    left = folder.staging()
    (left / "half-written").write_text("x")
    fresh = folder.staging()
    assert not left.exists() and fresh.is_dir()


def test_publish_copy_replaces_the_target_with_a_copy(tmp_path: Path):
    source = tmp_path / "cache" / "result"
    source.mkdir(parents=True)
    (source / "model.onnx").write_text("new")
    target = tmp_path / "outputs" / "onnx"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    publish_copy(source, target, "key-1")
    assert sorted(p.name for p in target.iterdir()) == [".olive-grove-source", "model.onnx"]
    assert not os.path.samefile(source / "model.onnx", target / "model.onnx")  # editing it leaves the cache alone
    assert sorted(p.name for p in target.parent.iterdir()) == ["onnx"]  # no temporary leftovers

    (target / "model.onnx").write_text("edited by the user")
    publish_copy(source, target, "key-1")  # the same cache entry again: nothing to copy
    assert (target / "model.onnx").read_text() == "edited by the user"
    assert (source / "model.onnx").read_text() == "new"
    publish_copy(source, target, "key-2")  # another result: replaced
    assert (target / "model.onnx").read_text() == "new"


def test_hash_files_by_content_with_a_memo(tmp_path: Path):
    root = tmp_path / "model"
    root.mkdir()
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(b"\0" * 1000)
    memo = tmp_path / "memo.json"
    first = hash_files(root, memo=memo)
    assert len(json.loads(memo.read_text())) == 2
    assert hash_files(root, memo=memo) == first == hash_files(root)
    (root / "model.safetensors").write_bytes(b"\1" * 1000)
    assert hash_files(root, memo=memo) != first
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in root.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert hash_files(copy) == hash_files(root)  # by relative name and bytes, not location


def test_cache_listing_and_removal(tmp_path: Path):
    steps = tmp_path / "steps" / "train_adapter"
    (steps / "train_adapter-a").mkdir(parents=True)
    (steps / "train_adapter-a" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (steps / "train_adapter-a.work").mkdir()
    (steps / ".train_adapter-b.tmp-1234").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "train_adapter-a").write_text("{}")
    [entry] = list_cache(tmp_path)
    assert (entry.step, entry.key, entry.size_bytes) == ("train_adapter", "train_adapter-a", 100)
    remove_entry(entry)
    assert not (tmp_path / "results" / "train_adapter-a").exists()
    assert sorted(p.name for p in steps.iterdir()) == [".train_adapter-b.tmp-1234"]
    assert list_cache(tmp_path) == []


# ----------------------------------------------------------------------------------------------- locks


def test_a_lock_whose_holder_died_is_free(tmp_path: Path):
    """After a kill -9 mid-step, the next run must not wait forever on the dead run's lock."""
    holder = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from olive_grove.tasks.locks import LiveHolderLockManager
        manager = LiveHolderLockManager(lock_files_directory=Path({str(tmp_path)!r}))
        assert manager.acquire_lock("train_adapter-k", holder="dead-run")
        os._exit(0)  # dies holding the lock
        """
    )
    subprocess.run([sys.executable, "-c", holder], check=True, timeout=300)
    assert list(tmp_path.iterdir()), "the dead run left its lock file"
    manager = LiveHolderLockManager(lock_files_directory=tmp_path)
    assert not manager.is_locked("train_adapter-k")
    assert manager.acquire_lock("train_adapter-k", holder="next-run", acquire_timeout=5)
    manager.release_lock("train_adapter-k", holder="next-run")


def test_a_live_holders_lock_is_held(tmp_path: Path):
    mine = LiveHolderLockManager(lock_files_directory=tmp_path)
    assert mine.acquire_lock("k", holder="this-run")
    other = LiveHolderLockManager(lock_files_directory=tmp_path)
    assert other.is_locked("k")
    assert not other.acquire_lock("k", holder="other-run", acquire_timeout=0.5)
    mine.release_lock("k", holder="this-run")
    assert not other.is_locked("k")


def test_a_redis_lock_lasts_while_its_holder_lives_and_frees_itself_when_it_dies(redis_url: str):
    """Machines sharing a cache lock steps in Redis: a long step keeps its lock (renewed), a killed worker's
    lock expires instead of blocking every later run."""
    holder = textwrap.dedent(
        f"""
        import sys, time
        from olive_grove.tasks import locks
        locks.REDIS_HOLD_SECONDS, locks.REDIS_RENEW_SECONDS = 2, 0.5
        manager = locks.RenewedRedisLockManager(host="127.0.0.1", port={redis_url.rsplit(":", 1)[1].split("/")[0]})
        assert manager.acquire_lock("train_adapter-k", holder="machine-a")
        print("held", flush=True)
        time.sleep(600)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        from olive_grove.blocks.locks import redis_locks, save_redis_locks

        save_redis_locks(redis_url, "test-locks")
        other = redis_locks("test-locks")
        # Three hold times pass: without renewal the lock would have expired.
        assert not other.acquire_lock("train_adapter-k", holder="machine-b", acquire_timeout=6)
        process.kill()
        assert other.acquire_lock("train_adapter-k", holder="machine-b", acquire_timeout=5)
        other.release_lock("train_adapter-k", holder="machine-b")
    finally:
        process.kill()


@pytest.mark.slow
def test_redis_going_away_while_a_step_holds_its_lock_costs_the_lock_not_the_step(redis_url: str, caplog):
    """A fourth prober's find: Redis shut down mid-training failed the finished step at its commit, with
    redis tracebacks, and threw the trained result away."""
    from olive_grove.tasks.errors import UserError
    from olive_grove.tasks.locks import RenewedRedisLockManager

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    manager = RenewedRedisLockManager(host="127.0.0.1", port=port)
    assert manager.acquire_lock("train_adapter-k", holder="me")
    with contextlib.suppress(Exception):  # the server closes the connection as it stops
        manager.client.shutdown(nosave=True)
    manager.release_lock("train_adapter-k", holder="me")  # a warning, not an error
    assert "could not be let go" in caplog.text
    assert not manager.is_locked("train_adapter-k")
    with pytest.raises(UserError, match=r"^block olive-grove-locks: Redis at 127.0.0.1:\d+ does not answer"):
        manager.acquire_lock("merge_adapter-k", holder="me")


def test_a_redis_block_that_does_not_answer_is_one_line():
    from olive_grove.blocks.locks import redis_locks, save_redis_locks
    from olive_grove.tasks.errors import UserError

    save_redis_locks(f"redis://127.0.0.1:{free_port()}/0", "test-locks-down")
    with pytest.raises(UserError, match=r"^block test-locks-down: Redis at 127.0.0.1:\d+ does not answer"):
        redis_locks("test-locks-down")
    with pytest.raises(UserError, match="is not a Redis URL"):
        save_redis_locks("localhost:6379")


def test_a_copy_without_its_times_is_hashed_once_then_trusted(tmp_path: Path, monkeypatch):
    """cp -r gives every file a new mtime: the first hit hashes the big ones, later hits need not."""
    monkeypatch.setattr("olive_grove.tasks.step_cache.HASHED_ON_EVERY_HIT", 10)
    final = _published(tmp_path, {"model.safetensors": b"a" * 100})
    os.utime(final / "model.safetensors", ns=(1, 1))
    hashed = []
    monkeypatch.setattr("olive_grove.tasks.step_cache.hash_file", lambda path: hashed.append(path) or _hash(path))
    assert damage(final) is None and damage(final) is None
    assert len(hashed) == 1


def _hash(path: Path) -> str:
    from olive_grove.tasks.files import hash_file

    return hash_file(path)


def test_an_added_file_or_a_file_instead_of_the_folder_is_damage(tmp_path: Path):
    final = _published(tmp_path, {"adapter_model.safetensors": b"w" * 10})
    (final / "notes.txt").write_text("added later")
    assert damage(final) == "notes.txt was added since it was cached"
    import shutil

    shutil.rmtree(final)
    final.write_text("junk")
    assert damage(final) == "it is not a folder"
    [entry] = list_cache(tmp_path)  # listed, so `grove cache verify` and `prune` see it
    remove_entry(entry)
    assert not final.exists()
