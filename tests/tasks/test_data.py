"""The dataset step: templates, Olive's join and line-by-line strategies, eval splits, file formats."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from grove_helpers import TONE_DATASET, TONE_TEMPLATE, Recorder, model_artifact, step_files, tone_rows

from olive_grove.tasks.data import (
    IGNORE_INDEX,
    DataConfig,
    DatasetInfo,
    DatasetSettings,
    TextSettings,
    fingerprint_data,
    prepare_dataset,
    render_template,
    row_text,
    template_fields,
    tokenize_rows,
)
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import load_tokenizer

QA_TEMPLATE = "<|user|>\n{Question}<|end|>\n<|assistant|>\n{Best Answer}\n<|end|>"
QA_ROWS = [
    {"Question": "What is the capital of France?", "Best Answer": "Paris"},
    {"Question": "How many legs has a spider?", "Best Answer": "Eight"},
    {"Question": "Which planet is red?", "Best Answer": "Mars"},
    {"Question": "What do bees make?", "Best Answer": "Honey"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3: Path):
    return load_tokenizer(str(tiny_phi3))


def _prepare(config: DataConfig, model: Path, out: Path, eval_dataset_size=None, seed=42) -> DatasetInfo:
    settings = DatasetSettings(data=config, files_fingerprint="", eval_dataset_size=eval_dataset_size, seed=seed)
    return prepare_dataset(settings, step_files(out, out), Recorder(), model=model_artifact(model))


def _config(files, data_name: str = "json", load: dict | None = None, **text) -> DataConfig:
    return DataConfig.model_validate(
        {
            "name": "d",
            "load_dataset_config": {"data_name": data_name, "data_files": files, **(load or {})},
            "pre_process_data_config": text,
        }
    )


def _tone_config(**text) -> DataConfig:
    settings = {"text_cols": ["phrase", "tone"], "text_template": TONE_TEMPLATE, "max_seq_len": 64, **text}
    return _config(str(TONE_DATASET), **settings)


# ----------------------------------------------------------------------------------------------- templates


def test_template_column_with_a_space():
    assert render_template("Q: {Question}\nA: {Best Answer}", QA_ROWS[0]) == (
        "Q: What is the capital of France?\nA: Paris"
    )
    assert template_fields(QA_TEMPLATE, "t") == ["Question", "Best Answer"]


def test_template_values_are_never_formatted_again():
    """A row's own braces stay text: substitution, not str.format on user data."""
    row = {"phrase": "{tone} and {0} and {phrase.__class__}", "tone": "Joy"}
    assert render_template("{phrase} -> {tone}", row) == "{tone} and {0} and {phrase.__class__} -> Joy"


def test_template_doubled_braces_and_missing_values():
    assert render_template("{{literal}} {phrase}", {"phrase": None}) == "{literal} "


def test_row_text_wraps_rows_in_bos_and_eos_like_olive(tokenizer):
    settings = TextSettings(text_cols=["phrase", "tone"], text_template=TONE_TEMPLATE)
    row = tone_rows()[0]
    text = row_text(row, settings, tokenizer.bos_token, tokenizer.eos_token)
    assert text == f"<s> ### Text: {row['phrase']}\n### The tone is:\n{row['tone']} </s>"
    plain = TextSettings(text_cols=["phrase", "tone"], add_special_tokens=False)
    assert row_text(row, plain, "<s>", "</s>") == f"{row['phrase']} {row['tone']}"


# ----------------------------------------------------------------------------------------- join strategy


def _join(texts, tokenizer, size: int, **extra):
    settings = TextSettings(max_seq_len=size, joiner="", add_special_tokens=False, pad_to_max_len=False, **extra)
    return tokenize_rows(texts, tokenizer, settings)


def _stream(texts, tokenizer) -> list[int]:
    return [t for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for t in ids]


def test_join_cuts_consecutive_blocks_and_drops_the_tail(tokenizer):
    texts = [r["phrase"] for r in tone_rows()[:30]]
    stream = _stream(texts, tokenizer)
    out = _join(texts, tokenizer, 16)
    blocks = out["input_ids"]
    assert len(stream) % 16 != 0  # a real tail
    assert len(blocks) == len(stream) // 16
    assert all(len(b) == 16 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: 16 * len(blocks)]  # in order, no overlap, tail dropped
    assert out["labels"] == blocks  # nothing padded, so every token is learned
    assert out["attention_mask"] == [[1] * 16] * len(blocks)


