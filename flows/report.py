"""The run's outputs in `engine.output_dir` and its report: report.json, report.md, a Prefect artifact."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.runtime import flow_run
from pydantic import BaseModel, SerializeAsAny

from olive_grove.flows.config import RunConfig
from olive_grove.flows.loss_plot import loss_svg
from olive_grove.tasks.adapters import AdapterInfo, LossPoint
from olive_grove.tasks.artifact import Artifact, StepInfo
from olive_grove.tasks.evaluators import EvaluationInfo
from olive_grove.tasks.files import SOURCE_STAMP, publish_copy
from olive_grove.tasks.quality import QualityInfo, agreement
from olive_grove.tasks.storage import Remote, is_url, join

if TYPE_CHECKING:
    from olive_grove.flows.finetune import StepRunner

LOSS_PICTURE = "loss.svg"
LOSS_TABLE_ROWS = 20  # the report's loss table: at most about this many steps, always the last


class StepRecord(BaseModel):
    """What one step of a run did, for the report."""

    step: str  # the pass (or pass/dataset) it ran for
    task: str
    cached: bool
    seconds: float
    artifact: Artifact[SerializeAsAny[StepInfo]]

    def as_json(self) -> dict[str, Any]:
        info = self.artifact.info.model_dump(mode="json", exclude_none=True)
        return {"step": self.step, "task": self.task, "cached": self.cached, "seconds": self.seconds,
                "path": self.artifact.path, "info": info}  # fmt: skip


def publish_outputs(outputs: dict[str, Artifact], output_dir: str, cache_dir: Path) -> dict[str, str]:
    """Copy each finished output from the cache to its place in the output folder (local or a URL)."""
    remote = Remote(output_dir, "engine.output_dir") if is_url(output_dir) else None
    published = {}
    for name, artifact in outputs.items():
        source = Path(artifact.located(cache_dir).path)
        if remote:
            _upload_output(remote, source, name, artifact.fingerprint)
            published[name] = join(output_dir, name)
        else:
            publish_copy(source, Path(output_dir) / name, artifact.fingerprint)
            published[name] = str(Path(output_dir) / name)
    return published


def _upload_output(remote: Remote, source: Path, name: str, stamp: str) -> None:
    """Blob storage cannot rename a folder into place, so the stamp goes last: present means complete."""
    marker = f"{name}/{SOURCE_STAMP}"
    if remote.exists(marker) and remote.read_bytes(marker).decode() == stamp:
        return
    remote.upload_folder(source, name)
    remote.write_bytes(marker, stamp.encode())


def write_report(cfg: RunConfig, steps: StepRunner, published: dict[str, str], output_dir: str,
                 seconds: float) -> dict[str, Any]:  # fmt: skip
    record = steps.record
    report = {
        "flow_run": {"name": flow_run.name, "id": flow_run.id},
        "input_model": cfg.input_model.model_path,
        "passes": [f"{name} ({s.type})" for name, s in cfg.passes.items()],
        "steps": [r.as_json() for r in record],
        "outputs": published,
        "cached_steps": [r.step for r in record if r.cached],
        "quality": quality(record),
        "evaluation": evaluation(record),
        "not_measured": steps.not_measured,
        "total_seconds": round(seconds, 2),
    }
    adapter = trained_adapter(record)
    picture = loss_svg(adapter.loss_curve, _evaluation(adapter)) if adapter else None
    texts = {"report.json": json.dumps(report, indent=2, default=str),
             "report.md": render_markdown(report, record, LOSS_PICTURE if picture else None)}  # fmt: skip
    if picture:
        texts[LOSS_PICTURE] = picture
    if is_url(output_dir):
        remote = Remote(output_dir, "engine.output_dir")
        for name, text in texts.items():
            remote.write_bytes(name, text.encode())
    else:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            _write_atomic(Path(output_dir) / name, text)
    # The run page has no folder to find loss.svg in: its copy of the report carries the picture inline.
    inline = f"data:image/svg+xml;base64,{base64.b64encode(picture.encode()).decode()}" if picture else None
    _prefect_artifact(render_markdown(report, record, inline))
    return report


def quality(record: list[StepRecord]) -> dict[str, dict[str, Any]]:
    """Each measured model's held-out loss and perplexity, and how often its greedy next token is the merged
    model's (for ONNX models: what conversion and int4 changed), by its output folder (or `base`)."""
    measured = {r.step.removeprefix("quality/"): r for r in record if isinstance(r.artifact.info, QualityInfo)}
    reference = measured.get("merged")
    table = {}
    for name, step in measured.items():
        info = step.artifact.info
        row = {
            "heldout_loss": round(info.heldout_loss, 4),
            "perplexity": round(info.perplexity, 3),
            "tokens": info.tokens,
        }
        if reference is not None and name != "merged":
            share = agreement(Path(step.artifact.path) / info.predictions,
                              Path(reference.artifact.path) / reference.artifact.info.predictions)  # fmt: skip
            row["agrees_with_merged"] = None if share is None else round(share, 4)
        table[name] = row
    return table


