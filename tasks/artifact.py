"""What steps hand each other, and what a step is handed: where files are, what they hold, where to report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from olive_grove.tasks.models import ModelFacts


class StepInfo(BaseModel):
    """What a step tells later steps and the report about its output; each step has its own kind."""

    model_config = ConfigDict(extra="forbid")

    seconds: float | None = None

    def summary(self) -> str:
        """`key value` pairs for the report's table: every scalar that was measured."""
        parts = []
        for key, value in self.model_dump(exclude_none=True).items():
            if key == "seconds" or isinstance(value, list):
                continue
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
        return ", ".join(parts)


InfoT = TypeVar("InfoT", bound=StepInfo)


def no_effect(why: str = "") -> Any:
    """A key Olive has that changes nothing here: accepted whatever its value, and named once in the log."""
    return Field(None, json_schema_extra={"no_effect": why})


class Settings(BaseModel):
    """A section of the run config: unknown keys are errors, and values keep their types (`r: true` is not
    a rank of 1, `"5"` is not a count)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class PassSettings(Settings):
    """A pass's settings, as the config writes them under `passes.<name>`."""

    evaluator: str | dict[str, Any] | None = Field(
        None, description="evaluates this pass's model: an evaluators name, or one in place; default: the engine's"
    )
    host: Any = no_effect("the flow runs all passes on the work pool of engine.host")
    clean_run_cache: Any = no_effect("steps are cached by content: a changed input or setting computes again")
    output_name: Any = no_effect("outputs are named by the pass (see engine.output_dir's layout)")

    # Settings that change nothing the step produces: left out of its cache key.
    not_in_cache_key: ClassVar[frozenset[str]] = frozenset()

    def cache_view(self) -> dict[str, Any]:
        """The settings that decide the step's output, for its cache key."""
        unused = {n for n, f in type(self).model_fields.items() if isinstance(f.json_schema_extra, dict)
                  and "no_effect" in f.json_schema_extra}  # fmt: skip
        return self.model_dump(mode="json", exclude=unused | self.not_in_cache_key | {"evaluator"})

    def data_config_names(self) -> dict[str, str]:
        """The data configs the pass reads, by the key that names them; none by default."""
        return {}

    def datasets(self, data_configs: dict[str, Any], fingerprints: dict[str, str]) -> dict[str, Any]:
        """The dataset steps the pass needs, by the name of the step input they become; none by default."""
        return {}

    def check_before_work(self, model: ModelFacts) -> None:
        """Raise a UserError for what would fail later; `model` tells what is known of the base model."""


class Artifact(BaseModel, Generic[InfoT]):
    """A step's output on disk. Models and datasets travel by path, never pickled into a Prefect result.

    A cached step's result names its folder relative to the cache folder, so a cache that moved (or came
    from another machine) still points at its files; inputs from outside the cache have absolute paths.
    """

    path: str
    fingerprint: str
    info: InfoT

    def located(self, cache_dir: Path) -> Artifact[InfoT]:
        """The same artifact with an absolute path."""
        return self if Path(self.path).is_absolute() else self.model_copy(update={"path": str(cache_dir / self.path)})


@dataclass(frozen=True)
class StepFiles:
    """Where a step writes: `out` is moved into the cache whole once the step succeeds; `work` survives
    a failed try (training checkpoints live there); `downloads` holds local copies of remote inputs."""

    out: Path
    work: Path
    downloads: Path


@dataclass(frozen=True)
class TrainingProgress:
    """One optimizer step's progress, as a person watching a run wants to see it."""

    step: int
    total: int
    loss: float | None = None
    eval_loss: float | None = None
    elapsed_seconds: float = 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.step / max(self.total, 1)

    @property
    def seconds_left(self) -> float | None:
        if self.step <= 0:
            return None
        return self.elapsed_seconds / self.step * (self.total - self.step)

    def line(self) -> str:
        parts = [f"step {self.step}/{self.total}"]
        for name, value in (("loss", self.loss), ("eval loss", self.eval_loss)):
            if value is not None and math.isfinite(value):
                parts.append(f"{name} {value:.4f}")
        left = self.seconds_left
        if left is not None:
            parts.append(f"{left:.0f} s left")
        return ", ".join(parts)


class Reporter:
    """Where a step says what it is doing. This one prints; the Prefect steps log and update artifacts."""

    def log(self, message: str) -> None:
        print(message)

    def progress(self, update: TrainingProgress) -> None:
        pass
