"""Generate text from what the pipeline made: an ONNX model, a merged model, or a base model plus an adapter."""

from __future__ import annotations

import json
from pathlib import Path

from olive_grove.tasks.errors import UserError, first_line, nearest
from olive_grove.tasks.models import load_causal_lm, load_tokenizer
from olive_grove.tasks.runners import generate_genai


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


def generate(
    path: Path,
    prompts: list[str],
    max_new_tokens: int = 32,
    base: str | None = None,
    adapter: str | None = None,
    on_cpu: bool = False,
) -> list[str]:
    """Greedy completions of each prompt; `on_cpu` runs an ONNX model on the CPU whatever it was built for
    (Hugging Face folders always run on the CPU here)."""
    kind = model_kind(path)
    if kind == "onnx":
        return generate_onnx(path, prompts, max_new_tokens, adapter, on_cpu)
    if adapter:
        raise UserError("--adapter", "picks one of an ONNX model's adapters", f"{path} holds a {kind} model")
    return generate_hf(path, prompts, max_new_tokens, adapter=kind == "adapter", base=base)


def adapter_names(path: Path) -> list[str]:
    """The adapters beside an ONNX model (ExtractAdapters' `adapters/<pass>.onnx_adapter` files)."""
    return sorted(p.stem for p in (path / "adapters").glob("*.onnx_adapter"))


# ONNX Runtime GenAI's provider names (genai_config.json), the build that has each, and how to ask for it.
PROVIDER_BUILDS = {
    "cuda": (
        "is_cuda_available",
        "on a CUDA machine: pip uninstall -y onnxruntime-genai onnxruntime && pip install onnxruntime-genai-cuda",
    ),
    "dml": ("is_dml_available", "pip install onnxruntime-genai-directml, on Windows"),
    "openvino": ("is_openvino_available", "the OpenVINO build of onnxruntime-genai"),
    "qnn": ("is_qnn_available", "the QNN build of onnxruntime-genai, on a Snapdragon machine"),
    "webgpu": ("is_webgpu_available", "a WebGPU build of onnxruntime-genai"),
}


def model_providers(path: Path) -> list[str]:
    """The execution providers an ONNX model folder was built for (none listed: the CPU)."""
    try:
        config = json.loads((path / "genai_config.json").read_text())
        listed = config["model"]["decoder"]["session_options"].get("provider_options", [])
        return [name for options in listed for name in options]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UserError(str(path / "genai_config.json"), "is not an ONNX Runtime GenAI config",
                        "build the model again") from None  # fmt: skip


def open_onnx_model(path: Path, on_cpu: bool):
    """The model on the providers it was built for, or on the CPU; a provider this install lacks is one line."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if on_cpu:
        config.clear_providers()
        return og.Model(config)
    for name in model_providers(path):
        check, install = PROVIDER_BUILDS.get(name, (None, ""))
        if check is not None and not getattr(og, check)():
            raise UserError(str(path), f"is built for {name}, which this onnxruntime-genai cannot run",
                            f"{install}; or generate on the CPU: --ep cpu")  # fmt: skip
    return og.Model(config)


def generate_onnx(
    path: Path, prompts: list[str], max_new_tokens: int, adapter: str | None = None, on_cpu: bool = False
) -> list[str]:

    if adapter and adapter not in adapter_names(path):
        raise UserError("--adapter", f"{path} has no adapter {adapter!r}",
                        nearest(adapter, adapter_names(path)) or "it has no adapters")  # fmt: skip
    context = _context_length(path)
    if context and max_new_tokens >= context:
        raise UserError("--max-new-tokens", f"{max_new_tokens} is more than the model's context ({context} tokens)",
                        f"at most {context - 1}, less the prompt")  # fmt: skip
    try:
        model = open_onnx_model(path, on_cpu)
        return _generate(model, path, prompts, max_new_tokens, adapter)
    except RuntimeError as exc:  # ONNX Runtime's refusals of this folder: a part of a model, missing weights
        raise UserError(str(path), f"ONNX Runtime GenAI cannot run it: {first_line(exc, 160)}",
                        _why_not(str(exc), path)) from None  # fmt: skip


def _why_not(error: str, path: Path) -> str:
    if "Missing Input" in error and adapter_names(path):
        return f"its LoRA weights are inputs: give --adapter, one of {', '.join(adapter_names(path))}"
    if "was not found" in error or "doesn't exist" in error:
        return "it is part of a model: built with exclude_embeds, exclude_lm_head or metadata_only"
    return ""


def _context_length(path: Path) -> int | None:
    try:
        length = json.loads((path / "genai_config.json").read_text())["model"]["context_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return length if isinstance(length, int) else None


def _generate(model, path: Path, prompts: list[str], max_new_tokens: int, adapter: str | None) -> list[str]:
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model)
    adapters = None
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(path / "adapters" / f"{adapter}.onnx_adapter"), adapter)
    outputs = []
    for prompt in prompts:
        new = generate_genai(model, list(tokenizer.encode(prompt)), max_new_tokens, adapters, adapter)
        outputs.append(tokenizer.decode(new))
    return outputs


def generate_hf(path: Path, prompts: list[str], max_new_tokens: int, adapter: bool, base: str | None) -> list[str]:
    import torch

    if adapter:
        from peft import PeftModel

        base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(str(path / "adapter_config.json"), "names no base model", "pass --base MODEL")
        try:
            base_model = load_causal_lm(base, "float32")
        except (OSError, ValueError) as exc:
            raise UserError(str(base), f"cannot load the adapter's base model: {first_line(exc)}",
                            "pass --base with the base model's folder") from None  # fmt: skip
        model = PeftModel.from_pretrained(base_model, str(path))
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
