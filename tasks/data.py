"""Dataset step: load rows, fill the text template, tokenize into training samples the way Olive does."""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import json
import math
import string
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from olive_grove.tasks.artifact import Artifact, Reporter, Settings, StepFiles, StepInfo
from olive_grove.tasks.collate import IGNORE_INDEX
from olive_grove.tasks.errors import UserError, first_line, located, nearest, shown
from olive_grove.tasks.files import hash_value, remembered, stamped_hash
from olive_grove.tasks.models import ModelInfo, load_tokenizer
from olive_grove.tasks.storage import (
    fetch_files,
    file_fingerprint,
    filesystem,
    is_pattern,
    is_url,
    not_found,
    storage_error,
)

LOCAL_FORMATS = {"json", "csv", "parquet", "text"}


class AzureMLDatastore(Settings):
    """Olive's `azureml_datastore` data file: a path inside an Azure ML workspace's datastore."""

    type: Literal["azureml_datastore"]
    azureml_client: dict[str, Any] | None = None
    datastore_name: str
    relative_path: str


class LoadDatasetSettings(Settings):
    """Arguments of `datasets.load_dataset`, as Olive's `load_dataset_config` names them."""

    data_name: str = Field(description="a builder ('json', 'csv', 'parquet', 'text') or a hub dataset id")
    data_files: str | list[str] | dict[str, str | list[str]] | AzureMLDatastore | None = Field(
        None, description="local paths or fsspec URIs, relative to the config file's folder"
    )
    split: str = Field("train", description="the split to train on")
    subset: str | None = Field(None, description="the hub dataset's configuration name")
    data_dir: str | None = Field(None, description="a folder of data files, relative to the config file's folder")
    trust_remote_code: bool = False
    col_filters: dict[str, Any] | None = Field(None, description="keep the rows whose columns hold these values")
    storage_options: dict[str, Any] | None = Field(
        None,
        exclude=True,  # may hold secrets: never printed, saved or part of a cache key
        description="fsspec options for data_files URLs (Azure reads its credentials from the environment)",
    )

    @field_validator("data_files", mode="before")
    @classmethod
    def _typed_files(cls, value: Any) -> Any:
        if isinstance(value, dict) and "type" in value:
            return AzureMLDatastore.model_validate(value)
        return value


