"""The pass table: each entry agrees with the step it names, and the config's pass union comes from it."""

from __future__ import annotations

import inspect
import typing

import pytest

from olive_grove.tasks.artifact import PassSettings
from olive_grove.tasks.passes import PASS_TYPES, PREPARE_DATASET, PassType

ENTRIES = list(PASS_TYPES.values())


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_an_entry_agrees_with_its_step(entry: PassType):
    parameters = inspect.signature(entry.step.run).parameters
    assert list(parameters)[:3] == ["settings", "files", "report"]
    keyword_only = {n for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(entry.takes) <= keyword_only, "the flow hands a step only the inputs it names"
    assert issubclass(entry.settings, PassSettings)
    assert entry.name == entry.settings.model_fields["type"].default
    assert entry.step.version
    assert entry.gives in typing.get_args(typing.get_type_hints(PassType)["gives"])
    folder = entry.output(entry.settings.model_construct(precision="int4", execution_provider="cpu"))
    assert folder or entry.name == "ExtractAdapters"  # it refines the folder of the pass before it


def test_step_names_are_folder_names_and_unique_per_function():
    steps = {e.step for e in ENTRIES} | {PREPARE_DATASET}
    names = [s.name for s in steps]
    assert sorted(names) == sorted(set(names)) == ["build_onnx_model", "extract_adapters", "merge_adapter",
                                                   "prepare_dataset", "train_adapter"]  # fmt: skip


def test_the_config_accepts_exactly_the_table(tmp_path):
    from olive_grove.flows.config import RunConfig

    union = typing.get_args(RunConfig.model_fields["passes"].annotation)[1]
    members = typing.get_args(typing.get_args(union)[0])
    assert set(members) == {e.settings for e in ENTRIES}
