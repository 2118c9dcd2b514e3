"""What a run is given before its flow starts: the options a run may change, where this machine keeps step
results and downloads, and the credentials in Prefect blocks. Nothing here imports Prefect (blocks are read
only when a run asks for them), so `grove validate` checks a config in about a second."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, Field

from olive_grove.blocks.azure import AZURE_STORAGE_BLOCK, azure_storage_credentials
from olive_grove.blocks.hub import HF_TOKEN_BLOCK, hf_token
from olive_grove.flows.config import RunConfig, load_run_config
from olive_grove.tasks.files import USER_CACHE
from olive_grove.tasks.step_cache import StepContext, local_copy_of
from olive_grove.tasks.storage import is_url


class RunOptions(BaseModel):
    """What a run may change without editing the config; the Prefect UI shows these as a form."""

    max_steps: int | None = Field(None, gt=0, description="optimizer steps of every training pass")
    learning_rate: float | None = Field(None, gt=0, description="learning rate of every training pass")
    output_dir: str | None = Field(None, description="where outputs go instead of engine.output_dir")
    passes: list[str] | None = Field(
        None, description="stop early: run only the config's first passes, named here (e.g. just the LoRA pass)"
    )
    overrides: list[str] = Field(default_factory=list, description="more KEY=VALUE settings, as grove --set")

    def load(self, config: str) -> tuple[RunConfig, list[str]]:
        training = {"max_steps": self.max_steps, "learning_rate": self.learning_rate}
        training = {k: v for k, v in training.items() if v is not None}
        return load_run_config(config, self.overrides, self.passes, training, self.output_dir)


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
