"""Property: whatever a user does to a valid config — wrong types, out-of-range numbers, missing or extra keys,
odd strings and paths, another encoding — `grove validate` says it is valid, or says what is wrong in lines
that each name a key or a file, with exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
from grove_helpers import LLAMA_MODULES, grove, lora_pass, tiny_run_config, tree, write_project
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

ODD_TEXT = ["", "/", "..", "../../etc", "data/tone.json", "az://nobody/x", "{phrase.upper}", "{", "C:\\models",
            "\x00", "é" * 40, "  ", "null", "-1", "LoRA", "MergeAdapterWeights"]  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(ODD_TEXT),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
KINDS = ["replace", "replace", "replace", "delete", "add-key", "rename-key"]


def _paths(node: Any, path: tuple = ()) -> list[tuple]:
    found = [path] if path else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in children:
        found += _paths(value, (*path, key))
    return found


def _mutate(cfg: dict[str, Any], path: tuple, kind: str, value: Any) -> None:
    *parents, leaf = path
    node: Any = cfg
    for part in parents:
        node = node[part]
    if kind == "replace":
        node[leaf] = value
    elif kind == "delete":
        del node[leaf]
    elif kind == "add-key" and isinstance(node[leaf], dict):
        node[leaf][f"extra_{abs(hash(str(value))) % 97}"] = value
    elif kind == "rename-key" and isinstance(node, dict):
        node[f"{leaf}x"] = node.pop(leaf)


@pytest.fixture(scope="module")
def base_config(tiny_llama: Path) -> dict[str, Any]:
    passes = {"lora": lora_pass(LLAMA_MODULES), "merge": {"type": "MergeAdapterWeights"},
              "builder": {"type": "ModelBuilder", "precision": "int4"}}  # fmt: skip
    return tiny_run_config(tiny_llama, passes)


COUNTER = itertools.count()
# CI runs the same 80 mutations each time; GROVE_MUTATIONS=2000 looks harder, with new ones each run.
DEEP = int(os.environ.get("GROVE_MUTATIONS", "0"))


@settings(max_examples=DEEP or 80, derandomize=not DEEP, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_any_mutation_is_valid_or_named_errors(data, base_config: dict[str, Any], tmp_path: Path):
    cfg = json.loads(json.dumps(base_config))
    paths = _paths(cfg)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(cfg)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        _mutate(cfg, path, data.draw(st.sampled_from(KINDS), label="kind"), data.draw(VALUES, label="value"))
    root = tmp_path / f"case-{next(COUNTER)}"
    config = write_project(root, cfg, data.draw(st.sampled_from(["config.json", "config.yaml"]), label="file"))
    encoding = data.draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"]), label="encoding")
    if encoding != "utf-8":
        config.write_bytes(config.read_text().encode(encoding, errors="replace"))
    before = tree(root)

    result = grove("validate", "--config", config)

    assert result.rc in (0, 2), result.err[-3000:]
    assert "Traceback" not in result.err and "Traceback" not in result.out
    assert tree(root) == before, "validate wrote files"
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), lines
    if result.rc == 2:
        assert result.errors, "exit 2 without an error line"
        for line in result.errors:
            where, sep, problem = line.removeprefix("error: ").partition(": ")
            assert sep and where.strip() and problem.strip(), f"an error line that names no key or file: {line!r}"
            assert len(line) < 500, f"an error line that echoes too much: {line[:200]!r}"
