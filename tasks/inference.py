"""Generate text from what the pipeline made: an ONNX model, a merged model, or a base model plus an adapter."""

from __future__ import annotations

import json
from pathlib import Path

from olive_grove.tasks.errors import UserError
from olive_grove.tasks.models import load_causal_lm, load_tokenizer


def model_kind(path: Path) -> str:
    if (path / "genai_config.json").is_file():
        return "onnx"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    raise UserError(
        str(path),
        "not an ONNX model, adapter or Hugging Face model folder",
        "give the onnx/<precision>-<ep>, merged/ or adapter/ folder of a run's outputs",
    )


def generate(path: Path, prompts: list[str], max_new_tokens: int = 32, base: str | None = None) -> list[str]:
    kind = model_kind(path)
    if kind == "onnx":
        return generate_onnx(path, prompts, max_new_tokens)
    return generate_hf(path, prompts, max_new_tokens, adapter=kind == "adapter", base=base)


def generate_onnx(path: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    import onnxruntime_genai as og

    model = og.Model(str(path))
    tokenizer = og.Tokenizer(model)
    outputs = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(tokens) + max_new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(tokens)
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new_tokens:
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
        outputs.append(tokenizer.decode(new))
    return outputs


def generate_hf(path: Path, prompts: list[str], max_new_tokens: int, adapter: bool, base: str | None) -> list[str]:
    import torch

    if adapter:
        from peft import PeftModel

        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(str(path / "adapter_config.json"), "names no base model", "pass --base MODEL")
        model = PeftModel.from_pretrained(load_causal_lm(base, "float32"), str(path))
    else:
        model = load_causal_lm(str(path), "float32")
    tokenizer = load_tokenizer(str(path))
    model.eval()
    outputs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        outputs.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return outputs