class TextSettings(Settings):
    """How rows become token sequences (Olive's `pre_process_data_config` for text generation)."""

    text_cols: list[str] | None = Field(
        None,
        min_length=1,
        description="columns the text is made of; default: the template's placeholders, else ['text']",
    )
    text_template: str | None = Field(None, description="'{column}' placeholders; plain names only")
    strategy: Literal["join", "line-by-line", "packed"] = Field(
        "join",
        description="Olive's join or line-by-line; or packed: whole rows share a sample but not attention",
    )
    max_seq_len: int = Field(
        1024,
        gt=0,
        le=1 << 20,
        description="tokens per sample",
    )
    pad_to_max_len: bool = Field(True, description="pad line-by-line samples to max_seq_len")
    use_attention_mask: bool = True
    add_special_tokens: bool = Field(True, description="wrap each row in the tokenizer's bos/eos tokens")
    chat_template: bool | str | None = Field(
        None,
        description="render message_col with the tokenizer's chat template (true) or this Jinja template; "
        "the template adds its own special tokens",
    )
    message_col: str = Field("messages", description="the column of chat rows: OpenAI role/content or ShareGPT "
                             "from/value messages")  # fmt: skip
    train_on_inputs: bool = Field(
        True,
        description="false: only the answer carries loss — the assistant's turns of chat rows, or a "
        "text_template from its last placeholder on",
    )
    joiner: str = Field("\n\n", description="text between rows in the join strategy")
    padding_side: Literal["left", "right"] = "right"
    drop_short_sequences: bool = False
    max_samples: int | None = Field(None, gt=0)
    dataset_type: Literal["corpus"] | None = Field(None, description="older Olive key; corpus is the only kind")

    @field_validator("text_cols", mode="before")
    @classmethod
    def _one_column(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # Olive accepts a single column name

    @property
    def columns(self) -> list[str]:
        """The columns a row's text is made of (Olive's meaning: a template's placeholders, else text_cols)."""
        if self.chat_template:
            return [self.message_col]
        if self.text_template is not None:
            return template_fields(self.text_template, "text_template")
        return self.text_cols or ["text"]

    @model_validator(mode="after")
    def _check(self) -> TextSettings:
        if self.text_template is not None and not template_fields(self.text_template, "text_template"):
            hint = "write {column}: {{column}} is a literal brace" if "{{" in self.text_template else "add {column}"
            raise UserError("text_template", "has no {column} placeholder: every row would be the same text", hint)
        if self.text_template is not None and self.text_cols is not None:
            for name in template_fields(self.text_template, "text_template"):
                if name not in self.text_cols:
                    raise UserError(
                        "text_template",
                        f"placeholder '{{{name}}}' is not one of text_cols",
                        f"text_cols: {', '.join(self.text_cols)}",
                    )
        if self.chat_template and self.text_template is not None:
            raise UserError("chat_template", "and text_template both say how rows become text", "keep one")
        if not self.train_on_inputs and not self.chat_template and self.text_template is None:
            raise UserError("train_on_inputs", "false needs to know where the answer starts",
                            "write a text_template whose last placeholder is the answer, or use chat rows "
                            "(chat_template: true)")  # fmt: skip
        if self.strategy == "line-by-line" and self.pad_to_max_len and not self.use_attention_mask:
            raise UserError("pad_to_max_len", "padding needs an attention mask", "set use_attention_mask: true")
        if self.pad_to_max_len and self.drop_short_sequences:
            raise UserError("drop_short_sequences", "cannot be true together with pad_to_max_len")
        return self


class DataConfig(Settings):
    """One entry of Olive's `data_configs`."""

    name: str
    type: Literal["HuggingfaceContainer"] = "HuggingfaceContainer"
    load_dataset_config: LoadDatasetSettings
    pre_process_data_config: TextSettings = Field(default_factory=TextSettings)

    def cache_view(self) -> dict[str, Any]:
        """What decides the samples, for a cache key: the files count by content (fingerprint_data), not path."""
        return self.model_dump(mode="json", exclude={"name": True, "load_dataset_config": {"data_files"}})


def template_fields(template: str, where: str) -> list[str]:
    """The placeholder names of a template; anything but a plain `{name}` is rejected."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise UserError(
            where, f"not a valid template: {exc}", "use {column} placeholders and {{ }} for braces"
        ) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or spec or conversion or any(c in name for c in ".[]"):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UserError(where, f"placeholder {shown} is not a plain column name", "write {column} only")
        names.append(name)
    return names


def render_template(template: str, row: dict[str, Any]) -> str:
    """Fill `{column}` placeholders by substitution, never by `str.format` on user input."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            value = row[name]
            parts.append("" if value is None else str(value))
    return "".join(parts)


Segment = tuple[str, bool]  # a piece of a row's text, and whether the loss counts its tokens


def row_text(row: dict[str, Any], settings: TextSettings, bos: str | None, eos: str | None) -> str:
    """A row's training text from its columns (a template, or the columns joined by spaces)."""
    return "".join(text for text, _ in row_segments(row, settings, bos, eos))


def row_segments(row: dict[str, Any], settings: TextSettings, bos: str | None, eos: str | None) -> list[Segment]:
    """A row's text from its columns, in pieces marked with whether the loss counts them: all of it, unless
    train_on_inputs is false — then the answer only, the template from its last placeholder on.
    An empty cell (null) is empty text."""
    if settings.text_template is not None:
        literal = settings.text_template
        split = len(literal) if settings.train_on_inputs else _last_placeholder(literal)
        prompt, answer = render_template(literal[:split], row), render_template(literal[split:], row)
    else:  # columns joined: all of it is learned (train_on_inputs false needs a template)
        prompt, answer = " ".join("" if row[c] is None else str(row[c]) for c in settings.columns), ""
    if settings.add_special_tokens:
        # Olive wraps rows at the string level, with spaces, before tokenizing without special tokens.
        prompt, answer = f"{bos or ''} {prompt}", f"{answer} {eos or ''}"
    if settings.train_on_inputs:
        return [(prompt + answer, True)] if prompt + answer else []
    return [(text, learn) for text, learn in ((prompt, False), (answer, True)) if text]


def _last_placeholder(template: str) -> int:
    """Where the template's last `{column}` starts."""
    at, start = 0, 0
    for literal, name, _, _ in string.Formatter().parse(template):
        at += len(literal)
        if name is not None:
            start = at
            at += len(name) + 2
    return start


ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system",
         "tool": "tool"}  # fmt: skip


