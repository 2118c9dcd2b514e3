"""Training speed-ups taken from well-kept libraries, each one a setting that can be switched off.

- compiled layers: torch.compile on each decoder layer, which fuses PEFT's casts, dropout and scaling
  with the norms, rotary and SwiGLU around them, replayed as CUDA graphs (CUDA only);
- fused kernels: Liger Kernel's fused linear cross-entropy, and its RMSNorm, RoPE and SwiGLU where the
  layers are not compiled (CUDA only);
- no GPU waits: the Trainer's per-micro-batch NaN check on the logged loss and blocking batch copies
  each make the CPU wait for the GPU, which then idles while the CPU queues the next pass;
- lean memory: with gradient checkpointing, each layer's input (all that is kept of it) can wait in pinned
  host memory until the backward pass, copied both ways without making the CPU wait;
- micro-batch: the largest split of the configured effective batch that fits on the GPU, so the same
  optimizer steps see the same samples, in fewer, fuller forward passes;
- packing (`strategy: packed` in the data config) lives with the data step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OFFLOAD_BYTES = 1 << 20  # saved tensors smaller than this stay where they are: not worth a copy
MEMORY_HEADROOM = 0.9  # of the card's memory a micro-batch probe may reach
# Every in-layer switch of Liger's per-model functions (each takes the ones it knows), off: only the loss.
LIGER_LOSS_ONLY = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rms_norm": False, "rope": False,
                   "swiglu": False, "geglu": False, "layer_norm": False}  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Which of the processes training together this one is (torchrun's ranks); alone by default."""

    rank: int = 0
    local_rank: int = 0  # this process's GPU on its machine
    world_size: int = 1  # processes training together; each takes its share of every batch


def liger_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def fast_training_args(
    settings: Any,
    model,
    max_len: int,
    placement: Placement = Placement(),
    log: Callable[[str], None] = print,
    compiled_layers: bool = False,
) -> dict[str, Any]:
    """TrainingArguments that change speed, never what one optimizer step learns from."""
    import torch

    args: dict[str, Any] = {}
    if settings.fused_kernels:
        if liger_available():
            args["use_liger_kernel"] = True
            if compiled_layers:  # inductor fuses the in-layer ones better; the loss stays Liger's
                args["liger_kernel_config"] = LIGER_LOSS_ONLY
        elif torch.cuda.is_available():
            log("fused kernels: liger-kernel is not installed (pip install liger-kernel); training without")
    training = settings.training_args
    if torch.cuda.is_available() and "logging_nan_inf_filter" not in training:
        args["logging_nan_inf_filter"] = False  # its isnan() waits for every micro-batch; only logging reads it
    if torch.cuda.is_available() and "accelerator_config" not in training:
        from transformers.trainer_pt_utils import AcceleratorConfig

        args["accelerator_config"] = AcceleratorConfig(non_blocking=True)  # batches are pinned: copy, don't wait
    effective = effective_batch(settings)
    share = effective // placement.world_size  # the launcher chose a process count that divides the batch
    micro = None
    if settings.micro_batch_size == "auto":
        micro = largest_micro_batch(model, share, max_len, placement) if torch.cuda.is_available() else None
    elif settings.micro_batch_size is not None:
        micro = settings.micro_batch_size
    if micro is None and placement.world_size > 1:  # as configured, but each process takes only its share
        micro = int(training.get("per_device_train_batch_size", 8))
    if micro:
        micro = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
        args["per_device_train_batch_size"] = micro
        args["gradient_accumulation_steps"] = share // micro
        log(f"micro-batch {micro} x {share // micro} accumulation steps (effective batch {effective})")
    return args


