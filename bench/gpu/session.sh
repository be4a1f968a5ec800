#!/usr/bin/env bash
# The GPU checks and benchmarks that wait for the lent H200, in two calls of under 10 minutes
# each, most important first; every step has its own time limit and writes $OUT/NAME.txt, so
# that a step that fails or runs long costs only itself. Fetch the wheels here first
# (bash bench/gpu/fetch_wheels.sh) and carry .whl:
#
#   run(command="bash bench/gpu/session.sh a", carry=[".whl"])   # checks, then dense speed
#   run(command="bash bench/gpu/session.sh b", carry=[".whl"])   # MoE/MLA kernels and models
set -uo pipefail
source bench/gpu/setup.sh || { echo "setup failed"; exit 1; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
step() {  # step NAME SECONDS COMMAND...: run it, keep its output, report its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.txt"
}
nvidia-smi -L
case "${1:-a}" in
a)
  # Why a CUDA IPC write failed last time: -rA keeps the captured log of every test.
  step cuda_ipc 120 python3 -m pytest -x -q -rA tests/gpu/test_cuda_ipc.py
  # The kernels compiled (not interpreted) against the torch reference.
  step kernels 240 python3 -m pytest -x -q tests/engine/test_triton_attention.py \
    tests/engine/test_fused_ops.py tests/engine/test_mla_extend.py
  # The decode split kernel's tiles: 64 keys x 4 warps (the default) spills on sm_90.
  step decode_tiles 150 python3 -m bench.attention_kernel --shapes 1x2048,64x2048,256x512 \
    --block-n 32,64 --num-warps 4,8 --num-stages 2,3
  # Overlapped scheduling's gain: the same decode shapes with and without it.
  step llama_overlap 200 python3 -m bench.engine --preset llama3-8b --skip-hf \
    --decode 1x128,64x128,64x2048,256x512 --prefill '' --repeats 2
  step llama_plain 200 python3 -m bench.engine --preset llama3-8b --skip-hf \
    --decode 1x128,64x128,64x2048,256x512 --prefill '' --repeats 2 --disable-overlap-schedule
  ;;
b)
  step check_moe 150 python3 -m bench.check_moe_gpu
  step mla_extend 120 python3 -m bench.mla_kernel --mode extend
  step moonlight 200 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  step grammar 60 python3 -m bench.grammar
  ;;
*) echo "usage: bench/gpu/session.sh a|b"; exit 2 ;;
esac