def chat_segments(messages: Any, tokenizer, settings: TextSettings) -> list[Segment]:
    """A chat row rendered with the chat template, in pieces: with train_on_inputs false only the assistant's
    turns count for the loss (each turn is cut where the template's text for it begins)."""
    turns = [_message(m, settings.message_col) for m in _messages(messages, settings.message_col)]

    def render(upto: list[dict[str, str]], generation: bool = False) -> str:
        return _render_chat(upto, tokenizer, settings, generation)

    if settings.train_on_inputs:
        return [(render(turns), True)]
    segments, done = [], ""
    for i, turn in enumerate(turns):
        steps = [(render(turns[:i], generation=True), False)] if turn["role"] == "assistant" and i else []
        for text, learn in [*steps, (render(turns[: i + 1]), turn["role"] == "assistant")]:
            if not text.startswith(done):
                raise UserError("pre_process_data_config.train_on_inputs", "false needs a chat template that "
                                "renders earlier turns the same once later ones follow, and this one does not",
                                "set train_on_inputs: true, or give a chat_template that does")  # fmt: skip
            segments.append((text[len(done) :], learn))
            done = text
    return [(text, learn) for text, learn in segments if text]


def _render_chat(turns: list[dict[str, str]], tokenizer, settings: TextSettings, generation: bool) -> str:
    """The turns as the chat template writes them (the config's own template, else the tokenizer's)."""
    if not turns:
        return ""
    template = settings.chat_template if isinstance(settings.chat_template, str) else None
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation,
                                         chat_template=template)  # fmt: skip


def _messages(value: Any, column: str) -> list[Any]:
    if isinstance(value, str):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)  # a CSV column holds the list as JSON text
    if not isinstance(value, list) or not value:
        raise UserError("pre_process_data_config.message_col", f"column '{column}' holds {shown(value)}, not a "
                        "list of messages", "each row: [{\"role\": \"user\", \"content\": \"...\"}, ...]")  # fmt: skip
    return value


def _message(message: Any, column: str) -> dict[str, str]:
    """An OpenAI (role/content) or ShareGPT (from/value) message as role/content."""
    if isinstance(message, dict):
        role, content = message.get("role", message.get("from")), message.get("content", message.get("value"))
        if role in ROLES and isinstance(content, str):
            return {"role": ROLES[role], "content": content}
    raise UserError("pre_process_data_config.message_col", f"column '{column}' has the message {shown(message)}",
                    "messages are {role, content} (or ShareGPT's {from, value}); roles: "
                    + ", ".join(ROLES))  # fmt: skip


def load_rows(config: DataConfig, downloads: Path):
    """Load the configured split with `datasets`, turning missing files into a clear error.

    Files behind URLs are read from local copies in `downloads`, one per file content.
    """
    import datasets

    load = config.load_dataset_config
    check_data_files(config)
    data_files = local_data_files(load, "load_dataset_config.data_files", downloads / "data")
    try:
        rows = datasets.load_dataset(
            load.data_name, name=load.subset, data_files=data_files, data_dir=load.data_dir, split=load.split
        )
    except Exception as exc:  # datasets raises many types for unreadable data; each is the data's fault
        cause = first_line(exc.__cause__ or exc)
        if load.data_files is None:  # a hub dataset
            problem = f"could not load the hub dataset '{load.data_name}': {cause}"
            hint = "give data_files for local data, or a hub dataset this machine can reach"
            raise UserError("load_dataset_config.data_name", problem, hint) from None
        raise UserError("load_dataset_config", f"could not load the dataset: {cause}") from None
    return filter_rows(rows, load.col_filters) if load.col_filters else rows