def decoder_layers(model) -> list:
    """The model's decoder layers: the classes transformers keeps whole when it splits a model."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names] if names else []


def layers_to_compile(settings: Any, model) -> list:
    """The decoder layers `compile_layers` compiles: on CUDA, unless the Trainer compiles the whole model."""
    import torch

    whole_model = bool(settings.training_args.get("torch_compile", False))
    wanted = settings.compile_layers and torch.cuda.is_available() and not whole_model
    return decoder_layers(model) if wanted else []


def replays_cuda_graphs(
    settings: Any, layers: list, sample_lengths: set[int], evaluates: bool, placement: Placement = Placement()
) -> bool:
    """CUDA graphs where they were measured: one process, training samples of one length (a graph is
    recorded per shape), no evaluation (other shapes again), no gradient checkpointing (which re-runs
    layers inside the backward pass)."""
    recomputes = settings.recomputes_layers
    static = len(sample_lengths) == 1 and not evaluates
    alone = placement.world_size == 1
    return settings.cuda_graphs and static and alone and not recomputes and bool(layers)


def compile_layers(layers: list, cuda_graphs: bool) -> None:
    """torch.compile each decoder layer on its own: small graphs that compile in seconds, have no breaks,
    and are shared by all layers; the model around them (masks, embeddings, loss) stays eager, so packed
    position ids and Liger's loss work as before. With `cuda_graphs`, each layer's kernels are recorded
    once and replayed, which takes the CPU's kernel launches (the bottleneck at one sample per pass) off
    the critical path."""
    options = {"triton.cudagraphs": True} if cuda_graphs else None  # what mode="reduce-overhead" sets
    for layer in layers:
        layer.compile(options=options)


class _Offloaded:
    """A saved tensor in host memory; `previous` is the one saved before it, which the backward pass needs next."""

    def __init__(self, device, host, previous: _Offloaded | None) -> None:
        self.device, self.host, self.previous = device, host, previous
        self.back, self.ready = None, None


def offload_saved_tensors(model, device_type: str = "cuda", smallest: int = OFFLOAD_BYTES) -> None:
    """Tensors autograd saves during the model's forward pass wait in host memory for the backward pass. With
    gradient checkpointing those are each layer's input and the loss's; the model's own weights, and tensors
    under `smallest` bytes, stay put. On CUDA the copies run on a stream of their own into pinned memory, and
    the backward pass brings back each layer's input while the layer after it is recomputed, so neither
    direction holds up the compute stream. `device_type` is the device whose tensors move (a test moves CPU
    tensors to other CPU memory)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    cuda = device_type == "cuda"
    copies = torch.cuda.Stream() if cuda else None
    last: list[_Offloaded | None] = [None]  # the latest of this forward pass

    def pack(tensor):
        if (tensor.device.type != device_type or tensor.untyped_storage().data_ptr() in weights
                or tensor.numel() * tensor.element_size() < smallest):  # fmt: skip
            return tensor
        item = _Offloaded(tensor.device, torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=cuda), last[0])
        if cuda:
            copies.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(copies):
                item.host.copy_(tensor, non_blocking=True)
            tensor.record_stream(copies)  # its memory is not reused before the copy has read it
        else:
            item.host.copy_(tensor)
        last[0] = item
        return item

    def fetch(item: _Offloaded) -> None:
        if item.back is not None:
            return
        if not cuda:
            item.back = item.host.clone()
            return
        with torch.cuda.stream(copies):
            item.back = item.host.to(item.device, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(copies)

    def unpack(item):
        if not isinstance(item, _Offloaded):
            return item
        fetch(item)
        if item.previous is not None:
            fetch(item.previous)  # the layer before is recomputed next: its input comes back meanwhile
            item.previous = None
        back, item.back = item.back, None
        if cuda:
            torch.cuda.current_stream().wait_event(item.ready)
            back.record_stream(torch.cuda.current_stream())
        return back

    def forward_begins(*_):
        last[0] = None
        hooks.__enter__()

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
    model.register_forward_pre_hook(forward_begins)
    model.register_forward_hook(lambda *_: hooks.__exit__(None, None, None), always_call=True)


def mark_graph_steps(model) -> None:
    """Each forward pass starts a new step of the graphs: the last step's graph outputs may be reused."""
    import torch

    model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())


def release_compiled_layers() -> None:
    """Compiled code and the CUDA graphs' memory pool live as long as the process, beyond the model they
    were made for: the steps after training (merge, ModelBuilder, inference) get that GPU memory back."""
    import torch

    if torch.cuda.is_available():
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def gradients_outside_graphs(model):
    """A Trainer callback that gives the adapter zero gradients before each optimizer step.

    Without them, the first micro-batch's backward pass hands its graph-owned output to `.grad`, and the
    next replay would overwrite it; with them, every micro-batch adds into memory of the parameters' own.
    """
    import torch
    from transformers import TrainerCallback

    trainable = [p for p in model.parameters() if p.requires_grad]

    class GradientsOutsideGraphs(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            for parameter in trainable:  # the Trainer sets them to None after each optimizer step
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)

    return GradientsOutsideGraphs()


def effective_batch(settings: Any) -> int:
    """Samples per optimizer step, as the config says (per-device batch x accumulation, on one device)."""
    args = settings.training_args
    return int(args.get("per_device_train_batch_size", 8)) * int(args.get("gradient_accumulation_steps", 1))


def largest_micro_batch(model, effective: int, max_len: int, placement: Placement = Placement()) -> int:
    """Try forward and backward passes of full-length samples, from the whole effective batch down."""
    import torch

    device = torch.device("cuda", placement.local_rank)
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
            return _smallest_of_all_processes(micro, placement)
    return 1


def _smallest_of_all_processes(micro: int, placement: Placement) -> int:
    """Data-parallel processes must agree on one micro-batch: the one that fits on every GPU."""
    import torch
    import torch.distributed as dist

    if placement.world_size == 1 or not dist.is_initialized():
        return micro
    value = torch.tensor([micro], device=torch.device("cuda", placement.local_rank))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
