#!/usr/bin/env bash
# The CPU demo: a tiny random Phi-3 (built offline), LoRA on the tone dataset, merge, int4 ONNX, generate.
set -euo pipefail
cd "$(dirname "$0")"
[ -d tiny-phi3 ] || grove tiny-model tiny-phi3 --arch phi3
grove run --config tiny-cpu.json
grove infer outputs/tiny-phi3-tone/onnx/int4-cpu --max-new-tokens 12 \
  --prompt "$(printf '### Text: The storm knocked out our power all night.\n### The tone is:\n')"