def test_join_of_an_exact_multiple_yields_one_block_fewer_like_olive(tokenizer):
    text = "### Text: We just got the keys"
    size = len(tokenizer.encode(text, add_special_tokens=False))
    assert len(_join([text] * 5, tokenizer, size)["input_ids"]) == 4  # 5 * size tokens: 4 blocks
    one_token = "a"
    assert len(tokenizer.encode(one_token, add_special_tokens=False)) == 1
    assert len(_join([text] * 5 + [one_token], tokenizer, size)["input_ids"]) == 5  # one token more: 5 blocks
    assert _join([text], tokenizer, size)["input_ids"] == []  # a single block's worth: none


def test_join_puts_the_joiner_and_special_tokens_between_rows(tokenizer):
    settings = TextSettings(text_cols=["phrase", "tone"], text_template=TONE_TEMPLATE, max_seq_len=64)
    texts = [row_text(r, settings, tokenizer.bos_token, tokenizer.eos_token) for r in tone_rows()[:20]]
    blocks = tokenize_rows(texts, tokenizer, settings)["input_ids"]
    first = tokenizer.decode(blocks[0])
    assert blocks[0][0] == tokenizer.bos_token_id
    assert "</s>\n\n<s>" in first.replace(" \n\n", "\n\n").replace("\n\n ", "\n\n")


def test_max_samples_caps_the_blocks(tokenizer):
    texts = [r["phrase"] for r in tone_rows()[:30]]
    assert len(_join(texts, tokenizer, 16, max_samples=3)["input_ids"]) == 3


def test_use_attention_mask_false_drops_the_column(tokenizer):
    out = _join([r["phrase"] for r in tone_rows()[:30]], tokenizer, 16, use_attention_mask=False)
    assert set(out) == {"input_ids", "labels"}


# ----------------------------------------------------------------------------------- line-by-line strategy


def _line_by_line(tokenizer, **extra):
    settings = TextSettings(strategy="line-by-line", max_seq_len=12, add_special_tokens=False, **extra)
    texts = ["Joy", "We just got the keys to our very first home, and we cannot believe it!", "Fear at night"]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts], tokenize_rows(texts, tokenizer, settings)


def test_line_by_line_pads_to_max_len_and_ignores_padding(tokenizer):
    raw, out = _line_by_line(tokenizer)  # pad_to_max_len defaults to true
    assert len(out["input_ids"]) == 3
    for ids, labels, mask, original in zip(out["input_ids"], out["labels"], out["attention_mask"], raw):
        assert len(ids) == len(labels) == len(mask) == 12
        kept = min(len(original), 12)
        assert ids[:kept] == original[:kept]  # right padding, truncated at max_seq_len
        assert mask == [1] * kept + [0] * (12 - kept)
        assert labels == original[:kept] + [IGNORE_INDEX] * (12 - kept)
        assert ids[kept:] == [tokenizer.pad_token_id] * (12 - kept)
    assert IGNORE_INDEX in out["labels"][0] and IGNORE_INDEX not in out["labels"][1]


def test_line_by_line_left_padding(tokenizer):
    raw, out = _line_by_line(tokenizer, padding_side="left")
    pad = 12 - len(raw[0])
    assert out["attention_mask"][0] == [0] * pad + [1] * len(raw[0])
    assert out["labels"][0] == [IGNORE_INDEX] * pad + raw[0]


def test_line_by_line_without_padding_keeps_each_row_length(tokenizer):
    raw, out = _line_by_line(tokenizer, pad_to_max_len=False)
    assert [len(ids) for ids in out["input_ids"]] == [min(len(r), 12) for r in raw]
    assert out["labels"] == out["input_ids"]
    assert all(IGNORE_INDEX not in labels for labels in out["labels"])


def test_line_by_line_can_drop_short_rows(tokenizer):
    raw, out = _line_by_line(tokenizer, pad_to_max_len=False, drop_short_sequences=True)
    assert [len(ids) for ids in out["input_ids"]] == [12] * sum(len(r) >= 12 for r in raw)


def test_padding_without_attention_mask_is_refused():
    with pytest.raises(ValueError, match="padding needs an attention mask"):
        TextSettings(strategy="line-by-line", pad_to_max_len=True, use_attention_mask=False)


# ------------------------------------------------------------------------------------------- prepare_dataset


def test_prepared_dataset_counts_and_columns(tmp_path: Path, tiny_phi3: Path):
    stats = _prepare(_tone_config(use_attention_mask=False), tiny_phi3, tmp_path, None, 42)
    assert stats.rows == 320
    assert stats.strategy == "join" and stats.max_seq_len == 64
    train = datasets.load_from_disk(str(tmp_path / "train"))
    assert stats.samples == {"train": len(train)}
    assert train.column_names == ["input_ids", "labels"]
    assert stats.tokens == 64 * len(train)
    assert not (tmp_path / "eval").exists()


