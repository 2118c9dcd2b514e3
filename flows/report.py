"""The run's outputs in `engine.output_dir` and its report: report.json, report.md, a Prefect artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from olive_grove.flows.config import RunConfig
from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.caching import SOURCE_STAMP, publish_copy
from olive_grove.tasks.storage import Remote, is_url, join


def publish_outputs(outputs: dict[str, Artifact], output_dir: str) -> dict[str, str]:
    """Copy each finished output from the cache to its place in the output folder (local or a URL)."""
    remote = Remote(output_dir, "engine.output_dir") if is_url(output_dir) else None
    published = {}
    for name, artifact in outputs.items():
        if remote:
            _upload_output(remote, Path(artifact.path), name, artifact.fingerprint)
            published[name] = join(output_dir, name)
        else:
            publish_copy(Path(artifact.path), Path(output_dir) / name, artifact.fingerprint)
            published[name] = str(Path(output_dir) / name)
    return published


def _upload_output(remote: Remote, source: Path, name: str, stamp: str) -> None:
    """Blob storage cannot rename a folder into place, so the stamp goes last: present means complete."""
    marker = f"{name}/{SOURCE_STAMP}"
    if remote.exists(marker) and remote.read_bytes(marker).decode() == stamp:
        return
    remote.upload_folder(source, name)
    remote.write_bytes(marker, stamp.encode())


def write_report(
    cfg: RunConfig, record: list[dict[str, Any]], published: dict[str, str], output_dir: str, seconds: float
) -> dict[str, Any]:
    report = {
        "input_model": cfg.input_model.model_path,
        "passes": [f"{name} ({s.type})" for name, s in cfg.passes.items()],
        "steps": record,
        "outputs": published,
        "cached_steps": [s["step"] for s in record if s.get("cached")],
        "total_seconds": round(seconds, 2),
    }
    markdown = render_markdown(report)
    texts = {"report.json": json.dumps(report, indent=2, default=str), "report.md": markdown}
    if is_url(output_dir):
        remote = Remote(output_dir, "engine.output_dir")
        for name, text in texts.items():
            remote.write_bytes(name, text.encode())
    else:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            _write_atomic(Path(output_dir) / name, text)
    _prefect_artifact(markdown)
    return report


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# olive-grove run report", "", f"Base model: `{report['input_model']}`", ""]
    lines += ["| step | task | from cache | seconds | details |", "|---|---|---|---|---|"]
    for step in report["steps"]:
        details = _details(step["metadata"])
        cached = "yes" if step["cached"] else "no"
        lines.append(f"| {step['step']} | {step['task']} | {cached} | {step['seconds']} | {details} |")
    curve = next((s["metadata"].get("loss_curve") for s in report["steps"] if s["metadata"].get("loss_curve")), None)
    if curve:
        lines += ["", "## Training loss", "", "| step | loss |", "|---|---|"]
        lines += [f"| {p['step']} | {p['loss']:.4f} |" for p in curve]
    lines += ["", "## Outputs", ""]
    lines += [f"- `{name}`: {path}" for name, path in report["outputs"].items()]
    lines += ["", f"Total: {report['total_seconds']} s", ""]
    return "\n".join(lines)


def _details(metadata: dict[str, Any]) -> str:
    keys = (
        "quantization",
        "adapter_heldout_loss",
        "merged_heldout_loss",
        "rows",
        "samples",
        "tokens",
        "train_loss",
        "eval_loss",
        "steps",
        "dtype",
        "precision",
        "execution_provider",
        "size_bytes",
    )
    parts = []
    for key in keys:
        if key in metadata:
            value = metadata[key]
            parts.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _prefect_artifact(markdown: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key="finetune-report", description="olive-grove run report")
