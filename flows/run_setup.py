"""What a run is given before its flow starts: the options a run may change, where this machine keeps step
results and downloads, and the credentials in Prefect blocks. Nothing here imports Prefect (blocks are read
only when a run asks for them), so `grove validate` checks a config in about a second."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from olive_grove.blocks.azure import AZURE_STORAGE_BLOCK, azure_storage_credentials
from olive_grove.blocks.hub import HF_TOKEN_BLOCK, hf_token
from olive_grove.flows.config import RunConfig, load_run_config
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.files import USER_CACHE
from olive_grove.tasks.step_cache import StepContext, local_copy_of
from olive_grove.tasks.storage import is_url, join


class RunOptions(BaseModel):
    """What a run may change without editing the config: the `finetune` flow's parameters after `config`,
    which the Prefect UI shows as the run form's fields (described in the flow's docstring)."""

    # The flow's parameters say "the config's" with a zero or an empty value, not None: the run form then
    # shows each as a plain field, instead of a None/value switch to click first.

    max_steps: int | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    output_dir: str | None = None
    passes: list[str] | None = None
    overrides: list[str] = Field(default_factory=list)

    @classmethod
    def from_form(cls, **values: Any) -> RunOptions:
        """The options a run was given as the flow's parameters; a negative number is one line naming it."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v not in (0, "", (), [], None)})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise UserError(where, f"{error['msg'].lower()} (got {error['input']!r})") from None

    def as_parameters(self) -> dict[str, Any]:
        """The flow's parameters for these options (the unset ones left out: their defaults mean unset)."""
        return self.model_dump(exclude_defaults=True)

    def load(self, config: str | dict[str, Any]) -> tuple[RunConfig, list[str]]:
        config = _as_object_if_json(config)
        training = {"max_steps": self.max_steps, "learning_rate": self.learning_rate}
        training = {k: v for k, v in training.items() if v is not None}
        return load_run_config(config, self.overrides, self.passes, training, self.output_dir)


def _as_object_if_json(config: str | dict[str, Any]) -> str | dict[str, Any]:
    """A config pasted as JSON text where a path or an object was expected (a form, a script) is the object."""
    if not isinstance(config, str) or not config.lstrip().startswith("{"):
        return config
    try:
        return json.loads(config)
    except json.JSONDecodeError as exc:
        problem = f"is JSON text that does not parse ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise UserError(
            "config", problem, "give the config as an object, or the path of a file on the worker"
        ) from None


def deployed_run_folder(cfg: RunConfig, options: RunOptions, run_name: str, run_id: str) -> str:
    """Where a run started from a deployment publishes: the output_dir it was given, else a folder of its own
    under engine.output_dir, so a later run never replaces what an earlier run's report points at."""
    if options.output_dir:
        return cfg.engine.output_dir
    return join(cfg.engine.output_dir, "runs", f"{run_name}-{run_id[-8:]}")


@contextlib.contextmanager
def credentials_for(cfg: RunConfig, log: Callable[..., None]) -> Iterator[None]:
    """The credentials in Prefect blocks, handed to the libraries that need them, for this run only."""
    with contextlib.ExitStack() as stack:
        if any(system.hf_token for system in cfg.systems.values()):
            if stack.enter_context(hf_token()):
                log("hub downloads use the token in Secret block '%s'", HF_TOKEN_BLOCK)
            else:
                log("no Secret block '%s': hub downloads use HF_TOKEN or your Hugging Face login", HF_TOKEN_BLOCK)
        if cfg.uses_azure_storage() and stack.enter_context(azure_storage_credentials()):
            log("Azure Storage is reached with the credentials in block '%s'", AZURE_STORAGE_BLOCK)
        yield


def step_context(cfg: RunConfig) -> StepContext:
    """Where this machine keeps step results and downloads (read from the environment here, at the edge).

    Steps work in a local cache folder; a cache_dir URL is shared through this machine's copy of it.
    """
    cache_dir, shared_url = cfg.engine.cache_dir, None
    if is_url(cache_dir):
        copies = Path(os.environ.get("OLIVE_GROVE_LOCAL_CACHE") or USER_CACHE / "shared")
        cache_dir, shared_url = str(local_copy_of(cache_dir, copies)), cache_dir
    return StepContext(
        cache_dir=cache_dir,
        shared_url=shared_url,
        downloads=os.environ.get("OLIVE_GROVE_DOWNLOADS") or str(USER_CACHE),
        retries=cfg.engine.retries,
        retry_delay_seconds=cfg.engine.retry_delay_seconds,
    )
