"""Completion-only loss and chat rows: with `train_on_inputs: false` only the answer carries labels — a
text_template from its last placeholder on, or the assistant's turns of chat rows rendered with the chat
template — under every strategy; and the model's loss is then the loss on the answers alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from grove_helpers import TONE_TEMPLATE, grove, tiny_run_config, tone_rows, write_project
from transformers import AutoModelForCausalLM

from olive_grove.tasks.collate import IGNORE_INDEX, pad_collator
from olive_grove.tasks.data import TextSettings, chat_segments, row_segments, tokenize_rows
from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import load_tokenizer

CHAT = [
    {"role": "system", "content": "Name the tone."},
    {"role": "user", "content": "We just got the keys to our very first home!"},
    {"role": "assistant", "content": "Joy"},
    {"role": "user", "content": "And then the roof leaked."},
    {"role": "assistant", "content": "Sad"},
]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in CHAT]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_phi3: Path):
    return load_tokenizer(str(tiny_phi3))


def _learned(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _template_rows(tokenizer, settings: TextSettings, count: int = 12):
    rows = tone_rows()[:count]
    return rows, [row_segments(r, settings, tokenizer.bos_token, tokenizer.eos_token) for r in rows]


@pytest.mark.parametrize("strategy", ["line-by-line", "packed"])
def test_a_templates_answer_is_all_that_is_learned(tokenizer, strategy: str):
    settings = TextSettings(text_template=TONE_TEMPLATE, train_on_inputs=False, strategy=strategy, max_seq_len=512,
                            pad_to_max_len=False)  # fmt: skip
    rows, pieces = _template_rows(tokenizer, settings)
    out = tokenize_rows(pieces, tokenizer, settings)
    learned = [t for labels in out["labels"] for t in _learned(labels)]
    # The answer is the last placeholder and what follows it: the tone, then the row's eos.
    assert learned == [t for r in rows for t in _encode(tokenizer, f"{r['tone']} {tokenizer.eos_token}")]
    # The prompt is still read: every token is in input_ids.
    everything = [t for ids in out["input_ids"] for t in ids]
    assert len(everything) > 3 * len(learned)


def test_join_learns_the_answers_and_not_the_prompts_or_joiners(tokenizer):
    settings = TextSettings(text_template=TONE_TEMPLATE, train_on_inputs=False, max_seq_len=48)
    rows, pieces = _template_rows(tokenizer, settings, count=40)
    answers = {tuple(_encode(tokenizer, f"{r['tone']} {tokenizer.eos_token}")) for r in rows}
    out = tokenize_rows(pieces, tokenizer, settings)
    assert out["input_ids"]
    for ids, labels in zip(out["input_ids"], out["labels"]):
        runs, run = [], []
        for i, (token, label) in enumerate(zip(ids, labels)):
            if label != IGNORE_INDEX:
                assert label == token
                run.append(token)
            if run and (label == IGNORE_INDEX or i == len(ids) - 1):
                runs.append(tuple(run))
                run = []
        # Each learned run is an answer, or the part of one that a block boundary cut.
        for i, found in enumerate(runs):
            at_edge = (i == 0 and labels[0] != IGNORE_INDEX) or (i == len(runs) - 1 and labels[-1] != IGNORE_INDEX)
            assert found in answers or (at_edge and any(_part_of(found, a) for a in answers)), found


def _part_of(piece: tuple[int, ...], whole: tuple[int, ...]) -> bool:
    return any(whole[i : i + len(piece)] == piece for i in range(len(whole) - len(piece) + 1))


def test_train_on_inputs_true_keeps_olives_full_text(tokenizer):
    settings = TextSettings(text_template=TONE_TEMPLATE, strategy="line-by-line", pad_to_max_len=False)
    _, pieces = _template_rows(tokenizer, settings)
    out = tokenize_rows(pieces, tokenizer, settings)
    assert out["labels"] == out["input_ids"]


@pytest.mark.parametrize("messages", [CHAT, SHAREGPT], ids=["openai", "sharegpt"])
def test_only_the_assistants_turns_are_learned_in_chat_rows(tokenizer, messages):
    settings = TextSettings(chat_template=True, train_on_inputs=False, strategy="line-by-line", max_seq_len=512,
                            pad_to_max_len=False)  # fmt: skip
    pieces = chat_segments(messages, tokenizer, settings)
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert "".join(text for text, _ in pieces) == whole  # the pieces are the template's text, cut
    out = tokenize_rows([pieces], tokenizer, settings)
    # Each assistant turn: its words and the template's end of turn; never the "<|assistant|>" header.
    assert _learned(out["labels"][0]) == _encode(tokenizer, "Joy<|end|>\n") + _encode(tokenizer, "Sad<|end|>\n")


def test_chat_rows_learned_whole_when_train_on_inputs_is_true(tokenizer):
    settings = TextSettings(chat_template=True, strategy="line-by-line", max_seq_len=512, pad_to_max_len=False)
    out = tokenize_rows([chat_segments(CHAT, tokenizer, settings)], tokenizer, settings)
    whole = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert out["input_ids"][0] == out["labels"][0] == _encode(tokenizer, whole)


def test_the_loss_falls_only_on_the_answers(tiny_phi3: Path, tokenizer):
    """What the Trainer optimizes: the model's loss on a masked batch is the cross-entropy of the answer
    tokens alone, and differs from the loss on the whole text."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_phi3), dtype=torch.float32).eval()
    masked = TextSettings(text_template=TONE_TEMPLATE, train_on_inputs=False, strategy="line-by-line",
                          max_seq_len=128, pad_to_max_len=False)  # fmt: skip
    _, pieces = _template_rows(tokenizer, masked, count=4)
    samples = tokenize_rows(pieces, tokenizer, masked)
    batch = pad_collator(tokenizer.pad_token_id)([dict(zip(samples, v)) for v in zip(*samples.values())])
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    answer = labels != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[answer], labels[answer])
    assert out.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    whole = batch["input_ids"][:, 1:]
    real = batch["attention_mask"][:, 1:].bool()
    assert answer.sum() < real.sum()
    assert by_hand.item() != pytest.approx(torch.nn.functional.cross_entropy(logits[real], whole[real]).item())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train_on_inputs": False, "text_template": None},
         "train_on_inputs: false needs to know where the answer starts"),
        ({"chat_template": True}, "chat_template: and text_template both say how rows become text"),
    ],
)  # fmt: skip
def test_settings_that_cannot_mark_an_answer_are_one_line(tiny_phi3: Path, tmp_path: Path, change, message):
    cfg = tiny_run_config(tiny_phi3)
    text = cfg["data_configs"][0]["pre_process_data_config"]
    text.update(change)
    result = grove("validate", "--config", write_project(tmp_path, cfg))
    assert result.rc == 2
    [error] = result.errors
    assert error.startswith(f"error: data_configs[0].pre_process_data_config.{message}"), error


@pytest.mark.parametrize(
    "messages, message",
    [
        ("not a list", "column 'messages' holds 'not a list', not a list of messages"),
        ([], "column 'messages' holds [], not a list of messages"),
        ([{"role": "robot", "content": "hi"}], "column 'messages' has the message {'role': 'robot'"),
        ([{"role": "user"}], "column 'messages' has the message {'role': 'user'}"),
    ],
)
def test_a_malformed_chat_row_is_one_line(tokenizer, messages, message):
    with pytest.raises(UserError) as caught:
        chat_segments(messages, tokenizer, TextSettings(chat_template=True, train_on_inputs=False))
    assert caught.value.line().startswith(f"pre_process_data_config.message_col: {message}"), caught.value.line()
