"""Reading what the user wrote — a config file and `--set KEY=VALUE` overrides — with bounds on what is read.

A config is small: a bigger file, a deeper nesting, more values (a YAML alias bomb), a key given twice,
a number that is not finite or a huge string is a mistake to report, before anything tries to use it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from olive_grove.tasks.errors import UserError, UserErrors

MAX_CONFIG_BYTES = 1 << 20
MAX_VALUES = 100_000  # after YAML aliases are expanded
MAX_DEPTH = 32
MAX_TEXT = 65_536  # characters in any one string
MAX_ERRORS = 20


class _KeyedTwice(dict):
    """A mapping in which the file gave a key more than once (JSON and YAML both keep the last)."""

    twice: list[str]


def _mapping(pairs: list[tuple[Any, Any]]) -> dict:
    mapping = _KeyedTwice(pairs)
    seen: set[Any] = set()
    mapping.twice = [str(k) for k, _ in pairs if k in seen or seen.add(k)]
    return mapping if mapping.twice else dict(pairs)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, keeping note of keys given twice."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        explicit = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        self.flatten_mapping(node)  # `<<: *defaults` first, then the mapping's own keys, which win
        merged = [(self.construct_object(k, deep), self.construct_object(v, deep)) for k, v in node.value]
        mapping = _mapping(merged[len(node.value) - len(explicit) :])
        return {**dict(merged), **mapping} if not isinstance(mapping, _KeyedTwice) else mapping


_Loader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, lambda loader, node: loader.construct_mapping(node, deep=True)
)


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's mapping: JSON by the `.json` suffix, else YAML; one error per problem found in it."""
    where = str(path)
    if path.is_dir():
        raise UserError(where, "is a folder, not a config file", "give the JSON or YAML file inside it")
    if not path.is_file():
        at = "" if path.is_absolute() else f" at {path.absolute()}"
        raise UserError(where, f"no such config file{at}", "give its path on the machine that runs the flow")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(where, f"is {size:,} bytes; a run config is at most {MAX_CONFIG_BYTES:,}", "is this a config?")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Notepad starts UTF-8 files with a BOM
    except UnicodeDecodeError as exc:
        raise UserError(where, f"is not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})",
                        "save it as UTF-8") from None  # fmt: skip
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        raw = json.loads(text, object_pairs_hook=_mapping) if kind == "JSON" else yaml.load(text, Loader=_Loader)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError, TypeError) as exc:
        raise UserError(where, f"not valid {kind}: {shown_text(str(exc).splitlines()[0], 200)}") from None
    return checked_mapping(raw, where)


def checked_mapping(raw: Any, where: str) -> dict[str, Any]:
    """A config's top level as read from a file or given as an object (`where` names it in errors)."""
    if not isinstance(raw, dict):
        raise UserError(where, "the config must be a mapping at the top level")
    errors = value_errors(raw, "")
    if errors:
        raise UserErrors([e if e.where else UserError(where, e.problem, e.hint) for e in errors])
    return _unshared(raw)


def _unshared(node: Any) -> Any:
    """A copy in which YAML aliases are copies too: `--set` on one place changes that place only."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    return [_unshared(v) for v in node] if isinstance(node, list) else node


def value_errors(root: Any, where: str) -> list[UserError]:
    """What is wrong with a parsed value, walked with a budget (shared YAML aliases count each time)."""
    errors: list[UserError] = []
    budget = [MAX_VALUES]
    stack: list[tuple[Any, str, int]] = [(root, where, 0)]
    while stack and len(errors) < MAX_ERRORS:
        node, path, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            return [
                UserError(
                    where, f"holds more than {MAX_VALUES:,} values", "YAML aliases that expand? a config is small"
                )
            ]
        if depth > MAX_DEPTH:
            return [UserError(path, f"nests deeper than {MAX_DEPTH} levels")]
        if isinstance(node, _KeyedTwice):
            for key in node.twice:
                errors.append(
                    UserError(path, f"'{key}' is given twice", "the file would keep only the last: remove one")
                )
        if isinstance(node, dict):
            for key, value in reversed(list(node.items())):
                stack.append((value, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(node, list):
            for index in reversed(range(len(node))):
                stack.append((node[index], f"{path}[{index}]", depth + 1))
        elif isinstance(node, float) and not math.isfinite(node):
            errors.append(UserError(path, f"{node} is not a finite number", "give a number"))
        elif isinstance(node, str) and len(node) > MAX_TEXT:
            errors.append(UserError(path, f"is {len(node):,} characters long; a config value is at most {MAX_TEXT:,}"))
        elif isinstance(node, str) and "\x00" in node:
            errors.append(UserError(path, "holds a NUL character", "no path or name can"))
    return errors


def shown_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> None:
    """`a.b.c=value` sets a key of the normalised config (`data_configs.0.name` or `data_configs[0].name`, the
    form errors name keys in, indexes a list).

    The value is read as YAML: 5, true and [a, b] keep their types.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        where = f"--set {shown_text(key, 100)}"
        if not sep or not key:
            raise UserError(f"--set {shown_text(item, 100)}", "expected KEY=VALUE",
                            "for example passes.lora.training_args.max_steps=5")  # fmt: skip
        parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
        if not all(parts):
            raise UserError(where, "has an empty part between dots", "name each key: passes.lora.r=8")
        try:
            value = yaml.load(text, Loader=_Loader) if text else ""
        except yaml.YAMLError as exc:
            raise UserError(where, f"the value is not valid YAML: {shown_text(str(exc).splitlines()[0], 120)}",
                            "quote it: --set 'KEY=\"text\"'") from None  # fmt: skip
        if "storage_options" in parts or _mentions(value, "storage_options"):
            raise UserError(where, "storage options may hold secrets, and overrides are kept with the run's parameters",
                            "put them in the config file or the environment")  # fmt: skip
        errors = value_errors(value, where)
        if errors:
            raise UserErrors(errors)
        *parents, leaf = parts
        node: Any = cfg
        for part in parents:
            node = _child(node, part, where)
        if isinstance(node, list):
            node[_index(node, leaf, where)] = value
        elif isinstance(node, dict):
            node[leaf] = value
        else:
            raise UserError(where, f"'{parts[-2]}' is a value, not a section")


def _mentions(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_mentions(v, key) for v in value.values())
    return isinstance(value, list) and any(_mentions(v, key) for v in value)


def _child(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise UserError(where, f"'{part}' is inside a value, not a section")
    if not isinstance(node.get(part), (dict, list)):
        node[part] = {}
    return node[part]


def _index(node: list[Any], part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(where, f"'{part}' is not an index of a {len(node)}-entry list")
    return int(part)