def filter_rows(rows, col_filters: dict[str, Any]):
    """Olive's col_filters: the rows whose columns equal the given values."""
    for column in col_filters:
        if column not in rows.column_names:
            raise UserError(f"load_dataset_config.col_filters.{column}", "is not a column of the dataset",
                            f"columns: {', '.join(rows.column_names)}")  # fmt: skip
    kept = rows.filter(lambda row: all(row[c] == v for c, v in col_filters.items()))
    if len(kept) == 0:
        raise UserError("load_dataset_config.col_filters", f"no row of {len(rows)} matches {col_filters}",
                        "check the values")  # fmt: skip
    return kept


def local_data_files(load: LoadDatasetSettings, where: str, downloads: Path) -> Any:
    """`data_files` with every URL replaced by local copies of the files it names, in the same shape."""

    def local(files: str | list[str], where: str) -> str | list[str]:
        if isinstance(files, str) and not is_url(files):
            return files
        paths = []
        for file in [files] if isinstance(files, str) else files:
            if is_url(file):
                paths += [str(p) for p in fetch_files(file, where, load.storage_options, downloads)]
            else:
                paths.append(file)
        return paths

    files = load.data_files
    if isinstance(files, dict):
        return {split: local(f, f"{where}.{split}") for split, f in files.items()}
    return files if files is None else local(files, where)


def check_text_columns(config: DataConfig, columns: list[str]) -> None:
    text = config.pre_process_data_config
    missing = [c for c in text.columns if c not in columns]
    if missing:
        raise UserError(
            "pre_process_data_config.text_cols" if text.text_cols else "pre_process_data_config.text_template",
            f"column '{missing[0]}' is not in the dataset",
            f"columns: {', '.join(columns)}",
        )


def check_data(config: DataConfig, downloads: Path) -> None:
    """Files exist and, for local files, hold the columns the template needs: checked before any work."""
    check_data_files(config)
    load = config.load_dataset_config
    if load.data_name in LOCAL_FORMATS and load.data_files is not None:
        # Reading the rows imports datasets (a second): data that passed is known by its content.
        columns = config.pre_process_data_config.columns
        key = [fingerprint_data(config), list(columns), importlib.metadata.version("datasets")]
        remembered("data-ok", key, lambda: _check_columns(config, downloads) or True)


def _check_columns(config: DataConfig, downloads: Path) -> None:
    check_text_columns(config, load_rows(config, downloads).column_names)


def check_data_files(config: DataConfig) -> None:
    """Every listed file or pattern matches something, local or behind a URL, in a format `datasets` reads."""
    load = config.load_dataset_config
    if load.data_files is None and load.data_dir is None and load.data_name in LOCAL_FORMATS:
        raise UserError("load_dataset_config.data_files", f"is needed to read {load.data_name} files",
                        "name the files (a path, a pattern, or a mapping of splits)")  # fmt: skip
    if load.data_files is not None and load.data_name not in LOCAL_FORMATS:
        raise UserError("load_dataset_config.data_name", f"'{load.data_name}' is not a file format datasets reads",
                        f"with data_files, data_name is one of {', '.join(sorted(LOCAL_FORMATS))}; "
                        f"{nearest(load.data_name, LOCAL_FORMATS)}")  # fmt: skip
    where = "load_dataset_config.data_files"
    if isinstance(load.data_files, AzureMLDatastore):
        raise UserError(
            where, "the azureml_datastore is not resolved to a blob URL", "resolve it through its workspace first"
        )
    for file_where, file in listed_files(load.data_files, where):
        if is_url(file):
            fs, path = filesystem(file, file_where, load.storage_options)
            try:
                found = fs.expand_path(path) if is_pattern(path) else fs.exists(path)
                if not found:
                    raise not_found(fs, path, file, file_where)
            except UserError:
                raise
            except Exception as exc:  # the backend's own error types: access denied, for one
                raise storage_error(exc, file, file_where) from None
        elif is_pattern(file) and not glob.glob(file, recursive=True):
            raise UserError(file_where, f"the pattern {file} matches no file", "check the folder and the pattern")
        elif not is_pattern(file) and not Path(file).exists():
            raise UserError(file_where, f"no file at {file}", "give a path relative to the config file, or a URI")


