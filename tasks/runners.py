"""One way to run any model a run made — a Hugging Face folder or an ONNX model — for the steps that measure
models: logits of a whole sequence, and greedy generation from token ids. Token ids come from the model's
Hugging Face tokenizer for both kinds, so the two see exactly the same tokens.

A Hugging Face model runs on the GPU when there is one; an ONNX model on the execution provider it was
built for (ONNX Runtime for logits, ONNX Runtime GenAI for generation, each opened when first asked for).
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path

from olive_grove.tasks.artifact import Artifact
from olive_grove.tasks.models import ModelInfo, load_causal_lm, load_tokenizer
from olive_grove.tasks.onnx_build import OnnxInfo

ONNX_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NOT_A_MODEL = "an adapter: it is measured as the merged model"


def why_not_runnable(artifact: Artifact) -> str | None:
    """Why this machine cannot run a model of the run (None: it can): an ONNX model with LoRA inputs, or
    one for an execution provider that onnxruntime lacks here, or an adapter (NOT_A_MODEL)."""
    if isinstance(artifact.info, OnnxInfo):
        import onnxruntime

        if artifact.info.adapter_fingerprint is not None:
            return "its LoRA weights are inputs (an adapter must be chosen)"
        provider = ONNX_PROVIDERS.get(artifact.info.execution_provider)
        if provider not in onnxruntime.get_available_providers():
            return f"built for {artifact.info.execution_provider}, which onnxruntime cannot run here"
        return None
    return None if isinstance(artifact.info, ModelInfo) else NOT_A_MODEL


class Runner(ABC):
    """A model of the run, ready to score and generate."""

    def __init__(self, artifact: Artifact) -> None:
        self.path = Path(artifact.path)
        self.trust_remote_code = getattr(artifact.info, "trust_remote_code", False)
        self.tokenizer = load_tokenizer(str(self.path), self.trust_remote_code)

    def encode(self, text: str) -> list[int]:
        """As training tokenized its text pieces: the template (or chat template) writes special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @abstractmethod
    def logits(self, ids: list[int]):
        """Next-token logits at every position of `ids` (a numpy array, positions × vocabulary)."""

    @abstractmethod
    def generate(self, ids: list[int], max_new_tokens: int, exactly: bool = False) -> list[int]:
        """Greedy new tokens after `ids`: until the end of text or `max_new_tokens`; `exactly` goes on to
        `max_new_tokens` whatever the model says (a timed run does the same work each time)."""

    def timed_generate(self, ids: list[int], max_new_tokens: int) -> tuple[float, int]:
        """Seconds for the prompt and `max_new_tokens` generated tokens, and how many were generated."""
        started = time.perf_counter()
        new = self.generate(ids, max_new_tokens, exactly=True)
        self.synchronize()
        return time.perf_counter() - started, len(new)

    def synchronize(self) -> None:
        """Wait for work queued on an accelerator (a timing ends when the work does); ONNX Runtime GenAI
        returns each token when it is done."""
        return None

    @property
    @abstractmethod
    def context_length(self) -> int | None:
        """The most tokens the model takes, where its config says."""


class HuggingFaceRunner(Runner):
    def __init__(self, artifact: Artifact) -> None:
        import torch

        super().__init__(artifact)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.model = load_causal_lm(str(self.path), dtype, self.trust_remote_code).to(self.device).eval()

    def logits(self, ids: list[int]):
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()

    def generate(self, ids: list[int], max_new_tokens: int, exactly: bool = False) -> list[int]:
        import torch

        prompt = torch.tensor([ids], device=self.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if exactly else 0,
                                      pad_token_id=self.tokenizer.pad_token_id)  # fmt: skip
        return [int(t) for t in out[0, len(ids) :]]

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def synchronize(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()


class OnnxRunner(Runner):
    def __init__(self, artifact: Artifact[OnnxInfo]) -> None:
        super().__init__(artifact)
        self.provider = ONNX_PROVIDERS[artifact.info.execution_provider]
        self.config = json.loads((self.path / "genai_config.json").read_text())["model"]
        self.decoder = self.config["decoder"]

    @property
    def context_length(self) -> int | None:
        return self.config.get("context_length")

    @cached_property
    def _session(self):
        import onnxruntime

        return onnxruntime.InferenceSession(str(self.path / self.decoder["filename"]), providers=[self.provider])

    @cached_property
    def _genai_model(self):
        from olive_grove.tasks.inference import open_onnx_model

        return open_onnx_model(self.path, on_cpu=self.provider == "CPUExecutionProvider")

    def logits(self, ids: list[int]):
        """The decoder run over the whole sequence with an empty KV cache."""
        import numpy as np

        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        heads, head_size = self.decoder["num_key_value_heads"], self.decoder["head_size"]
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feeds |= {i.name: np.zeros((1, heads, 0, head_size), types.get(i.type, np.float32))
                  for i in self._session.get_inputs() if i.name.startswith("past_key")}  # fmt: skip
        return self._session.run(["logits"], feeds)[0][0]

    def generate(self, ids: list[int], max_new_tokens: int, exactly: bool = False) -> list[int]:
        return generate_genai(self._genai_model, ids, max_new_tokens, exactly=exactly)


def generate_genai(model, ids: list[int], max_new_tokens: int, adapters=None, adapter: str | None = None,
                   exactly: bool = False) -> list[int]:  # fmt: skip
    """Greedy new tokens from an ONNX Runtime GenAI model, with one of its adapters active if given."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = len(ids) + max_new_tokens
    params.set_search_options(max_length=length, min_length=length if exactly else 0, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, adapter)
    generator.append_tokens(ids)
    new: list[int] = []
    while not generator.is_done() and len(new) < max_new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


def open_runner(artifact: Artifact) -> Runner:
    return OnnxRunner(artifact) if isinstance(artifact.info, OnnxInfo) else HuggingFaceRunner(artifact)
