"""Training speed-ups taken from well-kept libraries, each one a setting that can be switched off.

- fused kernels: Liger Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy (CUDA only);
- micro-batch: the largest split of the configured effective batch that fits on the GPU, so the same
  optimizer steps see the same samples, in fewer, fuller forward passes;
- packing (`strategy: packed` in the data config) lives with the data step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any

MEMORY_HEADROOM = 0.9  # of the card's memory a micro-batch probe may reach


def liger_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def fast_training_args(settings: Any, model, max_len: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """TrainingArguments that change speed, never what one optimizer step learns from."""
    import torch

    args: dict[str, Any] = {}
    if settings.fused_kernels:
        if liger_available():
            args["use_liger_kernel"] = True
        elif torch.cuda.is_available():
            log("fused kernels: liger-kernel is not installed (pip install liger-kernel); training without")
    training = settings.training_args
    effective = effective_batch(settings)
    share = effective // world_size()  # the launcher chose a process count that divides the batch
    micro = None
    if settings.micro_batch_size == "auto":
        micro = largest_micro_batch(model, share, max_len) if torch.cuda.is_available() else None
    elif settings.micro_batch_size is not None:
        micro = settings.micro_batch_size
    if micro is None and world_size() > 1:  # as configured, but each process takes only its share
        micro = int(training.get("per_device_train_batch_size", 8))
    if micro:
        micro = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
        args["per_device_train_batch_size"] = micro
        args["gradient_accumulation_steps"] = share // micro
        log(f"micro-batch {micro} x {share // micro} accumulation steps (effective batch {effective})")
    return args


def effective_batch(settings: Any) -> int:
    """Samples per optimizer step, as the config says (per-device batch x accumulation, on one device)."""
    args = settings.training_args
    return int(args.get("per_device_train_batch_size", 8)) * int(args.get("gradient_accumulation_steps", 1))


def local_rank() -> int:
    """This process's GPU on its machine (torchrun sets LOCAL_RANK; 0 when training alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Processes training together (torchrun sets WORLD_SIZE); each takes its share of every batch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def largest_micro_batch(model, effective: int, max_len: int) -> int:
    """Try forward and backward passes of full-length samples, from the whole effective batch down."""
    import torch

    device = torch.device("cuda", local_rank())
    if next(model.parameters()).device != device:  # loaded on the CPU: the Trainer would move it there anyway
        model.to(device)
    budget = torch.cuda.get_device_properties(device).total_memory * MEMORY_HEADROOM
    vocab = model.config.vocab_size
    for micro in (d for d in range(effective, 0, -1) if effective % d == 0):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            ids = torch.randint(0, vocab, (micro, max_len), device=device)
            model(input_ids=ids, labels=ids).loss.backward()
            fits = torch.cuda.max_memory_allocated(device) < budget
        except torch.cuda.OutOfMemoryError:
            fits = False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        if fits:
            return _smallest_of_all_processes(micro)
    return 1


def _smallest_of_all_processes(micro: int) -> int:
    """Data-parallel processes must agree on one micro-batch: the one that fits on every GPU."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return micro
    value = torch.tensor([micro], device=torch.device("cuda", local_rank()))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
