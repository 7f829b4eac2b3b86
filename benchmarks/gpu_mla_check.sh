#!/usr/bin/env bash
# GPU check of the MLA latent kernels and the DeepSeek-V3 model (issue 14). Run from the repository root on a CUDA
# machine (no network needed):
#     bash benchmarks/gpu_mla_check.sh [OUT_DIR]
# 1. installs carried wheels (.whl/: pydantic & co, needed by `import dualpath`) into /tmp/site when present;
# 2. runs the MLA kernel tests natively (no TRITON_INTERPRET);
# 3. benchmarks/gpu_mla_bench.py --json OUT/mla.json: paged MLA decode GB/s and % of peak HBM bandwidth (batch 64,
#    8K context, 512 + 64 latent, bf16 and FP8 rows; 128 and 16 query heads), prefill-with-prefix vs SDPA on
#    decompressed K/V. Check the script itself on CPU with `python3 benchmarks/gpu_mla_bench.py --smoke`.
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
rc=0
python3 -m pytest -q -p no:cacheprovider -o addopts=-ra tests/kernels/test_kernels_mla.py \
  2>&1 | tee "$OUT_DIR/mla_tests.log" || rc=1
# 128 query heads (DeepSeek-V3 on one GPU: near the compute/memory ridge) and 16 (TP8 share: memory-bound)
python3 benchmarks/gpu_mla_bench.py --json "$OUT_DIR/mla.json" 2>&1 | tee "$OUT_DIR/mla_bench.log" || rc=1
python3 benchmarks/gpu_mla_bench.py --heads 16 --json "$OUT_DIR/mla_h16.json" 2>&1 | tee -a "$OUT_DIR/mla_bench.log" || rc=1
exit $rc
