"""The ceiling for training a LoRA on Phi-3-mini with these libraries: what cuBLAS and each of PyTorch's
attention kernels take for one decoder layer's work at the training step's shapes, with nothing else.

A frozen base needs, per linear layer, its forward matmul and the input gradient's (no weight gradient);
attention needs its forward and backward. The sum over 32 layers plus the LM head is the step's time with
every element-wise kernel, the adapter, the loss and the optimizer free; tokens/s and MFU from it (counted as
`train_throughput.py` counts) bound what any training step on this GPU can reach.

    python benchmarks/layer_ceiling.py                    # on the GPU: benchmarks/results/<gpu>-layer-ceiling.json
    python benchmarks/layer_ceiling.py --micro-batch 1    # at the baseline's micro-batch
    python benchmarks/layer_ceiling.py --tiny             # a smoke test on any machine
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (
    at_least,
    command_line,
    flops_per_token,
    gpu_in_use,
    make_out,
    phi3_mini_config,
    write_results,
)

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip


def timed_ms(work, repeats: int) -> float:
    """Median milliseconds of `work()` after one warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def frozen_linear_ms(tokens: int, inputs: int, outputs: int, dtype, device, repeats: int) -> float:
    """Forward y = x·Wᵀ and the input gradient dy·W, what a frozen linear layer costs in training."""
    x = torch.randn(tokens, inputs, dtype=dtype, device=device)
    w = torch.randn(outputs, inputs, dtype=dtype, device=device)
    dy = torch.randn(tokens, outputs, dtype=dtype, device=device)
    return timed_ms(lambda: (x @ w.t(), dy @ w), repeats)


def attention_ms(backend, batch: int, heads: int, seq: int, head_dim: int, dtype, device, repeats: int) -> float | str:
    """Causal attention forward and backward with one of PyTorch's kernels, or why it cannot run here."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grad = torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device)

    def step():
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(out, (q, k, v), grad)

    try:
        return timed_ms(step, repeats)
    except RuntimeError as exc:
        return f"unavailable: {str(exc).splitlines()[0][:160]}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on any device: a smoke test")
    parser.add_argument("--micro-batch", type=at_least(1), default=4, help="samples per pass (the step's default: 4)")
    parser.add_argument("--seq", type=at_least(2), help="tokens a sample (default 2048; --tiny: 64)")
    parser.add_argument("--repeats", type=at_least(1), default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    make_out(parser, args.out)

    cfg = phi3_mini_config(args.tiny)
    seq = args.seq or (64 if args.tiny else 2048)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tokens = args.micro_batch * seq
    hidden, mlp, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    linears = {"qkv_proj": (hidden, 3 * hidden), "o_proj": (hidden, hidden), "gate_up_proj": (hidden, 2 * mlp),
               "down_proj": (mlp, hidden)}  # fmt: skip
    rows = {name: frozen_linear_ms(tokens, i, o, dtype, device, args.repeats) for name, (i, o) in linears.items()}
    attention = {name: attention_ms(backend, args.micro_batch, heads, seq, hidden // heads, dtype, device, args.repeats)
                 for name, backend in BACKENDS.items()}  # fmt: skip
    timed = {name: ms for name, ms in attention.items() if isinstance(ms, float)}
    best = min(timed, key=timed.get)
    head_ms = frozen_linear_ms(tokens, hidden, cfg.vocab_size, dtype, device, args.repeats)
    layer_ms = sum(rows.values()) + timed[best]
    step_ms = cfg.num_hidden_layers * layer_ms + head_ms
    tok_s = tokens / (step_ms / 1e3)
    gpu, label, peak_flops = gpu_in_use()
    n_params = sum(i * o for i, o in linears.values()) * cfg.num_hidden_layers + 2 * hidden * cfg.vocab_size
    mfu = tok_s * flops_per_token(cfg, n_params, seq / 2) / peak_flops

    print(f"{gpu}: one decoder layer at {args.micro_batch} x {seq} tokens (forward + input gradients)")
    for name, ms in rows.items():
        inputs, outputs = linears[name]
        print(f"  {name:<14} {ms:8.3f} ms  {4 * tokens * inputs * outputs / ms / 1e9:7.1f} TFLOP/s")
    for name, ms in attention.items():
        print(f"  attention/{name:<10} {ms:8.3f} ms" if isinstance(ms, float) else f"  attention/{name:<10} {ms}")
    print(f"  lm_head        {head_ms:8.3f} ms")
    print(f"ceiling: {step_ms:.1f} ms a pass, {tok_s:,.0f} tokens/s, {100 * mfu:.1f}% MFU (attention: {best})")
    summary = {"gpu": gpu, "torch": torch.__version__, "command": command_line(__file__, argv),
               "micro_batch": args.micro_batch, "seq": seq, "linear_ms": rows, "attention_ms": attention,
               "lm_head_ms": head_ms, "best_attention": best, "step_ms": step_ms, "ceiling_tok_s": tok_s,
               "ceiling_mfu": mfu}  # fmt: skip
    name = f"{'tiny-' if args.tiny else ''}{label}-layer-ceiling-micro-{args.micro_batch}"
    write_results(args.out / f"{name}{f'-seq-{args.seq}' if args.seq else ''}.json", summary)
    return summary


if __name__ == "__main__":
    main()
