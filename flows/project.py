"""Project scaffolding (`grove init`) and the text a tiny model's tokenizer learns from."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

from olive_grove.tasks.errors import UserError

TEMPLATES = Path(__file__).parent / "templates"
# The folders of Olive's E2E sample, and what each is for.
PROJECT_FOLDERS = {
    "datasets": "training data (JSON Lines: one object per row)",
    "fine-tuning": "olive-config.json: run it with `grove run --config olive-config.json`",
    "inferences": "prompts.txt: try them with "
    "`grove infer ../model-cache/models/phi3-finetuned/onnx/int4-cuda --prompts-file prompts.txt`",
    "model-cache": "base models you download, step cache, and finished outputs (models/)",
    "gen-model": "ONNX models you ship",
    "setup": "environment notes: `pip install olive-grove` (see the olive-grove README)",
}


def init_project(root: Path) -> list[Path]:
    """Create the E2E sample's layout with a runnable config and the tone dataset; never overwrite."""
    if root.exists() and not root.is_dir():
        raise UserError(str(root), "is a file", "choose a new folder")
    if root.exists() and any(root.iterdir()):
        raise UserError(str(root), "is not empty", "choose a new folder")
    try:
        return _lay_out(root)
    except OSError as exc:
        raise UserError(
            str(root), f"cannot be made here ({exc.strerror}: {exc.filename})", "choose a folder you can write"
        ) from None


def _lay_out(root: Path) -> list[Path]:
    written = []
    for folder, purpose in PROJECT_FOLDERS.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        readme = root / folder / "README.md"
        readme.write_text(f"# {folder}\n\n{purpose}\n")
        written.append(readme)
    written.append(Path(shutil.copy(TEMPLATES / "olive-config.json", root / "fine-tuning" / "olive-config.json")))
    dataset = root / "datasets" / "dataset-classification.json"
    written.append(Path(shutil.copy(TEMPLATES / "dataset-classification.json", dataset)))
    prompts = root / "inferences" / "prompts.txt"
    prompts.write_text(json.dumps("### Text: The storm knocked out our power all night.\n### The tone is:\n") + "\n")
    written.append(prompts)
    return written


def corpus_lines(files: list[Path]) -> Iterator[str]:
    """Lines of text files, or every string value of JSON Lines rows; the tone dataset by default."""
    for path in files or [TEMPLATES / "dataset-classification.json"]:
        if not path.is_file():
            raise UserError(str(path), "no such corpus file")
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = line
            if isinstance(row, dict):
                yield from (str(v) for v in row.values())
            else:
                yield str(row)