def listed_files(data_files: Any, where: str) -> list[tuple[str, str]]:
    """(where, file) for each file or pattern of `data_files`, whatever shape Olive allows it in."""
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        return [item for split, files in data_files.items() for item in listed_files(files, f"{where}.{split}")]
    return [(where, f) for f in ([data_files] if isinstance(data_files, str) else data_files)]


def tokenize_rows(
    rows: list[list[Segment]] | list[str], tokenizer, settings: TextSettings
) -> dict[str, list[list[int]]]:
    """Turn rows (texts, or text pieces marked with whether they are learned) into samples with Olive's
    semantics: labels copy input_ids, except padding and pieces the loss does not count."""
    encoded = encode_rows([[(r, True)] if isinstance(r, str) else r for r in rows], tokenizer)
    if settings.strategy == "packed":
        packed = pack_rows(encoded, settings.max_seq_len)
        return {k: v[: settings.max_samples] for k, v in packed.items()} if settings.max_samples else packed
    if settings.strategy == "join":
        joiner = tokenizer.encode(settings.joiner, add_special_tokens=False) if settings.joiner else []
        samples = _join(encoded, joiner, settings)
    else:
        samples = _line_by_line(encoded, tokenizer, settings)
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for ids, mask, learned in samples:
        out["input_ids"].append(ids)
        out["labels"].append([t if m == 1 and learn else IGNORE_INDEX for t, m, learn in zip(ids, mask, learned)])
        out["attention_mask"].append(mask)
        if settings.max_samples and len(out["input_ids"]) >= settings.max_samples:
            break
    if not settings.use_attention_mask:
        del out["attention_mask"]
    return out


TokenRow = tuple[list[int], list[bool]]  # a row's token ids, and whether the loss counts each


def encode_rows(rows: list[list[Segment]], tokenizer) -> list[TokenRow]:
    """Each row's pieces tokenized (in one batch) and put back together, with a learned flag per token."""
    pieces = [text for row in rows for text, _ in row]
    ids = iter(tokenizer(pieces, add_special_tokens=False, truncation=False)["input_ids"]) if pieces else iter([])
    encoded = []
    for row in rows:
        tokens, learned = [], []
        for _, learn in row:
            piece = next(ids)
            tokens += piece
            learned += [learn] * len(piece)
        encoded.append((tokens, learned))
    return encoded


def _join(rows: list[TokenRow], joiner: list[int], settings: TextSettings):
    stream: list[int] = []
    learned: list[bool] = []
    for ids, learn in rows:
        stream += ids + joiner
        learned += learn + [settings.train_on_inputs] * len(joiner)  # the joiner is no answer
    size = settings.max_seq_len
    # Like Olive: non-overlapping blocks; a stream of exactly n blocks yields n - 1, and the tail is dropped.
    for begin in range(0, len(stream) - size, size):
        yield stream[begin : begin + size], [1] * size, learned[begin : begin + size]


def _line_by_line(rows: list[TokenRow], tokenizer, settings: TextSettings):
    size = settings.max_seq_len
    for ids, learned in rows:
        ids, learned = ids[:size], learned[:size]
        if settings.drop_short_sequences and len(ids) < size:
            continue
        pad = size - len(ids) if settings.pad_to_max_len else 0
        mask = [1] * len(ids)
        if settings.padding_side == "left":
            yield [tokenizer.pad_token_id] * pad + ids, [0] * pad + mask, [False] * pad + learned
        else:
            yield ids + [tokenizer.pad_token_id] * pad, mask + [0] * pad, learned + [False] * pad