def test_seeded_eval_split_is_reproducible(tmp_path: Path, tiny_phi3: Path):
    def split(seed: int, name: str):
        stats = _prepare(_tone_config(), tiny_phi3, tmp_path / name, 0.1, seed)
        return stats, datasets.load_from_disk(str(tmp_path / name / "eval"))["input_ids"]

    stats, first = split(42, "a")
    _, again = split(42, "b")
    _, other = split(7, "c")
    assert first == again
    assert first != other
    assert stats.samples["eval"] == len(first) > 0
    assert stats.samples["train"] + stats.samples["eval"] == len(
        datasets.load_from_disk(str(tmp_path / "a" / "train"))
    ) + len(first)


def test_eval_dataset_size_as_a_count(tmp_path: Path, tiny_phi3: Path):
    from olive_grove.tasks.adapter_settings import LoRASettings

    size = LoRASettings.model_validate({"train_data_config": "d", "eval_dataset_size": 3}).eval_dataset_size
    stats = _prepare(_tone_config(), tiny_phi3, tmp_path, size, 42)
    assert stats.samples["eval"] == 3


def _write_qa(path: Path, fmt: str) -> Path:
    import pandas as pd

    frame = pd.DataFrame(QA_ROWS)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in QA_ROWS))
    return path


@pytest.mark.parametrize(("fmt", "data_name"), [("csv", "csv"), ("parquet", "parquet"), ("jsonl", "json")])
def test_csv_parquet_and_jsonl_load_through_datasets(fmt: str, data_name: str, tmp_path: Path, tiny_phi3: Path):
    files = _write_qa(tmp_path / f"qa.{fmt}", fmt)
    config = _config(
        str(files),
        data_name,
        text_cols=["Question", "Best Answer"],
        text_template=QA_TEMPLATE,
        strategy="line-by-line",
        max_seq_len=64,
        pad_to_max_len=False,
    )
    stats = _prepare(config, tiny_phi3, tmp_path / "out", None, 42)
    assert stats.rows == stats.samples["train"] == len(QA_ROWS)
    tokenizer = load_tokenizer(str(tiny_phi3))
    first = tokenizer.decode(datasets.load_from_disk(str(tmp_path / "out" / "train"))["input_ids"][0])
    assert "What is the capital of France?" in first and "Paris" in first and "<|assistant|>" in first


def test_a_column_missing_from_the_data(tmp_path: Path, tiny_phi3: Path):
    config = _tone_config(text_cols=["phrase", "tones"], text_template="{phrase} {tones}")
    with pytest.raises(UserError) as exc:
        _prepare(config, tiny_phi3, tmp_path, None, 42)
    assert exc.value.line() == (
        "data.pre_process_data_config.text_cols: column 'tones' is not in the dataset (columns: phrase, tone)"
    )


def test_too_little_data_for_one_block_names_max_seq_len(tmp_path: Path, tiny_phi3: Path):
    rows = tmp_path / "few.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in tone_rows()[:2]))
    config = _config(str(rows), text_cols=["phrase", "tone"], max_seq_len=512)
    with pytest.raises(UserError) as exc:
        _prepare(config, tiny_phi3, tmp_path / "out", None, 42)
    assert exc.value.where == "data.pre_process_data_config.max_seq_len"
    assert "the dataset gives no sample: 2 rows hold" in exc.value.problem


def test_missing_split_file_is_named(tmp_path: Path, tiny_phi3: Path):
    config = _config({"train": str(tmp_path / "gone.json")}, text_cols=["phrase"])
    with pytest.raises(UserError) as exc:
        _prepare(config, tiny_phi3, tmp_path / "out", None, 42)
    assert exc.value.where == "data.load_dataset_config.data_files.train"
    assert exc.value.problem == f"no file at {tmp_path / 'gone.json'}"


def test_data_fingerprint_follows_content_not_location(tmp_path: Path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_bytes(TONE_DATASET.read_bytes())
    b.write_bytes(TONE_DATASET.read_bytes())
    assert fingerprint_data(_config(str(a))) == fingerprint_data(_config(str(b)))
    b.write_text(b.read_text() + json.dumps({"phrase": "New row", "tone": "Joy"}) + "\n")
    assert fingerprint_data(_config(str(a))) != fingerprint_data(_config(str(b)))
    assert fingerprint_data(_config(str(a), load={"split": "train[:10]"})) != fingerprint_data(_config(str(a)))