def evaluation(record: list[StepRecord]) -> dict[str, dict[str, dict[str, float]]]:
    """Each evaluator's results as one table: metric (Olive's `<metric>-<sub type>`) by model."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for step in record:
        info = step.artifact.info
        if isinstance(info, EvaluationInfo):
            model = step.step.removeprefix(f"evaluate/{info.evaluator}/")
            table = tables.setdefault(info.evaluator, {})
            for key, value in info.metrics.items():
                table.setdefault(key, {})[model] = value
    return tables


def trained_adapter(record: list[StepRecord]) -> AdapterInfo | None:
    """The first adapter step of the run with a loss curve: the one the report draws."""
    return next((s.artifact.info for s in record if isinstance(s.artifact.info, AdapterInfo)
                 and s.artifact.info.loss_curve), None)  # fmt: skip


def _evaluation(adapter: AdapterInfo) -> list[LossPoint]:
    """Eval loss during training, else the held-out loss measured at the end (a last point)."""
    if adapter.eval_curve or adapter.eval_loss is None or not adapter.steps:
        return adapter.eval_curve
    return [LossPoint(step=adapter.steps, loss=adapter.eval_loss)]


def render_markdown(report: dict[str, Any], record: list[StepRecord], picture: str | None = None) -> str:
    """The report for people: steps, the loss curve (`picture`: where its SVG is), outputs."""
    run = report["flow_run"]
    lines = ["# olive-grove run report", "", f"Flow run `{run['name']}`; base model `{report['input_model']}`", ""]
    lines += ["| step | task | from cache | seconds | details |", "|---|---|---|---|---|"]
    for step in record:
        cached = "yes" if step.cached else "no"
        lines.append(f"| {step.step} | {step.task} | {cached} | {step.seconds} | {step.artifact.info.summary()} |")
    adapter = trained_adapter(record)
    curve = adapter.loss_curve if adapter else None
    if curve:
        lines += ["", "## Training loss", ""]
        lines += [f"![train and eval loss by step]({picture})", ""] if picture else []
        lines += ["| step | loss |", "|---|---|"]
        lines += [f"| {p.step} | {p.loss:.4f} |" for p in _table_points(curve)]
    if report["quality"]:
        lines += ["", "## Quality on held-out samples", ""]
        lines += ["| model | held-out loss | perplexity | next token as merged |", "|---|---|---|---|"]
        for name, row in report["quality"].items():
            agrees = row.get("agrees_with_merged")
            shown = "—" if agrees is None else f"{agrees:.1%}"
            lines.append(f"| {name} | {row['heldout_loss']:.4f} | {row['perplexity']:.2f} | {shown} |")
        lines += ["", f"On the trained adapter's held-out samples ({next(iter(report['quality'].values()))['tokens']}"
                  " labelled tokens); `base` is the model before fine-tuning."]  # fmt: skip
    for name, table in report["evaluation"].items():
        models = list(dict.fromkeys(m for row in table.values() for m in row))
        lines += ["", f"## Evaluation: {name}", "", "| metric | " + " | ".join(models) + " |",
                  "|---" * (len(models) + 1) + "|"]  # fmt: skip
        lines += [f"| {key} | " + " | ".join(_number(row.get(m)) for m in models) + " |" for key, row in table.items()]
    if report["not_measured"]:
        lines += ["", "Not measured on this machine: "
                  + "; ".join(f"`{m}` ({why})" for m, why in report["not_measured"].items())]  # fmt: skip
    lines += ["", "## Outputs", ""]
    lines += [f"- `{name}`: `{path}`" for name, path in report["outputs"].items()]  # code: `_` in a path stays
    lines += ["", f"Total: {report['total_seconds']} s", ""]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"


def _table_points(curve: list[LossPoint]) -> list[LossPoint]:
    """About LOSS_TABLE_ROWS evenly spaced steps, and always the last (report.json and the picture have all)."""
    shown = curve[:: -(-len(curve) // LOSS_TABLE_ROWS)]
    return shown if shown[-1] is curve[-1] else [*shown, curve[-1]]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _prefect_artifact(markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    # No key: a keyed artifact opens the history of every report under that key, not this run's.
    create_markdown_artifact(markdown=markdown, description="olive-grove run report: steps, loss, outputs")