def pack_rows(rows: list[TokenRow], max_len: int) -> dict[str, list[list[int]]]:
    """Rows packed whole, in order, into samples of up to `max_len` tokens, each with positions from 0.

    The model sees `position_ids` and no attention mask, which transformers reads as packed sequences:
    a row attends only to itself, and the first token of each row is not predicted from the one before.
    Unlike Olive's join, no row is split and nothing leaks between rows; the loss equals training on
    each row alone.
    """
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    current: dict[str, list[int]] = {k: [] for k in out}
    for ids, learned in rows:
        ids, learned = list(ids[:max_len]), learned[:max_len]
        if len(current["input_ids"]) + len(ids) > max_len:
            for key in out:
                out[key].append(current[key])
            current = {k: [] for k in out}
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + [t if learn else IGNORE_INDEX for t, learn in zip(ids[1:], learned[1:])]
        current["position_ids"] += range(len(ids))
    if current["input_ids"]:
        for key in out:
            out[key].append(current[key])
    return out


class DatasetSettings(Settings):
    """The dataset step's settings: one data config, and how much of it to hold out for evaluation.

    Errors about the data config are named under `data`, the others at their own key.
    """

    data: DataConfig
    files_fingerprint: str = Field(description="what the data files hold (fingerprint_data)")
    eval_dataset_size: float | None = Field(None, description="a fraction (<1) or count (>=1) of the samples")
    seed: int | None = Field(None, description="seeds the eval split")

    def cache_view(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json", exclude={"data"}), "data": self.data.cache_view()}


class DatasetInfo(StepInfo):
    rows: int
    samples: dict[str, int]
    tokens: int
    strategy: str
    max_seq_len: int


def prepare_dataset(
    settings: DatasetSettings, files: StepFiles, report: Reporter, *, model: Artifact[ModelInfo]
) -> DatasetInfo:
    """Template and tokenize one data config into `files.out/train` (and `files.out/eval`); return counts."""
    import datasets

    config = settings.data
    tokenizer = load_tokenizer(model.path, model.info.trust_remote_code)
    with located("data"):
        rows = load_rows(config, files.downloads)
        check_text_columns(config, rows.column_names)
    text = config.pre_process_data_config
    used = text.columns
    empty = sum(1 for row in rows if any(row[c] is None for c in used))
    if empty:
        report.log(f"dataset {config.name}: {empty} of {len(rows)} rows have an empty {' or '.join(used)}; "
                   "those cells are empty text")  # fmt: skip
    if text.chat_template and tokenizer.chat_template is None and not isinstance(text.chat_template, str):
        raise UserError("data.pre_process_data_config.chat_template", "is true but the model's tokenizer has no "
                        "chat template", "give the template itself (a Jinja string) as chat_template")  # fmt: skip
    with located("data"):
        samples = datasets.Dataset.from_dict(row_samples(rows, text, tokenizer))
    if len(samples) == 0:
        pieces = [s for s in (_segments(r, text, tokenizer) for r in rows) if s]
        total = sum(len(ids) for ids, _ in encode_rows(pieces, tokenizer))
        raise UserError(
            "data.pre_process_data_config.max_seq_len",
            f"the dataset gives no sample: {len(pieces)} rows hold {total} tokens, fewer than one "
            f"{text.max_seq_len}-token block plus one",
            "lower max_seq_len (source_max_len) or use strategy line-by-line",
        )
    splits = {"train": samples}
    size = settings.eval_dataset_size
    if size:
        held_out = int(size) if size >= 1 else math.ceil(size * len(samples))
        if held_out >= len(samples):
            problem = f"holds out {held_out} of {len(samples)} samples, leaving none to train on"
            hint = "hold out fewer (a fraction below 1, or a smaller count), or add data"
            raise UserError("eval_dataset_size", problem, hint)
        # Olive's meaning: below 1 a fraction of the samples, from 1 a count of them.
        split = samples.train_test_split(test_size=int(size) if size >= 1 else size, seed=settings.seed, shuffle=True)
        splits = {"train": split["train"], "eval": split["test"]}
    for name, part in splits.items():
        part.save_to_disk(str(files.out / name))
    token_count = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in samples["labels"])
    report.log(f"dataset {config.name}: {len(rows)} rows -> {len(samples)} samples")
    return DatasetInfo(
        rows=len(rows),
        samples={name: len(part) for name, part in splits.items()},
        tokens=token_count,
        strategy=text.strategy,
        max_seq_len=text.max_seq_len,
    )


