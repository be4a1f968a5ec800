#!/usr/bin/env bash
# The GPU checks and benchmarks that wait for the lent H200, in two calls of under 10 minutes
# each, most important first; every step has its own time limit and writes $OUT/NAME.txt, so
# that a step that fails or runs long costs only itself. Fetch the wheels here first
# (bash bench/gpu/fetch_wheels.sh) and carry .whl:
#
#   run(command="bash bench/gpu/session.sh a", carry=[".whl"])   # what to change: profiles, tunes
#   run(command="bash bench/gpu/session.sh b", carry=[".whl"])   # the changes checked and timed
set -uo pipefail
source bench/gpu/setup.sh || { echo "setup failed"; exit 1; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-570}  # seconds: a call may run 600, and the rest must come back
step() {  # step NAME SECONDS COMMAND...: run it, keep its output, report its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then echo "== $name: skipped, the call's time is spent"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.txt"
}
nvidia-smi -L
case "${1:-a}" in
a)
  # The skinny Triton GEMM's tiles against cuBLAS at M = 1, 4, 16 on Llama-3-8B's projections
  # (QKV and O first: cuBLAS streams them at 74% of the copy rate); rows flush as they come.
  # Compiled, with programmatic dependent launch on: the skinny GEMM against torch, and
  # graph replay against eager and transformers.
  step pdl_tests 90 env PDSERVE_PDL=1 python3 -m pytest -x -q -rf \
    tests/engine/test_skinny_gemm.py tests/engine/test_triton_attention.py::test_graph_replay_equals_eager
  TAIL=90 step skinny_gemm 170 python3 -m bench.skinny_gemm --reps 10 --rows 1,4,16,64 \
    --shapes qkv,o,down,gate_up,gate_up_silu
  # The whole step with every decode-sized linear layer on the skinny GEMM (its tile rule)
  # against cuBLAS, in one run.
  for g in triton torch; do
    step "llama_gemm_$g" 60 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
      --decode 1x128,16x128,64x128 --repeats 2 --gemm-backend "$g"
  done
  # And with programmatic dependent launch for the Triton kernels (engine/kernels/pdl.py).
  step llama_gemm_triton_pdl 60 env PDSERVE_PDL=1 python3 -m bench.engine --preset llama3-8b \
    --skip-hf --prefill '' --decode 1x128,16x128,64x128 --repeats 2 --gemm-backend triton
  step qwen3_triton_pdl 60 env PDSERVE_PDL=1 python3 -m bench.engine --preset qwen3-30b-a3b \
    --skip-hf --decode 1x128,64x128 --prefill '' --repeats 2 --decode-steps 16 --gemm-backend triton
  # Decode attention in one launch (the last split combines) against split + combine.
  step last_combines 60 python3 -m bench.attention_kernel --shapes 1x128,1x2048,16x128,16x2048 \
    --block-n 64 --num-warps 4 --num-stages 2 --last-combines 0,1
  # The hand-off after the host path was vectorised (scattered pages were 5-26 GB/s).
  step cuda_ipc 60 python3 -m pytest -x -q -rf tests/gpu/test_cuda_ipc.py
  step kv_transfer 60 python3 -m bench.kv_transfer_gpu
  # Where a batch-1 decode step's device time goes, against the floor.
  TAIL=60 step profile_llama 80 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 1x128,64x128,256x512 --top 12
  # Moonlight's MoE block sizes (only Qwen3-30B-A3B's are tuned) and the MoE/MLA checks.
  step moe_tune 150 python3 -m bench.moe_kernel --tune --shape moonlight-16b-a3b \
    --tokens 1,4,16,64 --reps 10
  step check_moe 80 python3 -m bench.check_moe_gpu
  ;;
b)
  step cuda_ipc 60 python3 -m pytest -x -q -rf tests/gpu/test_cuda_ipc.py
  # The kernels compiled (not interpreted) against the torch reference, graphs against eager.
  step kernels 120 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_triton_attention.py
  step llama 100 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' --repeats 2
  step qwen3 80 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill '' --repeats 2 --decode-steps 16
  step kv_transfer 60 python3 -m bench.kv_transfer_gpu
  step decode_tiles 60 python3 -m bench.attention_kernel --shapes 1x2048,64x128,64x2048,256x512 \
    --block-n 32,64 --num-warps 4,8 --num-stages 2,3
  # pdserve local --device cuda: disaggregated (cuda_ipc) greedy == colocated.
  step local_cuda 100 python3 -m pytest -x -q -rf tests/gpu/test_local_cuda.py
  step serving_pd 200 python3 -m bench.serving_pd --preset llama3-8b --request-rates 4 16 inf \
    --num-prompts 48 --random-input-len 1024 --random-output-len 64 --slo-ttft-ms 500 \
    --slo-itl-ms 30 --out-dir "$OUT/pd"
  TAIL=40 step profile_qwen3 60 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128,64x128 --top 12
  ;;
