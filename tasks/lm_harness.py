"""Olive's LMEvaluator: lm-eval-harness tasks, scored through the same model runners as every other
measurement, so a merged Hugging Face model and its int4 ONNX build are scored the same way.

lm-eval is an optional package (`pip install lm-eval`); its tasks read their data through `datasets`, from
the Hugging Face cache or the hub, or from local files named by a task YAML in `include_path`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from olive_grove.tasks.errors import UserError, first_line, nearest

if TYPE_CHECKING:
    from olive_grove.tasks.evaluators import LMEvaluatorSettings
    from olive_grove.tasks.runners import Runner

INSTALL = "pip install lm-eval"


def task_manager(settings: LMEvaluatorSettings):
    """lm-eval's task index with the evaluator's own task folder; a missing package is one line."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("type", "LMEvaluator runs lm-eval-harness tasks, and the lm-eval package is not "
                        "installed here", INSTALL) from None  # fmt: skip
    if settings.include_path and not Path(settings.include_path).is_dir():
        raise UserError("include_path", f"no folder at {settings.include_path}", "a folder of lm-eval task YAMLs")
    if settings.include_path:  # indexing lm-eval's own thousands of tasks takes seconds: only when needed
        local = TaskManager(verbosity="ERROR", include_path=settings.include_path, include_defaults=False)
        if all(name in local.all_tasks for name in settings.tasks):
            return local
    return TaskManager(verbosity="ERROR", include_path=settings.include_path)


def check_tasks(settings: LMEvaluatorSettings) -> None:
    """Before work: the package is here, each task is one lm-eval knows, and its data loads."""
    manager = task_manager(settings)
    from lm_eval.tasks import get_task_dict

    for index, name in enumerate(settings.tasks):
        if name not in manager.all_tasks:
            if settings.include_path:
                check_task_files(Path(settings.include_path))
            raise UserError(f"tasks[{index}]", f"lm-eval has no task {name!r}",
                            nearest(name, manager.all_tasks) or "see `lm-eval ls tasks`")  # fmt: skip
        try:
            loaded = get_task_dict([name], manager)
        except Exception as exc:  # datasets raises many kinds for data it cannot reach
            raise UserError(f"tasks[{index}]", f"lm-eval cannot load the data of {name!r}: "
                            f"{first_line(exc, 160)}", "put it in the Hugging Face datasets cache, or give "
                            "include_path a task over local files") from None  # fmt: skip
        for task_name, task in _tasks(loaded) if settings.num_fewshot else []:
            pool = len(task.fewshot_docs() or [])
            if settings.num_fewshot >= pool:
                raise UserError("num_fewshot", f"is {settings.num_fewshot}, and lm-eval task {task_name!r} has "
                                f"{pool} rows to draw examples from", f"at most {max(pool - 1, 0)}: the row "
                                "asked about is not its own example")  # fmt: skip


def check_task_files(folder: Path) -> None:
    """Each task YAML under include_path loads: lm-eval leaves out one that does not, and its task would only
    be missing."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout: the missing task is said as it is
        return
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as exc:  # YAML's and lm-eval's own errors
            raise UserError("include_path", f"{path} does not load: {type(exc).__name__}: {first_line(exc, 160)}",
                            "fix the task file") from None  # fmt: skip


def _tasks(loaded: dict) -> list[tuple[str, Any]]:
    """The tasks of lm-eval's task dict by name, a group's members included."""
    found = []
    for key, value in loaded.items():
        if isinstance(value, dict):
            found += _tasks(value)
        elif hasattr(value, "fewshot_docs"):
            found.append((getattr(key, "group_name", None) or str(key), value))
    return found


def run_lm_eval(settings: LMEvaluatorSettings, runner: Runner) -> dict[str, float]:
    """Each task's metrics, as `<task>-<metric>` (lm-eval's `acc,none` is `acc`)."""
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=_runner_lm_class()(runner, settings.max_length),
        tasks=settings.tasks,
        task_manager=task_manager(settings),
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        bootstrap_iters=settings.bootstrap_iters,
        apply_chat_template=settings.apply_chat_template,
        system_instruction=settings.system_instruction,
        fewshot_as_multiturn=settings.fewshot_as_multiturn,
        log_samples=False,
        verbosity="ERROR",
    )
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, comma, kind = key.partition(",")  # metrics are `name,filter`; alias and sample_len are not
            if comma and isinstance(value, (int, float)) and not name.endswith("_stderr"):
                flat[f"{task}-{name}" + ("" if kind == "none" else f"-{kind}")] = float(value)
    return flat


def _runner_lm_class():
    """lm-eval's LM over a Runner: log-likelihoods from its logits, generation from its greedy generate."""
    from lm_eval.api.model import LM

    class _RunnerLM(LM):
        def __init__(self, runner: Runner, max_length: int | None) -> None:
            super().__init__()
            self.runner = runner
            self.max_length = max_length or runner.context_length or 2048
            tokenizer = runner.tokenizer
            self.prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def _scored(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
            if not continuation:
                return 0.0, True
            ids = (context + continuation)[-(self.max_length + 1) :]
            continuation = continuation[-(len(ids) - 1) :]  # longer than max_length: its last tokens are scored
            logits = self.runner.logits(ids[:-1])[-len(continuation) :].astype("float64")
            logits -= logits.max(axis=1, keepdims=True)
            log_probs = logits - _log_sum_exp(logits)
            picked = sum(float(log_probs[i, t]) for i, t in enumerate(continuation))
            return picked, all(int(log_probs[i].argmax()) == t for i, t in enumerate(continuation))

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            out = []
            for request in requests:
                context, continuation = request.args
                spaces = len(context) - len(context.rstrip())  # lm-eval's convention: they begin the continuation
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                prompt = self.runner.encode(context) if context else [self.prefix]
                whole = self.runner.encode(context + continuation) if context else []
                if whole[: len(prompt)] != prompt:  # the tokens at the seam merged: score the pieces apart
                    whole = prompt + self.runner.encode(continuation)
                out.append(self._scored(prompt, whole[len(prompt) :]))
            return out

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            for request in requests:
                ids = [self.prefix, *self.runner.encode(request.args[0])]
                total = 0.0
                for start in range(1, len(ids), self.max_length):
                    window = ids[max(0, start - self.max_length) : start + self.max_length]
                    scored = ids[start : start + self.max_length]
                    total += self._scored(window[: len(window) - len(scored)], scored)[0]
                out.append(total)
            return out

        def generate_until(self, requests) -> list[str]:
            out = []
            for request in requests:
                context, options = request.args
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else until
                budget = int(options.get("max_gen_toks", 256))
                prompt = self.runner.encode(context)[-max(self.max_length - budget, 1) :]  # as lm-eval's HFLM cuts
                new = self.runner.generate(prompt, budget)
                text = self.runner.decode(new)
                cut = min((text.index(s) for s in until if s and s in text), default=len(text))
                out.append(text[:cut])
            return out

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.runner.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                             add_generation_prompt=add_generation_prompt)  # fmt: skip

        @property
        def tokenizer_name(self) -> str:
            return str(self.runner.path)

    return _RunnerLM


def _log_sum_exp(logits: Any):
    import numpy as np

    return np.log(np.exp(logits).sum(axis=1, keepdims=True))