def row_samples(rows, settings: TextSettings, tokenizer) -> dict[str, list[list[int]]]:
    """The rows as training samples: templated, tokenized and cut or packed as the settings say."""
    pieces = [s for s in (_segments(r, settings, tokenizer) for r in rows) if s]
    return tokenize_rows(pieces, tokenizer, settings)


def sample_rows(rows, settings: TextSettings, tokenizer, answers: bool) -> list[tuple[str, str]]:
    """The first rows (max_samples of them) as a prompt and the answer the model should give; without
    `answers`, a row with no answer to tell apart (no template, no chat) is a prompt as it is."""
    picked = rows.select(range(min(settings.max_samples or len(rows), len(rows))))
    if not answers and not settings.chat_template and settings.text_template is None:
        return [(row_text(row, settings, None, None), "") for row in picked]
    pairs = [prompt_and_answer(row, settings, tokenizer) for row in picked]
    if not pairs:
        raise UserError("load_dataset_config", "gives no rows to evaluate on", "check its split and files")
    return pairs


def prompt_and_answer(row: dict[str, Any], settings: TextSettings, tokenizer) -> tuple[str, str]:
    """A row as the prompt the model is given and the answer it should give: a chat row's last turn (the
    assistant's), or a text_template's text from its last placeholder on."""
    if settings.chat_template:
        turns = [_message(m, settings.message_col) for m in _messages(row[settings.message_col], settings.message_col)]
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise UserError("pre_process_data_config.message_col", "a row to evaluate on ends with the "
                            f"assistant's answer, and one ends with a {turns[-1]['role']} message",
                            "end each row with the assistant turn the model should give")  # fmt: skip
        return _render_chat(turns[:-1], tokenizer, settings, generation=True), turns[-1]["content"].strip()
    if settings.text_template is None:
        raise UserError(
            "pre_process_data_config.text_template",
            "is needed to tell a row's prompt from its answer",
            "write a text_template whose last {column} is the answer, or use chat rows",
        )
    split = _last_placeholder(settings.text_template)
    prompt = render_template(settings.text_template[:split], row)
    if settings.add_special_tokens:
        prompt = f"{tokenizer.bos_token or ''} {prompt}"
    return prompt, render_template(settings.text_template[split:], row).strip()


def _segments(row: dict[str, Any], settings: TextSettings, tokenizer) -> list[Segment]:
    if settings.chat_template:
        return chat_segments(row[settings.message_col], tokenizer, settings)
    return row_segments(row, settings, tokenizer.bos_token, tokenizer.eos_token)


def fingerprint_data(config: DataConfig) -> str:
    """What the data files hold, split by split: local files by their bytes, remote ones by ETag and size.

    Patterns are expanded first, so editing, adding or removing a matched file changes the fingerprint.
    Remote files are only listed here; `local_data_files` downloads each once, keyed by the same ETag.
    """
    load = config.load_dataset_config
    files = load.data_files
    splits = files if isinstance(files, dict) else {"": files}
    found: dict[str, list[str]] = {}
    for split, patterns in splits.items():
        for pattern in [patterns] if isinstance(patterns, str) else list(patterns or []):
            fs, path = filesystem(pattern, "load_dataset_config.data_files", load.storage_options)
            for name in sorted(fs.expand_path(path)) if fs.exists(path) or is_pattern(path) else []:
                info = fs.info(name)
                if info["type"] == "file":
                    local = "file" in fs.protocol  # by content, so moving the project keeps its cache hits
                    found.setdefault(split, []).append(stamped_hash(Path(name)) if local else file_fingerprint(info))
    return hash_value({"load": load.model_dump(mode="json", exclude={"data_files"}), "files": found})
