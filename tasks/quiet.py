"""Library noise, tamed in one place: warnings, log lines and progress bars that tell a user nothing."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Modules whose UserWarnings, FutureWarnings and DeprecationWarnings are about their own internals.
NOISY_MODULES = r"(torch|transformers|peft|accelerate|bitsandbytes|datasets|onnx|onnx_ir|onnxruntime_genai)\b.*"
# azure.identity logs each credential it tried (the one-line error already says what to do); ONNX Runtime's
# quantizer logs two lines for each weight it quantizes.
NOISY_LOGGERS = ("transformers", "datasets", "peft", "accelerate", "bitsandbytes", "onnx_ir", "onnxruntime",
                 "httpx", "azure")  # fmt: skip


def quiet_library_defaults() -> None:
    """Progress bars and advisories off, unless the user's environment asks for them; called at the edges
    (the CLI, the flow a worker starts), before the libraries are imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Writing model shards" and friends
    # datasets logs its own ERROR line for a file it cannot parse, before the error that names the config key.
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """The libraries' own warnings silenced for the call inside; a user's code keeps all of its warnings."""
    with warnings.catch_warnings():
        for category in (UserWarning, FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
        yield