c)
  step mla_kernels 100 python3 -m pytest -x -q -rf tests/engine/test_mla_extend.py
  step moonlight 150 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  step grammar 60 python3 -m bench.grammar
  ;;
d)
  # The launch fusions and the MoE align checked compiled, then timed; the serving path.
  step kernels 140 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_fused_moe.py -k "not transformers" \
    tests/engine/test_triton_attention.py::test_graph_replay_equals_eager
  step llama 70 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' --repeats 2
  step qwen3 60 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill '' --repeats 2 --decode-steps 16
  step moe_layer 50 python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 1,16,64 --reps 10
  step local_cuda 80 python3 -m pytest -x -q -rf tests/gpu/test_local_cuda.py
  step serving_pd 200 python3 -m bench.serving_pd --preset llama3-8b --request-rates 4 16 inf \
    --num-prompts 48 --random-input-len 1024 --random-output-len 64 --slo-ttft-ms 500 \
    --slo-itl-ms 30 --out-dir /tmp/pd
  cp /tmp/pd/summary.json "$OUT/serving_pd.json" 2>/dev/null
  tail -n 15 /tmp/pd/logs-*/*.log >>"$OUT/serving_pd.txt" 2>/dev/null
  TAIL=30 step profile_llama 40 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 1x128 --top 12
  ;;
e)
  # Where the skinny GEMM wins (per shape and rows), and what PDL does to each kernel.
  TAIL=120 step skinny_gemm 150 python3 -m bench.skinny_gemm --reps 10 --rows 1,4,16,64 \
    --shapes qkv,o,down,gate_up,gate_up_silu
  step pdl_tests 70 env PDSERVE_PDL=1 python3 -m pytest -x -q -rf \
    tests/engine/test_skinny_gemm.py tests/engine/test_triton_attention.py::test_graph_replay_equals_eager
  for mode in early wait; do
    step "llama_torch_pdl_$mode" 50 env PDSERVE_PDL=$mode python3 -m bench.engine \
      --preset llama3-8b --skip-hf --prefill '' --decode 1x128,16x128,64x128 --repeats 2
  done
  TAIL=40 step profile_pdl 60 env PDSERVE_PDL=early python3 -m bench.profile_decode \
    --preset llama3-8b --decode 1x128,16x128 --top 14 --gemm-backend triton
  ;;
f)
  # The defaults (PDL "wait", the gate-up GEMM with its activation from skinny_gemm.TUNED)
  # checked compiled, then timed against PDL off and cuBLAS only; the serving stack's cost and
  # disaggregated serving under MPS.
  step kernels 100 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_triton_attention.py::test_graph_replay_equals_eager \
    tests/engine/test_skinny_gemm.py -k "gate_up or graph_replay or fused"
  step llama 80 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' --repeats 2
  step llama_off 50 env PDSERVE_PDL=0 python3 -m bench.engine --preset llama3-8b --skip-hf \
    --prefill '' --repeats 2 --decode 1x128,64x128,256x512 --gemm-backend torch
  step qwen3 45 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill '' --repeats 2 --decode-steps 16
  step stack_cost 130 python3 -m bench.stack_cost --preset llama3-8b --batches 16,64 \
    --input-len 128 --output-len 256 --repeats 2 --out "$OUT/stack_cost.json"
  step serving_pd_mps 150 python3 -m bench.serving_pd --preset llama3-8b --modes disaggregated \
    --mps --request-rates 4 16 inf --num-prompts 48 --random-input-len 1024 \
    --random-output-len 64 --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd-mps
  cp /tmp/pd-mps/summary.json "$OUT/serving_pd_mps.json" 2>/dev/null
  step moonlight 50 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill '' --repeats 2 --decode-steps 16
  ;;
g)
  # The small-batch MoE path (fused_moe_small) checked and timed against the grouped path,
  # and colocated against disaggregated-under-MPS TTFT at low load in one run.
  step check_moe 40 python3 -m bench.check_moe_gpu
  for path in grouped small routed; do
    step "moe_$path" 25 python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 1,2,4,8 \
      --reps 10 --path "$path"
  done
  step qwen3 45 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill '' --repeats 2 --decode-steps 16
  step serving_pd 120 python3 -m bench.serving_pd --preset llama3-8b --mps --request-rates 4 \
    --num-prompts 24 --random-input-len 1024 --random-output-len 64 --slo-ttft-ms 500 \
    --slo-itl-ms 30 --out-dir /tmp/pd
  ;;
*) echo "usage: bench/gpu/session.sh a|b|c|d|e|f|g"; exit 2 ;;
esac
