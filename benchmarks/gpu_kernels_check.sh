#!/usr/bin/env bash
# GPU check of the paged-attention / KV-copy Triton kernels (issue 4). Run from the repository root on a CUDA
# machine (no network needed):
#     bash benchmarks/gpu_kernels_check.sh [OUT_DIR]
# 1. installs carried wheels (.whl/: pydantic & co, needed by `import dualpath`) into /tmp/site when present;
# 2. runs the kernel tests natively (no TRITON_INTERPRET) and the model-vs-backend tests on CUDA;
# 3. `dualpath bench kernels --json OUT/kernels.json`: paged decode GB/s and % of peak bandwidth, prefill with
#    prefix vs torch SDPA (flash), Layer Block gather/scatter vs torch indexing.
set -uo pipefail
OUT_DIR="${1:-${OUT:-/tmp/dualpath-gpu}}"
mkdir -p "$OUT_DIR"
if ls .whl/pydantic-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/pydantic-*.whl .whl/pydantic_core-*.whl .whl/annotated_types-*.whl .whl/typing_inspection-*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
rc=0
python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/kernels tests/model/test_model_backends.py \
  2>&1 | tee "$OUT_DIR/kernel_tests.log" || rc=1
# the bench module directly (same code as `dualpath bench kernels`), so other commands' imports cannot interfere
python3 - --json "$OUT_DIR/kernels.json" <<'PY' 2>&1 | tee "$OUT_DIR/bench.log" || rc=1
import argparse, sys
from dualpath.commands import bench_kernels as b
p = argparse.ArgumentParser(); b.add_arguments(p)
sys.exit(b.run(p.parse_args(sys.argv[1:])))
PY
exit $rc
