#!/usr/bin/env bash
# One device run for issue 16's GPU items, then the Triton kernels natively. Run from the repository root on a
# CUDA machine (no network needed):
#     bash benchmarks/gpu_issue16_check.sh [OUT_DIR]
# Wheels the GPU image lacks travel in .whl/ (pydantic & co, pyzmq, kvikio-cu13 + libkvikio-cu13 +
# rapids-logger, nixl-cu13 without its nixl_ep modules and unused plugins); they go to /tmp/site.
# Steps, each under its own deadline so one failure cannot eat the others' time:
#   1. nixl VRAM to VRAM between two processes: `dualpath bench transport --backends nixl --device cuda`
#      (ours / raw NIXL WRITE at 64 KiB .. 16 MiB; landed bytes hashed against the source)
#   2. kvikio: the storage contract suite (kvikio backend), cross-backend format, reads into GPU memory vs
#      posix + H2D, raw preadv + H2D and kvikio's own raw CuFile.pread (benchmarks/gpu_kvikio_check.py)
#   3. the engine's layer-wise streaming overhead with a real (random-init, ~250M) Llama on the GPU
#      (benchmarks/bench_paths.py: DE path / PE path prefill time, target <= 1.10)
#   4. kernel tests natively (no TRITON_INTERPRET) and the model-vs-backend tests on CUDA
#   5. `dualpath bench kernels` and the MLA decode/prefill bench
#   6. (not by default) the host side on the GPU machine's cores: `dualpath bench storage`, and
#      `dualpath bench transport` over DRAM
#   7. (not by default) the MLA kernel tests and benchmarks/gpu_mla_sweep.py (tile / launch settings)
#   8. (not by default) MLA prefill, model level: absorbed vs decompressed vs auto
#      (benchmarks/gpu_mla_prefill_forms.py), then the DeepSeek model tests and the PE staging tests
# STEPS="1 2 6" runs those steps only (default "1 2 3 4 5").
set -uo pipefail
OUT_DIR="${1:-${OUT:-/tmp/dualpath-gpu}}"
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
T0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
dp() { python3 -c 'import sys; from dualpath.cli import main; sys.argv[0] = "dualpath"; sys.exit(main())' "$@"; }
rc=0
step "environment"
nvidia-smi -L
python3 -c "import torch, triton, zmq, pydantic; print('torch', torch.__version__, 'triton', triton.__version__, \
'pyzmq', zmq.__version__, 'pydantic', pydantic.__version__, torch.cuda.get_device_name())" || rc=1
python3 -c "import kvikio; print('kvikio', kvikio.__version__)" || rc=1
python3 -c "import nixl_cu13; print('nixl_cu13 ok')" || rc=1

s1() {
  step "1. nixl VRAM -> VRAM, two processes (default config, then notifications polled on the event loop)"
  timeout 80 bash -c "$(declare -f dp); dp bench transport --backends nixl --device cuda --no-links --repeats 3 \
    --json '$OUT_DIR/transport_vram.json'" || rc=1
  timeout 80 bash -c "$(declare -f dp); dp bench transport --backends nixl --device cuda --no-links --repeats 3 \
    --nixl-config '{\"notif_thread\": false}' --json '$OUT_DIR/transport_vram_loop.json'" || rc=1
}
s2() {
  step "2. kvikio"
  timeout 130 python3 benchmarks/gpu_kvikio_check.py --blocks 256 --repeats 5 --json "$OUT_DIR/kvikio.json" || rc=1
}
s3() {
  step "3. layer-wise streaming overhead, real model on the GPU"
  timeout 100 python3 benchmarks/bench_paths.py --skip-synthetic --skip-io --llama-size medium --prompt 8192 \
    --repeats 5 --json "$OUT_DIR/paths.json" || rc=1
}
s4() {
  step "4. kernel tests natively"
  timeout 130 python3 -m pytest -q -p no:cacheprovider -n 8 -o addopts=-ra tests/kernels \
    tests/model/test_model_backends.py > "$OUT_DIR/kernel_tests.log" 2>&1 || rc=1
  tail -25 "$OUT_DIR/kernel_tests.log"
}
s5() {
  step "5. kernel benchmarks"
  timeout 70 bash -c "$(declare -f dp); dp bench kernels --json '$OUT_DIR/kernels.json'" || rc=1
  timeout 50 python3 benchmarks/gpu_mla_bench.py --json "$OUT_DIR/mla.json" || rc=1
}
s6() {
  step "6. the host side on this machine's 16 cores: storage (posix verified vs raw) and DRAM transports"
  timeout 60 bash -c "$(declare -f dp); dp bench storage --json '$OUT_DIR/storage_host.json'" || rc=1
  timeout 150 bash -c "$(declare -f dp); dp bench transport --backends loopback,zmq,nixl --no-links --repeats 3 \
    --json '$OUT_DIR/transport_host.json'" || rc=1
}
s7() {
  step "7. MLA kernels: tests natively, then a sweep of their tile and launch settings"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -n 8 -o addopts=-ra tests/kernels/test_kernels_mla.py \
    > "$OUT_DIR/mla_tests.log" 2>&1 || rc=1
  tail -5 "$OUT_DIR/mla_tests.log"
  timeout 200 python3 benchmarks/gpu_mla_sweep.py --budget-s 170 --json "$OUT_DIR/mla_sweep.json" || rc=1
}
s8() {
  step "8. MLA prefill forms (model level), then the DeepSeek model and PE staging tests"
  timeout 150 python3 benchmarks/gpu_mla_prefill_forms.py --json "$OUT_DIR/mla_prefill_forms.json" || rc=1
  timeout 90 python3 -m pytest -q -p no:cacheprovider -n 8 -o addopts=-ra tests/model/test_deepseek.py \
    tests/integration/test_pe_prefetch.py > "$OUT_DIR/model_tests.log" 2>&1 || rc=1
  tail -5 "$OUT_DIR/model_tests.log"
}
for s in ${STEPS:-1 2 3 4 5}; do "s$s"; done
step "done, rc=$rc"
exit $rc
