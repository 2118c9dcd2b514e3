#!/usr/bin/env bash
# The CPU demo: a tiny random Phi-3 (built offline), LoRA on the tone dataset, merge, int4 ONNX, generate.
# The random base model knows no English: what it learns in 80 steps is the dataset's format and its labels.
set -euo pipefail
cd "$(dirname "$0")"
[ -d tiny-phi3 ] || grove tiny-model tiny-phi3 --arch phi3
grove run --config tiny-cpu.json
grove infer outputs/tiny-phi3-tone/onnx/int4-cpu --prompts-file prompts.txt --max-new-tokens 4
