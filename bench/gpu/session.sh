#!/usr/bin/env bash
# The GPU checks and benchmarks that wait for the lent H200, in calls of under 10 minutes each,
# most important first; every step has its own time limit and writes $OUT/NAME.txt, so that a
# step that fails or runs long costs only itself (the device returns at most 8 files: read the
# call's output, where each step's tail is printed). Fetch the wheels here first
# (bash bench/gpu/fetch_wheels.sh) and carry .whl:
#
#   run(command="bash bench/gpu/session.sh a", carry=[".whl", ".mooncake"])  # what next
#   run(command="bash bench/gpu/session.sh b", carry=[".whl"])   # the README's figures
#   run(command="bash bench/gpu/session.sh c", carry=[".whl"])   # serving: stack cost, P/D
#   run(command="bash bench/gpu/session.sh d", carry=[".whl"])   # a short call: what changed
#   run(command="bash bench/gpu/session.sh e", carry=[".whl"])   # decode launches, serving
#   run(command="bash bench/gpu/session.sh f", carry=[".whl"])   # built but untimed
#   run(command="bash bench/gpu/session.sh g", carry=[".whl"])   # host waits, sampled decode
#   run(command="bash bench/gpu/session.sh h", carry=[".whl"])   # first token, MoE profiles
#   run(command="bash bench/gpu/session.sh i", carry=[".whl"])   # sampling kernel, router, TTFT
#   run(command="bash bench/gpu/session.sh j", carry=[".whl"])   # split sampling, MoE prefill
#   run(command="bash bench/gpu/session.sh k", carry=[".whl"])   # extend attention tiles
#   run(command="bash bench/gpu/session.sh l", carry=[".whl"])   # extend tiles by length
#   run(command="bash bench/gpu/session.sh m", carry=[".whl"])   # pinned rows, fused-shape tune
#   run(command="bash bench/gpu/session.sh n", carry=[".whl"])   # grouped GEMMs through TMA
#   run(command="bash bench/gpu/session.sh o", carry=[".whl"])   # decode profiles, batch 256
#   run(command="bash bench/gpu/session.sh p", carry=[".whl"])   # skinny GEMM through TMA
#   run(command="bash bench/gpu/session.sh q", carry=[".whl"])   # TMA tiles in the engine
#   run(command="bash bench/gpu/session.sh r", carry=[".whl"])   # align fix, Moonlight vs HF
#   run(command="bash bench/gpu/session.sh s", carry=[".whl"])   # decode attention splits
#   run(command="bash bench/gpu/session.sh t", carry=[".whl"])   # batch-256 MoE tiles, MLA TMA
#   run(command="bash bench/gpu/session.sh u", carry=[".whl", ".base"])  # deferred sums, A/B
#   run(command="bash bench/gpu/session.sh v", carry=[".whl"])   # MLA decode ranges, MoE rows
#   run(command="bash bench/gpu/session.sh w", carry=[".whl"])   # MLA decode at 4 warps
#   run(command="bash bench/gpu/session.sh x", carry=[".whl"])   # MLA tiles, README figures
#   run(command="bash bench/gpu/session.sh y", carry=[".whl"])   # greedy past x's time limit
#   run(command="bash bench/gpu/session.sh z", carry=[".whl"])   # decode MoE tiles with TMA
#   run(command="bash bench/gpu/session.sh A", carry=[".whl"])   # split tiles without reduce
#   run(command="bash bench/gpu/session.sh B", carry=[".whl", ".base"])  # them in the engine
#   run(command="bash bench/gpu/session.sh C", carry=[".whl"])   # QKV's split tiles alone
#   run(command="bash bench/gpu/session.sh D", carry=[".whl"])   # Moonlight 256's step gap
#   run(command="bash bench/gpu/session.sh E", carry=[".whl"])   # what that gap waits for
#   run(command="bash bench/gpu/session.sh F", carry=[".whl"])   # the gap placed, MLA stages
#   run(command="bash bench/gpu/session.sh G", carry=[".whl", ".base"])  # look-ahead, A/B
#   run(command="bash bench/gpu/session.sh H", carry=[".whl"])   # MLA decode quarters, ncu
#   run(command="bash bench/gpu/session.sh I", carry=[".whl", ".base"])  # quarters' tiles, A/B
#   run(command="bash bench/gpu/session.sh J", carry=[".whl", ".base"])  # MLA absorptions, A/B
#   run(command="bash bench/gpu/session.sh K", carry=[".whl"])   # README tables, profile
#   run(command="bash bench/gpu/session.sh L", carry=[".whl", ".base"])  # align in PDL, A/B
#   run(command="bash bench/gpu/session.sh M", carry=[".whl"])   # MLA decode, 128 heads
#   run(command="bash bench/gpu/session.sh N", carry=[".whl"])   # its heads-a-program rule
#   run(command="bash bench/gpu/session.sh O", carry=[".whl"])   # MoE GEMMs apart, down tune
#   run(command="bash bench/gpu/session.sh P", carry=[".whl", ".base"])  # 13th session, A/B
#   run(command="bash bench/gpu/session.sh R", carry=[".whl"])   # GEMM rows, Llama, profile
#   run(command="bash bench/gpu/session.sh T", carry=[".whl", ".base"])  # routing + count, A/B
#   run(command="bash bench/gpu/session.sh W", carry=[".whl"])   # R without its profile
#   run(command="bash bench/gpu/session.sh Y", carry=[".whl"])   # small MoE gate-up on tensor cores
#   run(command="bash bench/gpu/session.sh Z", carry=[".whl"])   # RoPE folded into decode attention
#   run(command="bash bench/gpu/session.sh b1", carry=[".whl"])  # batch 1: MLA profile, one range
#   run(command="bash bench/gpu/session.sh b2", carry=[".whl"])  # MLA W_UK with the latent side
#   run(command="bash bench/gpu/session.sh b3", carry=[".whl"])  # persistent chain, layer
#   run(command="bash bench/gpu/session.sh b4", carry=[".whl"])  # skinny GEMM, 128-256 rows
#   run(command="bash bench/gpu/session.sh b5", carry=[".whl"])  # constrained decode, overlap
#   run(command="bash bench/gpu/session.sh b6", carry=[".whl"])  # persistent, tensor-core tiles
#   run(command="bash bench/gpu/session.sh b7", carry=[".whl"])  # batch 1: profile, GEMV tiles
#   run(command="bash bench/gpu/session.sh b8", carry=[".whl"])  # O preloaded during attention
#   run(command="bash bench/gpu/session.sh b9", carry=[".whl"])  # the same, Moonlight, Llama
#   run(command="bash bench/gpu/session.sh b10", carry=[".whl"]) # b8 and b9's essentials
#   run(command="bash bench/gpu/session.sh b11", carry=[".whl"]) # preload A/B (default), 260 s
#   run(command="bash bench/gpu/session.sh b12", carry=[".whl"]) # b10's A/B profiled, 260 s
#   run(command="bash bench/gpu/session.sh b13", carry=[".whl"]) # gate rows early; MoE K steps
#   run(command="bash bench/gpu/session.sh b14", carry=[".whl"]) # Llama-3-8B's O, QKV preloaded
#   run(command="bash bench/gpu/session.sh b15", carry=[".whl"]) # b11 on an H200, rows at the line
#   run(command="bash bench/gpu/session.sh b16", carry=[".whl"]) # W_UV on head_bmm x3; b14
#   run(command="bash bench/gpu/session.sh b17", carry=[".whl"]) # Llama O+QKV preloaded x3
#   run(command="bash bench/gpu/session.sh b18", carry=[".whl"]) # batch-1 profiles, down on dot
#   run(command="bash bench/gpu/session.sh b19", carry=[".whl"]) # MoE down preloaded, A/B
#   run(command="bash bench/gpu/session.sh b20", carry=[".whl"]) # the defaults: checks, rows
#   run(command="bash bench/gpu/session.sh b21", carry=[".whl"]) # preloading down's tiles
#   run(command="bash bench/gpu/session.sh b22", carry=[".whl"]) # packed routing, A/B
#   run(command="bash bench/gpu/session.sh b23", carry=[".whl"]) # the input norm in QKV, A/B
#   run(command="bash bench/gpu/session.sh b24", carry=[".whl"]) # more early triggers, A/B
#   run(command="bash bench/gpu/session.sh b25", carry=[".whl"]) # three MoE switches, A/B
#   run(command="bash bench/gpu/session.sh b26", carry=[".whl"]) # tile loads split; the rows
#   run(command="bash bench/gpu/session.sh b27", carry=[".whl"]) # MLA combine in W_UV, A/B
#   run(command="bash bench/gpu/session.sh b30", carry=[".whl"]) # RoPE in the decode, A/B
#   run(command="bash bench/gpu/session.sh b31", carry=[".whl"]) # the README's rows (H200)
#   run(command="bash bench/gpu/session.sh b34", carry=[".whl"]) # read ceiling, MoE by ncu
#   run(command="bash bench/gpu/session.sh b35", carry=[".whl"]) # metadata before the wait
#   run(command="bash bench/gpu/session.sh b36", carry=[".whl"], kind="nvidia-h100-x4")
#                                                      # EP over NCCL, one GPU a rank
#   run(command="bash bench/gpu/session.sh b37", carry=[".whl"]) # wide gate-up rows, A/B
#   run(command="bash bench/gpu/session.sh b38", carry=[".whl"]) # H200: rows + b37 in one
#   run(command="bash bench/gpu/session.sh b39", carry=[".whl"]) # bf16 divergences' ties
#   run(command="bash bench/gpu/session.sh b40", carry=[".whl"]) # H200: rows, then b39
#   run(command="bash bench/gpu/session.sh b41", carry=[".whl"]) # H200: the rows alone
#   run(command="bash bench/gpu/session.sh b42", carry=[".whl"]) # Moonlight 8x2048 prefill
#   run(command="bash bench/gpu/session.sh b43", carry=[".whl"]) # H200: the MoE rows alone
#   run(command="bash bench/gpu/session.sh b44", carry=[".whl"]) # staged upload, 8x2048 pair
#   run(command="bash bench/gpu/session.sh b45", carry=[".whl"]) # MoE prefill tiles: check, pairs
#   run(command="bash bench/gpu/session.sh b46", carry=[".whl"]) # DeepSeek/Kimi prefill tiles
#   run(command="bash bench/gpu/session.sh b47", carry=[".whl"]) # H200: MoE rows, then b45
#   run(command="bash bench/gpu/session.sh b48", carry=[".whl"]) # MoE prefill tiles engine A/B
#   run(command="bash bench/gpu/session.sh b50", carry=[".whl"]) # decode short loop, A/B
#   run(command="bash bench/gpu/session.sh b51", carry=[".whl"]) # DeepSeek/Kimi full MoE check
#   run(command="bash bench/gpu/session.sh b52", carry=[".whl"]) # batch 1's split rule, A/B
#   run(command="bash bench/gpu/session.sh b57", carry=[".whl"]) # H200 only: the MoE rows
#   run(command="bash bench/gpu/session.sh b58", carry=[".whl"]) # H200 only: batch-1 switches
#   run(command="bash bench/gpu/session.sh b59", carry=[".whl"]) # prefill host gaps, after
#   run(command="bash bench/gpu/session.sh b60", carry=[".whl"]) # a prefill's host phases
#   run(command="bash bench/gpu/session.sh b61", carry=[".whl"]) # back-to-back prefills, A/B
#   run(command="bash bench/gpu/session.sh b62", carry=[".whl"]) # greedy, chunks ahead, A/B
#   run(command="bash bench/gpu/session.sh b63", carry=[".whl"]) # H200: prefill pair, rows
#   run(command="bash bench/gpu/session.sh b64", carry=[".whl"]) # short prefills' host
#   run(command="bash bench/gpu/session.sh b65", carry=[".whl"]) # short prefills as decode
#   run(command="bash bench/gpu/session.sh b66", carry=[".whl"]) # greedy, decode ahead mixed
#   run(command="bash bench/gpu/session.sh b67", carry=[".whl"]) # b66, medium prefills' host
#   run(command="bash bench/gpu/session.sh b68", carry=[".whl"]) # piecewise prefill graphs
#   run(command="bash bench/gpu/session.sh b69", carry=[".whl"]) # low-load TTFT, graphs or not
#   run(command="bash bench/gpu/session.sh b70", carry=[".whl"]) # pieces' tests; H200 rows or b69
#   run(command="bash bench/gpu/session.sh b71", carry=[".whl"]) # pieces past the context; b69's pair
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
  if [ -n "${ROWS:-}" ]; then grep -E "$ROWS" "$OUT/$name.txt"; else tail -n "${TAIL:-25}" "$OUT/$name.txt"; fi
}
small_down_dot() {  # the small MoE path's down on the tensor cores against the CUDA-core down
  TAIL=24 step small_down_dot 40 bash -c 'python3 -m bench.moe_kernel --shape qwen3-30b-a3b \
    --tokens 1 --path small --reps 20 --small-tiles 16,256,8,256,4 \
    --small-tiles 16,256,16,256,4,0,3 --small-tiles 16,256,16,128,4,0,4 \
    --small-tiles 16,256,32,256,4,0,3 2>&1 | grep "^## \|^### \|^| 1 "; \
    python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused --tokens 1 --path small \
    --reps 20 --small-tiles 32,256,8,256,4,3 --small-tiles 32,256,16,256,4,3,3 \
    --small-tiles 32,256,16,128,4,3,4 2>&1 | grep "^## \|^### \|^| 1 "'
}
routing_cost() {  # NAME VAR=VALUE: one MoE layer at one token, the ids given against routing
  ROWS='^## |^\| 1 ' step "routing_cost_$1" 60 env "$2" bash -c "for p in small small-routed; \
    do echo \"## \$p\"; for s in qwen3-30b-a3b moonlight-16b-a3b-fused; do python3 -m \
    bench.moe_kernel --shape \$s --tokens 1 --path \$p --reps 20 | grep '^| 1 '; done; done"
}
prefill_steps_ab() {  # NAME SECONDS SHAPES STEP_TOKENS: prefills in steps, overlapped vs plain
  for i in 1 2; do
    for ab in overlap plain; do
      local flag=(); [ $ab = plain ] && flag=(--disable-overlap-schedule)
      for preset in moonlight-16b-a3b llama3-8b; do
        ROWS='^\| [0-9]+x' step "$1_${preset%%-*}_${ab}_$i" "$2" python3 -m bench.prefill_phases \
          --preset "$preset" --prefill "$3" --repeats 3 --disable-cuda-graph --step-tokens "$4" \
          "${flag[@]}"
      done
    done
  done
}
readme_rows() {  # the README's decode rows with the defaults (b31, b38; about 345 s at most)
  moe_rows
  ROWS='^device|^\| [0-9]+x' step rows_llama 90 python3 -m bench.engine --preset llama3-8b \
    --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  ROWS='^\| [0-9]+x' step rows_llama_long 75 python3 -m bench.engine --preset llama3-8b \
    --skip-hf --prefill '' --decode 64x2048,256x512 --repeats 2
}
moe_rows() {  # the MoE models' README rows (about 180 s)
  for preset in qwen3-30b-a3b moonlight-16b-a3b; do
    ROWS='^device|^\| [0-9]+x' step "rows_${preset%%-*}" 90 python3 -m bench.engine \
      --preset "$preset" --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  done
}
warmup_checks() {  # b76: the warm-up's GPU test, then first_use cold and warm for two presets
  TAIL=12 step warmup_test 150 python3 -m pytest -q tests/gpu/test_prefill_warmup.py
  for preset in moonlight-16b-a3b llama3-8b; do
    for flag in --disable-prefill-warmup ""; do
      TAIL=18 step "first_use_${preset%%-*}${flag:+_cold}" 100 python3 -m bench.first_use \
        --preset "$preset" --mix 12 $flag
    done
  done
}
target_rows() {  # the issues' unmet target rows on an H200 (about 400 s): MoE, Llama, prefill
  moe_rows
  ROWS='^device|^\| [0-9]+x' step rows_llama 90 python3 -m bench.engine --preset llama3-8b \
    --skip-hf --prefill '' --decode 1x128,64x128,256x128,64x2048,256x512 --repeats 3
  ROWS='^device|^\| [0-9]+x' step prefill_pair 170 python3 -m bench.engine \
    --preset moonlight-16b-a3b --decode '' --prefill 8x2048,64x128 --repeats 3
}
prefill_tiles() {
  # The MoE prefill pairs with the 8,192/16,384-token tiles of the thirtieth session (a 4-stage
  # gate-up, a 128 x 256 down): Moonlight and Qwen3-30B-A3B at 8 x 2,048 against transformers
  # in the same run (about 250 s; compute-bound, so an H100's ratio stands for the H200's),
  # after the kernels' check at full size (4,096 tokens take the new rows).
  TAIL=8 step check_moe 150 python3 -m bench.check_moe_gpu --shape qwen3-30b-a3b \
    --shape moonlight-16b-a3b --skip-mla
  for preset in moonlight-16b-a3b qwen3-30b-a3b; do
    ROWS='^device|^\| [0-9]+x' step "prefill_${preset%%-*}" 150 python3 -m bench.engine \
      --preset "$preset" --decode '' --prefill 64x128,8x2048 --repeats 3 --disable-cuda-graph
  done
}
defaults_ab() {  # the MoE rule's new tiles against the old rule's four (about 120 s)
  for shape in deepseek-v3-fused kimi-k2-fused; do
    TAIL=30 step "defaults_${shape%%-*}" 90 python3 -m bench.moe_kernel --shape "$shape" \
      --tokens 16,64,256,1024,8192 --layers 1 --reps 10 --config 16,32,128,1,8,4 \
      --config 16,64,64,1,8,4 --config 32,64,128,4,8,3 --config 64,128,32,8,8,3
  done
}
tune_prefill() {  # SHAPE: its MoE prefill tiles, whole layer then GEMM by GEMM (about 220 s)
  TAIL=24 step "tune_$1" 220 python3 -m bench.moe_kernel --shape "$1" --tokens 8192,16384 \
    --reps 5 --layers 1 --tune
}
prefill_engine_ab() {
  # For an H100 (about 380 s): the engine A/B of the thirtieth session's MoE prefill tiles
  # (kernel-level 8%, b47's pair about 3%), Moonlight 8 x 2,048 alternating twice; between the
  # rounds, the rule's 32-row tile at Kimi-K2's 256 tokens (measured with 8 warps only).
  moe_prefill_ab() {
    for before in --moe-prefill-before ""; do
      ROWS='^\| [0-9]+x|MoE prefill' step "moe_prefill_$1${before:+_before}" 70 \
        python3 bench/gpu/preload_ab.py $before -- --preset moonlight-16b-a3b --skip-hf \
        --decode '' --prefill 8x2048 --repeats 3
    done
  }
  # The tile rule's new tiles at full size on DeepSeek-V3's shape first (64 / 256 / 4,096 tokens
  # take its 16-row, 32-row and prefill tiles).
  TAIL=4 step check_moe_deepseek 120 python3 -m bench.check_moe_gpu --shape deepseek-v3 \
    --skip-mla
  moe_prefill_ab 1
  TAIL=6 step kimi_256 60 python3 -m bench.moe_kernel --shape kimi-k2-fused --tokens 256 \
    --layers 1 --reps 10 --config 16,64,128,1,4,3 --config 32,64,128,4,8,3
  moe_prefill_ab 2
}
nvidia-smi -L
case "${1:-a}" in
a)
  # Where the time goes now (decode and prefill), MoE tiles for prefill, MLA extend tiles, the
  # hand-off's copy modes, and Mooncake's CUDA build (carry .mooncake too: try_mooncake.sh).
  # Six files at most: the device returns eight.
  TAIL=40 step profile_llama 60 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 1x128 --top 24
  TAIL=70 step profile_qwen3 75 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --profile-prefill 64x128 --top 24
  TAIL=70 step profile_moonlight 75 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 1x128 --profile-prefill 64x128 --top 24
  TAIL=20 step moe_tune 150 bash -c 'for s in qwen3-30b-a3b moonlight-16b-a3b; do
    python3 -m bench.moe_kernel --tune --shape $s --tokens 1024,8192,16384 --reps 5; done'
  TAIL=40 step mla_extend 80 bash -c 'for t in "128 64 8 2" "128 64 4 2" "128 64 8 3" \
      "128 128 8 2" "64 64 4 2" "128 32 4 2"; do set -- $t; echo "== tiles $t"
    python3 -m bench.mla_kernel --mode extend --heads 16 --extend-cases 64x128 8x2048 1x8192 \
      --block-m $1 --block-n $2 --num-warps $3 --num-stages $4 --reps 10 | tail -3; done'
  # The small-batch MoE's down-and-combine ran at 2.2x its bytes at one token (its 512
  # programs of 4 columns are about 1.3 waves): wider column tiles, fewer programs.
  TAIL=30 step moe_small 80 bash -c 'for t in 16,256,4,256,4 16,256,8,256,4 16,256,8,128,4 \
      16,256,16,128,4 16,256,8,256,8 32,128,8,256,4; do echo "== tiles $t"
    for s in qwen3-30b-a3b moonlight-16b-a3b; do python3 -m bench.moe_kernel --shape $s \
      --tokens 1 --reps 10 --path small --small-tiles $t | grep "^| *1 "; done; done'
  # Llama-3-8B's QKV, O and down against the CUDA-core 4x1024 tiles (1.3x cuBLAS on Qwen3's
  # O), and those tiles with W prefetched a step ahead (pf).
  TAIL=40 step skinny 70 python3 -m bench.skinny_gemm --shapes qkv,o,down,qwen3_o --rows 1 \
    --tiles fma:4:1024,pf:4:1024,fma:8:512,pf:8:512,fma:2:2048,pf:2:2048
  TAIL=45 step kv_transfer 100 bash -c 'python3 -m pytest -x -q -rf tests/gpu/test_cuda_ipc.py \
    | tail -3; python3 -m bench.kv_transfer_gpu --reps 5' 
  [ -d .mooncake ] && TAIL=40 step mooncake 120 bash bench/gpu/try_mooncake.sh
  ;;
b)
  # The kernels compiled against the torch reference (PDL on, its default), then the tables.
  step kernels 120 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_skinny_gemm.py tests/engine/test_triton_attention.py \
    -k "gate_up or graph_replay or fused or decode or extend"
  step llama 80 python3 -m bench.engine --preset llama3-8b --skip-hf --repeats 2
  # PDL off and cuBLAS only, in the same call, for the A/B.
  step llama_off 50 env PDSERVE_PDL=0 python3 -m bench.engine --preset llama3-8b --skip-hf \
    --prefill '' --repeats 2 --decode 1x128,64x128,256x512 --gemm-backend torch
  step qwen3 80 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --decode 1x128,64x128,256x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  step moonlight 100 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode 1x128,64x128,256x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  step check_moe 40 python3 -m bench.check_moe_gpu
  step moe_paths 60 python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 1,2,4 --reps 10 \
    --path routed
  ;;
c)
  step cuda_ipc 40 python3 -m pytest -x -q -rf tests/gpu/test_cuda_ipc.py
  step local_cuda 80 python3 -m pytest -x -q -rf tests/gpu/test_local_cuda.py
  step stack_cost 130 python3 -m bench.stack_cost --preset llama3-8b --batches 16,64 \
    --input-len 128 --output-len 256 --repeats 2 --out "$OUT/stack_cost.json"
  step serving_pd 220 python3 -m bench.serving_pd --preset llama3-8b --mps \
    --request-rates 4 16 inf --num-prompts 48 --random-input-len 1024 --random-output-len 64 \
    --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  cp /tmp/pd/summary.json "$OUT/serving_pd.json" 2>/dev/null
  step grammar 60 python3 -m bench.grammar
  ;;
d)
  # A short call (about 500 s): the kernels changed since the last tables checked compiled,
  # every tiny family's greedy tokens, the MoE models' tables, and low-load TTFT.
  step kernels 120 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_triton_attention.py tests/engine/test_mla_extend.py \
    tests/engine/test_mla_decode.py -k "rope or mla or extend or graph_replay or latent"
  TAIL=30 step greedy 60 python3 -m bench.gpu.greedy_gpu
  step moonlight 90 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  step qwen3 75 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  step check_moe 60 python3 -m bench.check_moe_gpu
  # Low-load TTFT: 16-24 prompts a rate gave p50s 5-7 ms apart from run to run; 48 a rate.
  step serving_pd 160 python3 -m bench.serving_pd --preset llama3-8b --mps \
    --request-rates 2 4 --num-prompts 48 --random-input-len 1024 --random-output-len 64 \
    --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  ;;
e)
  # The decode step's launches (about 560 s): the skinny GEMM, the argmax and
  # the small MoE's tiles checked compiled, where a Llama step's time goes now, the three
  # models' decode tables, every tiny family's greedy tokens, then colocated against
  # disaggregated serving at five rates.
  step kernels 100 python3 -m pytest -x -q -rf tests/engine/test_skinny_gemm.py \
    tests/engine/test_fused_moe.py tests/engine/test_argmax.py \
    -k "gate_up or small or matches or argmax"
  step argmax 30 python3 -m bench.argmax
  TAIL=30 step profile_llama 70 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 1x128 --top 16
  step decode 150 bash -c 'for m in llama3-8b qwen3-30b-a3b moonlight-16b-a3b; do
    python3 -m bench.engine --preset $m --skip-hf --decode 1x128,64x128 --prefill "" \
      --repeats 2 --decode-steps 16 | grep -E "^\| [0-9]|^device"; done'
  TAIL=8 step greedy 60 python3 -m bench.gpu.greedy_gpu
  TAIL=30 step serving_pd 200 python3 -m bench.serving_pd --preset llama3-8b --mps \
    --request-rates 2 4 8 16 inf --num-prompts 24 --random-input-len 1024 \
    --random-output-len 64 --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  ;;
f)
  # What is built but untimed (about 500 s): the skinny GEMM's prefetching tiles checked and
  # swept, where the idle time of a Llama step sits (the profile's timeline), the MoE models'
  # decode with Qwen3's O and gate on our kernels, every tiny family's greedy tokens.
  step kernels 80 python3 -m pytest -x -q -rf tests/engine/test_skinny_gemm.py
  TAIL=40 step skinny 70 python3 -m bench.skinny_gemm --shapes qkv,o,down,qwen3_o --rows 1 \
    --tiles fma:4:1024,pf:4:1024,fma:8:512,pf:8:512,fma:2:2048,pf:2:2048
  TAIL=60 step profile_llama 80 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 1x128,64x128 --top 14
  step decode 150 bash -c 'for m in qwen3-30b-a3b moonlight-16b-a3b; do
    python3 -m bench.engine --preset $m --skip-hf --decode 1x128,64x128 --prefill 64x128 \
      --repeats 2 --decode-steps 16 | grep -E "^\| [0-9]|^device"; done'
  TAIL=8 step greedy 60 python3 -m bench.gpu.greedy_gpu
  TAIL=10 step check_moe 60 python3 -m bench.check_moe_gpu
  ;;
g)
  # The host waits taken out (about 370 s): a Llama step's timeline again, Llama's decode
  # table (step alone and back to back), sampled decode, Qwen3 at one token, every tiny
  # family's greedy tokens through the graphs' new input layout, and the sampling kernel
  # against the torch path's sort (checked compiled first).
  TAIL=60 step profile_llama 70 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 1x128,64x128 --top 8
  step llama 110 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,64x128,64x2048,256x512 --repeats 2 --decode-steps 32
  step sampled 60 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,64x128 --repeats 2 --temperature 0.8 --top-p 0.9
  TAIL=8 step greedy 60 python3 -m bench.gpu.greedy_gpu
  TAIL=8 step sampling_kernel 60 python3 -m pytest -x -q -rf tests/engine/test_sampling_kernel.py
  TAIL=30 step sampling 40 python3 -m bench.sampling
  ;;
h)
  # The first token from the prefill's reply (about 330 s): low-load TTFT colocated against
  # disaggregated, then where Moonlight's 64 x 128 decode and prefill and Qwen3's batch 1 go.
  TAIL=30 step serving_pd 170 python3 -m bench.serving_pd --preset llama3-8b --mps \
    --request-rates 2 4 --num-prompts 48 --random-input-len 1024 --random-output-len 64 \
    --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  TAIL=75 step profile_moonlight 80 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 64x128 --profile-prefill 64x128 --top 20
  TAIL=35 step profile_qwen3 60 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --top 22
  ;;
i)
  # The sampling kernel and the MoE router's half-precision product (about 540 s): greedy
  # tokens of every tiny family, the kernel's tests compiled (the split path's too: about 25
  # compilations), sampled decode (batch 1 now on the split path) and the kernel against the
  # sort with one program a row, 4, 16 and 32 programs a row and the sampler's choice, then
  # Moonlight's decode and prefill, the MoE checks, Llama's decode, and Qwen3-30B-A3B's
  # 8 x 2,048 prefill against transformers (the table has no transformers figure there).
  TAIL=8 step greedy 60 python3 -m bench.gpu.greedy_gpu
  TAIL=8 step sampling_kernel 90 python3 -m pytest -x -q -rf tests/engine/test_sampling_kernel.py
  step sampled 50 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,64x128 --repeats 2 --temperature 0.8 --top-p 0.9
  TAIL=85 step sampling 75 python3 -m bench.sampling --batches 1,4,16,64 --split 1,4,16,32,auto \
    --reps 20
  step moonlight 80 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode 1x128,64x128 --prefill 64x128,8x2048 --repeats 2 --decode-steps 16
  TAIL=10 step check_moe 45 python3 -m bench.check_moe_gpu
  step llama 60 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill 64x128 \
    --decode 1x128,64x128 --repeats 3
  step qwen3_hf 150 python3 -m bench.engine --preset qwen3-30b-a3b --decode '' \
    --prefill 8x2048 --repeats 2
  ;;
j)
  # The sampler's split path on by default (about 330 s): sampled decode at batch 1, 16 and
  # 64, then where the MoE prefills' time goes (Qwen3-30B-A3B 8 x 2,048 is 1.83x transformers,
  # Moonlight's 64 x 128 1.86x; the target is 2x).
  step sampled 60 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,16x128,64x128 --repeats 2 --temperature 0.8 --top-p 0.9
  TAIL=60 step profile_qwen3 130 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode '' --profile-prefill 8x2048 --top 25 --disable-cuda-graph
  TAIL=60 step profile_moonlight 110 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode '' --profile-prefill 64x128 --top 25 --disable-cuda-graph
  ;;
k)
  # The extend (prefill) attention kernel's new tiles and unmasked loop (about 480 s): its tests
  # compiled, the tiles swept (Llama-3-8B and Qwen3-30B-A3B heads), greedy tokens, then the
  # prefills it was for (Qwen3-30B-A3B 8 x 2,048: attention was 39% of the step).
  TAIL=4 step attention_tests 90 python3 -m pytest -x -q -rf tests/engine/test_triton_attention.py
  TAIL=70 step extend_kernel 120 python3 -m bench.extend_kernel --reps 5
  TAIL=8 step greedy 60 python3 -m bench.gpu.greedy_gpu
  step qwen3 70 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf --decode 1x128 \
    --prefill 64x128,8x2048 --repeats 2
  step llama 60 python3 -m bench.engine --preset llama3-8b --skip-hf --decode '' \
    --prefill 64x128,8x2048,1x8192 --repeats 2
  step moonlight 70 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --decode '' \
    --prefill 64x128,8x2048 --repeats 2
  ;;
l)
  # The extend kernel's tiles chosen by extend length, MLA's unmasked loop (about 480 s): its tests compiled, greedy
  # tokens, the short and long tiles once more, then the prefills.
  TAIL=4 step attention_tests 150 python3 -m pytest -x -q -rf tests/engine/test_triton_attention.py \
    tests/engine/test_mla_extend.py
  TAIL=12 step greedy 100 python3 -m bench.gpu.greedy_gpu
  TAIL=20 step extend_kernel 50 python3 -m bench.extend_kernel --heads 32/4/128 --reps 5 \
    --cases 64x128,16x512,8x2048 --tiles 128x128x8x3,64x64x4x3,128x128x8x4,128x64x4x3
  TAIL=6 step mla_extend 40 python3 -m bench.mla_kernel --mode extend --heads 16 \
    --extend-cases 64x128 8x2048
  TAIL=6 step mla_extend_128 40 python3 -m bench.mla_kernel --mode extend --heads 16 \
    --extend-cases 64x128 8x2048 --block-m 128 --block-n 128
  step qwen3 60 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf --decode '' \
    --prefill 64x128,8x2048 --repeats 2
  step moonlight 60 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --decode '' \
    --prefill 64x128,8x2048 --repeats 3
  step llama 50 python3 -m bench.engine --preset llama3-8b --skip-hf --decode '' \
    --prefill 64x128,8x2048,1x8192 --repeats 2
  ;;
m)
  # The pinned per-token rows (StagedUpload) and Moonlight's fused-shared MoE shape (about 470
  # s): greedy tokens through the new upload, the prefills, the host during the longest gaps,
  # then the grouped GEMM tuned for the stacked 66-expert shape at prefill token counts (paste
  # the rows into fused_moe_configs.TUNED under (66, 2048, 1408, 8, "bfloat16")).
  TAIL=12 step greedy 70 python3 -m bench.gpu.greedy_gpu
  step moonlight 50 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --decode '' \
    --prefill 64x128,8x2048 --repeats 3
  step qwen3 45 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf --decode '' \
    --prefill 64x128,8x2048 --repeats 2
  TAIL=30 step profile_moonlight 60 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode '' --profile-prefill 8x2048 --top 6 --disable-cuda-graph
  TAIL=20 step tune_moonlight 240 python3 -m bench.moe_kernel --tune \
    --shape moonlight-16b-a3b-fused --tokens 1024,8192,16384 --reps 5 --layers 2
  ;;
n)
  # The grouped GEMMs through TMA loads (about 480 s): tune both prefill shapes with and
  # without, merge the rows into this copy's TUNED (apply_tuned.py), check the fused layer
  # against the reference at a prefill's token count, then time the prefills.
  TAIL=10 step tune_moonlight 150 python3 -m bench.moe_kernel --tune \
    --shape moonlight-16b-a3b-fused --tokens 1024,8192,16384 --reps 5 --layers 2
  TAIL=10 step tune_qwen3 150 python3 -m bench.moe_kernel --tune \
    --shape qwen3-30b-a3b --tokens 1024,8192,16384 --reps 5 --layers 2
  TAIL=4 step apply 10 python3 bench/gpu/apply_tuned.py "$OUT/tune_moonlight.txt" \
    "$OUT/tune_qwen3.txt"
  TAIL=6 step check 40 python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused \
    --shape qwen3-30b-a3b --tokens 8192 --path grouped --reps 3 --layers 2
  TAIL=8 step moonlight 50 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --decode '' --prefill 64x128,8x2048 --repeats 3
  TAIL=8 step qwen3 45 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf --decode '' \
    --prefill 64x128,8x2048 --repeats 2
  ;;
o)
  # Where decode time goes now (about 420 s): Qwen3-30B-A3B at batch 1 and Llama-3-8B at 64
  # (the open targets), MoE decode at batch 256 (not measured lately), Moonlight's prefill
  # against transformers in the same run.
  TAIL=45 step profile_qwen3 70 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --top 24
  TAIL=45 step profile_llama 60 python3 -m bench.profile_decode --preset llama3-8b \
    --decode 64x128 --top 24
  TAIL=10 step qwen3_decode 70 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  TAIL=10 step moonlight_decode 70 python3 -m bench.engine --preset moonlight-16b-a3b \
    --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  TAIL=10 step moonlight_hf 130 python3 -m bench.engine --preset moonlight-16b-a3b \
    --decode '' --prefill 64x128,8x2048 --repeats 3
  ;;
p)
  # The skinny GEMM through TMA loads at a 64-row decode (about 300 s): Llama-3-8B's QKV, O
  # and down (cuBLAS 1.2-1.6x their bytes there), and the gate-up with its SiLU.
  TILES=tma:64:64:1:4:8,tma:64:64:2:4:8,tma:32:64:1:4:8,tma:32:64:2:4:10,tma:32:128:1:4:4
  TILES=$TILES,tma:32:128:2:4:4,tma:16:128:1:4:6,tma:16:256:1:4:4,tma:64:128:1:4:4
  TILES=$TILES,tma:64:128:2:4:4,tma:128:64:1:4:6,tma:128:64:2:8:6,dot:32:128:1:4:4
  TAIL=40 step skinny 240 python3 -m bench.skinny_gemm --shapes qkv,o,down --rows 64 \
    --reps 10 --tiles "$TILES"
  TAIL=12 step skinny_gate_up 120 python3 -m bench.skinny_gemm --shapes gate_up_silu \
    --rows 64 --reps 10 \
    --tiles dot:64:128,tma:64:128:1:4:3,tma:64:64:1:4:6,tma:32:128:1:4:4,tma:128:64:1:8:4
  ;;
q)
  # The TMA tiles in the engine (about 420 s): Llama-3-8B decode with the new TUNED rows, the
  # skinny GEMM's tests compiled, the fused MoE checked at full size (TMA rows), greedy tokens.
  TAIL=10 step llama 70 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,16x128,64x128,64x2048 --repeats 2
  TAIL=6 step kernels 90 python3 -m pytest -x -q -rf tests/engine/test_skinny_gemm.py
  TAIL=10 step check_moe 60 python3 -m bench.check_moe_gpu
  TAIL=14 step greedy 150 python3 -m bench.gpu.greedy_gpu
  ;;
r)
  # The align fix at DeepSeek-V3's 256 experts, and Moonlight's prefill against transformers
  # with the TMA rows (about 230 s).
  TAIL=6 step check_moe 70 python3 -m bench.check_moe_gpu
  TAIL=8 step moonlight_hf 140 python3 -m bench.engine --preset moonlight-16b-a3b \
    --decode '' --prefill 64x128,8x2048 --repeats 3
  ;;
s)
  # Decode attention with more context splits than the rule's at short contexts (about 90 s).
  TAIL=40 step attention 100 python3 -m bench.attention_kernel --shapes 64x128,16x128,64x512 \
    --block-n 32,64 --num-warps 4 --num-stages 2,3 --splits 0,2,4 --reps 20
  ;;
t)
  # Batch 128-512 decode's MoE tiles (T=256 took the 1,024-token prefill row: 128-row blocks
  # of about 31 real rows), then the MLA extend kernel with the context's tiles by TMA (about
  # 480 s). Paste the tuned rows into fused_moe_configs.TUNED if the decode step gains.
  TAIL=6 step tune_moonlight 100 python3 -m bench.moe_kernel --tune \
    --shape moonlight-16b-a3b-fused --tokens 128,256,512 --reps 10 --layers 4
  TAIL=8 step tune_qwen3 110 bash -c "python3 -m bench.moe_kernel --tune --shape qwen3-30b-a3b \
    --tokens 128,256,512 --reps 10 --layers 4 && python3 bench/gpu/apply_tuned.py \
    $OUT/tune_moonlight.txt $OUT/tune_qwen3.txt"
  TAIL=6 step moonlight 70 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --prefill '' --decode 64x128,256x128 --repeats 2
  TAIL=6 step qwen3 70 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --prefill '' --decode 64x128,256x128 --repeats 2
  for variant in "" "--tma" "--tma --block-n 128 --num-stages 2"; do
    TAIL=5 step "mla_extend${variant// /}" 40 python3 -m bench.mla_kernel --mode extend \
      --heads 16,128 --extend-cases 64x128 8x2048 $variant
  done
  TAIL=30 step profile_moonlight_256 60 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 12
  ;;
v)
  # MLA decode: context ranges (one range now writes the output itself) and split-kernel
  # launches; the batch 128-512 MoE rows and the MLA change in the engine; the GPU checks of
  # both (about 420 s).
  TAIL=45 step mla_splits 80 python3 -m bench.mla_kernel --mode decode --heads 16,128 \
    --batch-sizes 1,16,64,128,256 --contexts 128,2048 --splits 0,1,2,4,8
  TAIL=22 step mla_tiles 60 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 64,256 --contexts 128,2048 --splits 0,1 \
    --tiles 32x0x2,32x0x3,64x0x2,32x4x2,16x4x3
  TAIL=6 step check_moe 90 python3 -m bench.check_moe_gpu
  TAIL=6 step moonlight 80 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  TAIL=6 step qwen3 70 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  TAIL=30 step profile_moonlight_256 60 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 16
  ;;
w)
  # The MLA split kernel at 4 warps (two programs an SM) and the one-wave range rule, against
  # 8 warps; the GPU checks; Moonlight's decode (about 200 s). (It also ran the --l2-prefetch
  # A/B, since taken out with the flag: slower everywhere.)
  TAIL=62 step mla_rule 90 python3 -m bench.mla_kernel --mode decode --heads 16,128 \
    --batch-sizes 1,16,64,128,256 --contexts 128,2048 --splits 0 --tiles 32x8x2,32x4x2,32x4x3
  TAIL=4 step check_moe 90 python3 -m bench.check_moe_gpu
  TAIL=6 step moonlight 80 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  ;;
x)
  # MLA decode: other tiles at 4 warps and the combine reading live ranges only; the checks;
  # every decode figure of the README's table (about 380 s).
  TAIL=26 step mla16 60 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 1,16,64,256 --contexts 128,2048 --splits 0 --tiles 32x0x2,16x4x2,64x4x2
  TAIL=6 step mla128 40 python3 -m bench.mla_kernel --mode decode --heads 128 \
    --batch-sizes 1,16,64,256 --contexts 128 --splits 0
  TAIL=4 step check_moe 90 python3 -m bench.check_moe_gpu
  TAIL=12 step greedy 70 python3 -m bench.gpu.greedy_gpu
  TAIL=8 step llama 80 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,16x128,64x128,64x2048,256x512 --repeats 2
  for model in qwen3-30b-a3b moonlight-16b-a3b; do
    TAIL=6 step "$model" 60 python3 -m bench.engine --preset "$model" --skip-hf \
      --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  done
  TAIL=34 step profile_moonlight_256 40 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 20
  ;;
y)
  # The greedy check of the family that mode x's time limit cut (about 60 s).
  TAIL=12 step greedy 200 python3 -m bench.gpu.greedy_gpu deepseek-v3
  ;;
z)
  # Decode-sized MoE tiles (64 and 256 tokens), merged into the device's copy of the table;
  # the decode steps with them and with the bfloat16 logits read as they are by the greedy
  # argmax; the greedy checks of every family (about 330 s). (It ran once with TMA candidates
  # for decode too: nothing gained, taken back out; see bench/NOTES.md.)
  TAIL=6 step tune_moonlight 100 python3 -m bench.moe_kernel --tune \
    --shape moonlight-16b-a3b-fused --tokens 64,256 --reps 10 --layers 4
  TAIL=8 step tune_qwen3 60 bash -c "python3 -m bench.moe_kernel --tune --shape qwen3-30b-a3b \
    --tokens 64,256 --reps 10 --layers 4 && python3 bench/gpu/apply_tuned.py \
    $OUT/tune_moonlight.txt $OUT/tune_qwen3.txt"
  for model in moonlight-16b-a3b qwen3-30b-a3b; do
    TAIL=5 step "$model" 50 python3 -m bench.engine --preset "$model" --skip-hf \
      --prefill '' --decode 64x128,256x128 --repeats 2
  done
  TAIL=36 step greedy 140 python3 -m bench.gpu.greedy_gpu
  ;;
u)
  # Sums left to the next norm (split-K reduce, MoE combine) and the align's offsets folded
  # into its scatter, against the last commit's tree on the same machine (`.base`, carried:
  # git archive HEAD | tar -x -C .base); the norm kernel's checks, every family's greedy tokens
  # (about 560 s).
  TAIL=6 step kernels 120 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_skinny_gemm.py -k "pending or deferred or rms"
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    for model in llama3-8b qwen3-30b-a3b moonlight-16b-a3b; do
      shapes=64x128,256x128; [ "$model" = llama3-8b ] && shapes=16x128,64x128
      TAIL=5 step "${model}_$tree" 60 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
        python3 -m bench.engine --preset $model --skip-hf --prefill '' --decode $shapes \
        --repeats 2"
    done
  done
  TAIL=36 step greedy 140 python3 -m bench.gpu.greedy_gpu
  ;;
A)
  # Split-K tiles timed with and without their reduce launch (the engine now leaves that sum
  # to the next norm for O and down) at 1, 16 and 64 rows; Moonlight's batch-256 profile;
  # Llama's decode table and Moonlight's prefill against transformers, after the sums left
  # to the norms (about 330 s).
  TAIL=80 step skinny 120 python3 -m bench.skinny_gemm --shapes qwen3_o,o,down --rows 1,16,64 \
    --defer --tiles pf:4:1024,pf:8:512,pf:4:1024:2,pf:8:512:2,pf:4:512:4,pf:8:512:4,\
dot:16:256:2,tma:64:128:2:4:4,tma:32:128:2:4:4,tma:64:128:4:4:4,tma:64:64:4:4:4
  TAIL=34 step profile_moonlight_256 40 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 24
  TAIL=8 step llama 80 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,16x128,64x128,64x2048,256x512 --repeats 2
  TAIL=10 step moonlight_hf 140 python3 -m bench.engine --preset moonlight-16b-a3b \
    --decode '' --prefill 64x128,8x2048 --repeats 3
  ;;
B)
  # The O and down projections' split tiles (timed without their reduce in A) in the engine,
  # against the tree before them (`.base`); Moonlight's batch-256 profile and its MLA decode's
  # launches at 256 x 128 for what comes next (about 330 s).
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    for model in llama3-8b qwen3-30b-a3b; do
      TAIL=5 step "${model}_$tree" 60 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
        python3 -m bench.engine --preset $model --skip-hf --prefill '' \
        --decode 1x128,16x128,64x128 --repeats 2"
    done
  done
  TAIL=34 step profile_moonlight_256 90 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 24
  TAIL=30 step mla16 60 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 256 --contexts 128 --splits 0,1,2 --tiles 32x4x2,32x4x3,16x4x2,16x4x3,32x8x2
  ;;
C)
  # QKV's split tiles without their reduce (what leaving its partials to the RoPE kernel
  # would give), Llama-3-8B's and Qwen3-30B-A3B's, at 1, 16 and 64 rows (about 40 s).
  TAIL=60 step skinny_qkv 90 python3 -m bench.skinny_gemm --shapes qkv,qwen3_qkv \
    --rows 1,16,64 --defer --tiles tma:64:128:2:4:4,tma:64:128:4:4:4,tma:32:128:2:4:4,\
tma:32:128:4:4:4,tma:64:64:4:4:4,pf:8:512:2,pf:4:512:4,pf:4:1024
  ;;
D)
  # Moonlight 256 x 128 on one machine: the step back to back, the step alone with its
  # forward's device time (CUDA events), and the profile's kernel time, to place the 0.45 ms
  # between the back-to-back step and its kernels (about 110 s).
  TAIL=5 step moonlight_256 60 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --prefill '' --decode 256x128 --repeats 3
  TAIL=14 step profile_moonlight_256 60 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 4
  ;;
E)
  # What the device waits for in Moonlight 256 x 128's back-to-back steps: each step() call's
  # host time, and the first synchronizing call under torch's sync debug mode (about 90 s).
  TAIL=30 step sync_probe 120 python3 -m bench.gpu.sync_probe --preset moonlight-16b-a3b \
    --decode 256x128
  ;;
F)
  # Moonlight 256 x 128's gap placed: every step() call's host time, each forward's device time
  # and the time between forwards (CUDA events), the graph replayed bare; then the MLA decode
  # kernel's pipeline depth and tile at 64 and 256 sequences (about 150 s).
  TAIL=12 step sync_probe 120 python3 -m bench.gpu.sync_probe --preset moonlight-16b-a3b \
    --decode 256x128
  TAIL=30 step mla_stages 100 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 64,256 --contexts 128 \
    --tiles 32x0x2,32x0x1,32x0x3,32x0x4,64x0x1,64x0x2,64x0x3,16x0x3,16x0x4
  ;;
G)
  # The look-ahead step that leaves out requests ending by length, and the prefix compare in
  # C: each step() call's parts (first calls, last calls), then Moonlight's decode tables
  # against the tree before them (`.base`) on the same machine (about 200 s).
  TAIL=16 step sync_probe 120 python3 -m bench.gpu.sync_probe --preset moonlight-16b-a3b \
    --decode 256x128
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    TAIL=5 step "moonlight_$tree" 70 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --prefill '' \
      --decode 1x128,64x128,256x128 --repeats 3"
  done
  ;;
H)
  # The MLA decode kernel with its latent in four quarters (independent score products)
  # against the one-chain kernel, then where each one's warps wait (ncu, if its counters are
  # readable on this machine) at 256 x 128 (about 150 s).
  TAIL=16 step mla_quarters 120 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 1,64,256 --contexts 128,2048 --quarters 0,1
  TAIL=60 step ncu_mla 120 bash -c 'ncu --clock-control none -k regex:mla_decode \
    --launch-count 4 --section SpeedOfLight --section WarpStateStats --section Occupancy \
    --section LaunchStats python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 256 --contexts 128 --quarters 0,1 --reps 1 --layers 1 \
    | grep -v "^    ---\|^ *$" | cut -c1-110'
  ;;
I)
  # The quartered MLA decode's launches (tiles, warps, stages) at Moonlight's and DeepSeek's
  # head counts, where its warps wait (ncu), and Moonlight's decode table against the tree
  # before it (`.base`) on the same machine (about 250 s).
  TAIL=40 step mla_quarter_tiles 120 bash -c 'python3 -m bench.mla_kernel --mode decode \
    --heads 16 --batch-sizes 1,64,256 --contexts 128,2048 --quarters 1 \
    --tiles 32x0x2,32x0x3,32x8x2,64x0x2,64x8x2,16x0x2,32x0x1 | grep "^|"
    python3 -m bench.mla_kernel --mode decode --heads 128 --batch-sizes 1,64 \
    --contexts 128,2048 --quarters 0,1 | grep "^| [0-9]"'
  TAIL=45 step ncu_quarters 90 bash -c 'ncu --clock-control none \
    -k regex:mla_decode_quarters --launch-count 2 --section SpeedOfLight \
    --metrics regex:smsp__warp_issue_stalled_.*_per_warp_active.pct,smsp__inst_executed.sum \
    python3 -m bench.mla_kernel --mode decode --heads 16 --batch-sizes 256 --contexts 128 \
    --quarters 1 --reps 1 --layers 1 | grep -v "^    ---\|^ *$\|^          \|WRN\|INF" \
    | cut -c1-110'
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    TAIL=5 step "moonlight_$tree" 70 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --prefill '' \
      --decode 1x128,64x128,256x128 --repeats 3"
  done
  ;;
J)
  # MLA's absorptions through the Triton head-batched product against cuBLAS's, the kernels
  # checked compiled (MLA decode both ways, bf16 at full shapes), every tiny family's greedy
  # tokens, and Moonlight's decode table against the tree before (`.base`) (about 280 s).
  TAIL=20 step mla_absorb 60 python3 -m bench.mla_absorb
  TAIL=12 step check_moe 90 python3 -m bench.check_moe_gpu --shape moonlight-16b-a3b
  TAIL=8 step greedy 80 python3 -m bench.gpu.greedy_gpu
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    TAIL=5 step "moonlight_$tree" 70 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --prefill '' \
      --decode 1x128,64x128,256x128 --repeats 3"
  done
  ;;
K)
  # The README's decode tables after the look-ahead, MLA quarters and query absorption
  # changes, and where Moonlight's batch-256 step goes now (about 300 s).
  TAIL=6 step moonlight 80 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
    --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  TAIL=6 step qwen3 70 python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf \
    --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  TAIL=7 step llama 80 python3 -m bench.engine --preset llama3-8b --skip-hf \
    --prefill '' --decode 1x128,16x128,64x128,64x2048,256x512 --repeats 3
  TAIL=30 step profile_moonlight_256 70 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 256x128 --top 14
  ;;
L)
  # The MoE align's kernels in programmatic dependent launch: checked compiled against the
  # reference, then Moonlight's and Qwen3-30B-A3B's decode tables against the same tree with
  # the align launched plainly (`.base`) on the same machine (about 280 s).
  TAIL=6 step check_moe 70 python3 -m bench.check_moe_gpu --shape moonlight-16b-a3b \
    --shape qwen3-30b-a3b --skip-mla
  for model in moonlight-16b-a3b qwen3-30b-a3b; do
    for tree in new base; do
      dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
      TAIL=5 step "${model}_$tree" 60 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
        python3 -m bench.engine --preset $model --skip-hf --prefill '' \
        --decode 64x128,256x128 --repeats 3"
    done
  done
  ;;
M)
  # MLA decode at DeepSeek-V3's 128 heads with 64- and 32-head tiles (the quartered kernel;
  # 16-head tiles were 8.4 / 32.9 / 15.7 / 414 µs at 1 x 128 / 64 x 128 / 1 x 2,048 / 64 x
  # 2,048 in `I`): fewer re-reads of each latent tile, larger tensor-core products (about 90 s).
  for bh in 64 32; do
    TAIL=16 step "mla_heads128_bh$bh" 60 python3 -m bench.mla_kernel --mode decode \
      --heads 128 --batch-sizes 1,64 --contexts 128,2048 --block-h $bh \
      --tiles 64x0x2,32x0x2,64x0x1,32x0x3
  done
  ;;
N)
  # The MLA decode's heads-a-program rule (`default_block_h`) checked compiled against the
  # reference (16 and 128 heads, bf16) and timed at 128 heads (about 80 s).
  TAIL=12 step check_mla 60 python3 -m bench.check_moe_gpu --shape moonlight-16b-a3b
  TAIL=6 step mla_rule 40 python3 -m bench.mla_kernel --mode decode --heads 128 \
    --batch-sizes 1,64 --contexts 128,2048
  ;;
O)
  # The grouped MoE path's launches apart (align, gate-up, down, each GEMM against its
  # weights' floor) at decode sizes, then each GEMM's launch varied alone from the table's
  # config at 256 tokens, Moonlight as the engine runs it (shared experts fused), for a
  # `down=` entry in fused_moe_configs.TUNED; and the router's two paths (about 430 s: run it
  # alone).
  TAIL=10 step moe_split 100 python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused \
    --shape qwen3-30b-a3b --tokens 1,64,256 --split-times
  # DeepSeek's float32 gate logits past 8 tokens: cuBLAS against the tensor-core kernel
  # (moe_routing.ROUTER_DOT_MAX_TOKENS is 0 until this says where the kernel wins).
  TAIL=12 step router 40 python3 -m bench.moe_kernel --shape moonlight-16b-a3b \
    --shape deepseek-v3 --tokens 16,64,256,1024 --router
  # MLA's projections (now `Linear`: the skinny GEMM where TUNED records a win) at 1-256 rows.
  TAIL=30 step skinny_mla 60 python3 -m bench.skinny_gemm --shapes moonlight_qkv_a,moonlight_o \
    --rows 1,64,256 --tiles tma:64:128:1:4:4,tma:64:128:2:4:4,tma:64:128:4:4:4,tma:128:64:1:4:4
  TAIL=6 step tune_down 140 python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused \
    --tokens 256 --tune-gemm down
  TAIL=6 step tune_gate_up 140 python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused \
    --tokens 256 --tune-gemm gate_up
  ;;
P)
  # This session's engine changes against the tree before them, on the same machine (`.base`:
  # `rm -rf .base && mkdir .base && git archive 0c6849b | tar -x -C .base`): Moonlight's
  # batch-256 MoE row from O's search (gate-up 128-wide, 5 stages; down 128-wide on its own
  # launch), its MLA output projection on the skinny GEMM (split sum left to the norm), and
  # the post-attention norm with the gate's logits in one launch at a decode step's few
  # tokens; checked compiled first (about 420 s).
  TAIL=4 step check_moe 80 python3 -m bench.check_moe_gpu --shape moonlight-16b-a3b \
    --shape qwen3-30b-a3b --skip-mla
  TAIL=4 step norm_gate 60 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py -k gate
  TAIL=8 step skinny_o 40 python3 -m bench.skinny_gemm --shapes moonlight_o --rows 1,64 \
    --defer --tiles tma:64:128:4:4:4,tma:64:128:2:4:4
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    TAIL=5 step "moonlight_$tree" 75 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --prefill '' \
      --decode 1x128,64x128,256x128 --repeats 3"
    TAIL=4 step "qwen3_$tree" 55 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf --prefill '' \
      --decode 1x128,64x128 --repeats 3"
  done
  ;;
R)
  # The grouped GEMMs' launches searched at the other decode rows (Moonlight 64 and 128,
  # Qwen3-30B-A3B 128 and 256, as O did at Moonlight 256), Llama-3-8B's figures, then
  # Qwen3-30B-A3B's batch-1 profile (about 400 s).
  TAIL=12 step tune_more 160 bash -c 'for g in down gate_up; do
    python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused --tokens 64,128 --tune-gemm $g
    python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 128,256 --tune-gemm $g
    done 2>&1 | grep -v "^  skip\|^floor\|^$\|^NVIDIA"'
  TAIL=4 step llama 55 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,64x128 --repeats 3
  # Where Qwen3-30B-A3B's batch-1 step goes now (its kernels a layer, against their bytes).
  TAIL=30 step profile_qwen3_1 70 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --top 16
  ;;
T)
  # Routing with the align's count in one launch (`route_count_kernel`: the grouped MoE path
  # past 128 pairs, one launch fewer a MoE layer) against the commit before it (`.base`:
  # `rm -rf .base && mkdir .base && git archive e6c4569 | tar -x -C .base`): the routed
  # entries checked at full shapes, then `fused_moe_routed` alone and the engine at 64 and
  # 256 tokens (about 420 s).
  TAIL=4 step check_moe 80 python3 -m bench.check_moe_gpu --shape moonlight-16b-a3b \
    --shape qwen3-30b-a3b --skip-mla
  for tree in new base; do
    dir=$PWD; [ "$tree" = base ] && dir=$PWD/.base
    TAIL=6 step "routed_$tree" 40 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 64,256 --path routed"
    TAIL=4 step "qwen3_$tree" 60 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset qwen3-30b-a3b --skip-hf --prefill '' \
      --decode 64x128,256x128 --repeats 3"
    TAIL=4 step "moonlight_$tree" 65 env PYTHONPATH="$dir:/tmp/site" bash -c "cd $dir && \
      python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --prefill '' \
      --decode 64x128,256x128 --repeats 3"
  done
  ;;
W)
  # R without its profile, for a call of under 300 s: Llama-3-8B's figures, then the grouped
  # GEMMs' launches searched at the other decode rows (Moonlight 64 and 128, Qwen3-30B-A3B 128
  # and 256, as O did at Moonlight 256).
  TAIL=4 step llama 60 python3 -m bench.engine --preset llama3-8b --skip-hf --prefill '' \
    --decode 1x128,64x128 --repeats 3
  TAIL=12 step tune_more 170 bash -c 'for g in down gate_up; do
    python3 -m bench.moe_kernel --shape moonlight-16b-a3b-fused --tokens 64,128 --tune-gemm $g
    python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 128,256 --tune-gemm $g
    done 2>&1 | grep -v "^  skip\|^floor\|^$\|^NVIDIA"'
  ;;
Y)
  # The small MoE path's gate-up on the tensor cores (SmallBatchTiles.gate_up_dot: the token
  # as row 0 of a 16-row tile, the weight loads pipelined by Triton; the grouped path's dot
  # gate-up took 16.4 µs a layer at one token against the small path's CUDA-core 19.0): one
  # layer at one token for several tiles (the sixth value is the pipeline's stages), checked
  # against the reference in the same table, then the engine at batch 1 with the first dot
  # tiles through a wrapper, against the default (about 200 s).
  TAIL=24 step small_tiles 90 bash -c 'python3 -m bench.moe_kernel --shape qwen3-30b-a3b \
    --shape moonlight-16b-a3b-fused --tokens 1 --path small --reps 20 \
    --small-tiles 16,256,8,256,4 --small-tiles 64,128,8,256,4,4 \
    --small-tiles 32,128,8,256,4,4 --small-tiles 32,256,8,256,4,3 \
    --small-tiles 64,64,8,256,4,4 --small-tiles 16,256,8,256,4,4 2>&1 | grep "^## \|^### \|^| 1 "'
  for dot in 0 1; do
    for preset in qwen3-30b-a3b moonlight-16b-a3b; do
      TAIL=3 step "${preset%%-*}_dot$dot" 50 python3 -c "
import sys
import engine.kernels.fused_moe_small as f
from bench.engine import main
if $dot:
    launch, tiles = f._launch, f.SmallBatchTiles(64, 128, 8, 256, 4, gate_up_dot=True)
    f._launch = lambda *a: launch(*a[:-1], tiles)
sys.exit(main(['--preset', '$preset', '--skip-hf', '--prefill', '', '--decode', '1x128',
               '--repeats', '3']))"
    done
  done
  ;;
Z)
  # RoPE, the q/k norms and the KV write folded into the decode attention's launch
  # (`attention.decode_attention` of a DecodeRope, DECODE_ROPE_IN_ATTENTION, off): its
  # tests compiled on the GPU (bit for bit against the two launches, real concurrency among
  # the splits' programs; the tiny families' greedy tokens with it on), then Llama-3-8B and
  # Qwen3-30B-A3B with it off and on through a wrapper (about 300 s).
  TAIL=6 step rope_tests 120 python3 -m pytest -x -q -rf tests/engine/test_triton_attention.py \
    -k rope_folded
  for on in 0 1; do
    for preset in llama3-8b qwen3-30b-a3b; do
      TAIL=3 step "${preset%%-*}_rope$on" 55 python3 -c "
import sys
import engine.layers.triton_attention as t
from bench.engine import main
t.DECODE_ROPE_IN_ATTENTION = bool($on)
sys.exit(main(['--preset', '$preset', '--skip-hf', '--prefill', '', '--decode',
               '1x128,64x128', '--repeats', '3']))"
    done
  done
  ;;
b1)
  # Batch 1's launches. Moonlight's 1 x 128 profile first: its MLA side (about 35 µs a layer
  # against 7 of bytes, by subtraction) has never been broken down by kernel. Then one context
  # range per sequence (the split kernel writing the output itself: no combine launch) against
  # the rules' at one sequence of 128 tokens, the kernels alone (Qwen3-30B-A3B's heads,
  # Llama-3-8B's, Moonlight's MLA), then the engine with a wrapper forcing one range at batch
  # 1 (about 430 s).
  TAIL=30 step profile_moonlight_1 80 python3 -m bench.profile_decode \
    --preset moonlight-16b-a3b --decode 1x128 --top 20
  TAIL=10 step attn_splits 60 bash -c 'python3 -m bench.attention_kernel --shapes 1x128 \
    --heads 32/4/128 --splits 0,1,2; python3 -m bench.attention_kernel --shapes 1x128 \
    --splits 0,1,2'
  # Llama-3-8B's decode attention at 64 x 128 (15.4 µs a layer against 8 of KV bytes; the
  # 64 x 128 target's margin): tiles, warps, stages and splits around the rule's.
  TAIL=14 step attn_64x128 60 bash -c 'python3 -m bench.attention_kernel --shapes 64x128 \
    --block-n 16,32,64 --num-warps 2,4,8 --num-stages 2,3,4 --splits 0,2 2>&1 \
    | sort -t"|" -k7 -n | head -16'
  TAIL=8 step mla_splits 40 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 1 --contexts 128 --splits 0,1,2,4
  for one in 0 1; do
    for preset in qwen3-30b-a3b moonlight-16b-a3b; do
      TAIL=3 step "${preset%%-*}_one$one" 55 python3 -c "
import sys
import engine.kernels.attention as a
import engine.layers.triton_attention as t
from bench.engine import main
if $one:
    splits, mla = a.decode_splits, t.mla_decode
    a.decode_splits = lambda b, *r: 1 if b == 1 else splits(b, *r)
    t.mla_decode = lambda q, *r, **k: mla(q, *r, **(dict(k, num_kv_splits=1) if len(q) == 1 else k))
sys.exit(main(['--preset', '$preset', '--skip-hf', '--prefill', '', '--decode', '1x128',
               '--repeats', '3']))"
    done
  done
  ;;
b2)
  # MLA's query absorption and latent side in one launch (head_bmm.absorb_query_and_latent,
  # triton_attention.MLA_ABSORB_WITH_LATENT, off): the greedy test compiled on the GPU, the
  # two forms alone (the table's "same": outputs and caches bit for bit), then Moonlight with
  # it off and on through a wrapper (about 260 s).
  TAIL=6 step absorb_latent_test 90 python3 -m pytest -x -q -rf \
    tests/engine/test_triton_attention.py -k absorption_with_latent
  TAIL=8 step absorb_latent 40 python3 -m bench.mla_absorb --heads 16,128 --rows 1,16,64 \
    --with-latent
  for on in 0 1; do
    TAIL=3 step "moonlight_latent$on" 60 python3 -c "
import sys
import engine.layers.triton_attention as t
from bench.engine import main
t.MLA_ABSORB_WITH_LATENT = bool($on)
sys.exit(main(['--preset', 'moonlight-16b-a3b', '--skip-hf', '--prefill', '', '--decode',
               '1x128,64x128', '--repeats', '3']))"
  done
  ;;
b3)
  # Whether a persistent decode step is worth building (bench/persistent_chain.py): a chain of
  # dependent GEMVs as one launch each (with and without PDL), as cuBLAS's, and as one
  # persistent launch whose tiles load their weights before waiting for the product before;
  # Qwen3-30B-A3B's QKV-sized products, then one expert's gate-up and down sizes (about 60 s).
  TAIL=12 step persistent_chain 50 python3 -m bench.persistent_chain
  TAIL=12 step persistent_chain_small 40 python3 -m bench.persistent_chain \
    --shapes 1536x2048,2048x1536 --layers 96
  # Then the real thing (bench/persistent_layer.py): a layer's attention half (norm, QKV,
  # RoPE with the KV write, the decode splits, their combine, O) as the engine's launches and
  # as one persistent launch a layer, Qwen3-30B-A3B at 128 and 2,048 tokens of context,
  # Llama-3-8B at 128; then Qwen3-30B-A3B's whole layers (the MoE half too: 16 layers of 1.2 GB
  # of experts each). "same bytes as ours" checks the persistent launch against the same
  # kernels launched one by one; err is against float32 (about 180 s).
  TAIL=16 step persistent_layer 90 python3 -m bench.persistent_layer --context 128,2048 \
    --programs-per-sm 1,2,3 --stages 1,3
  TAIL=8 step persistent_layer_llama 60 python3 -m bench.persistent_layer --preset llama3-8b \
    --layers 32 --programs-per-sm 1,2,3
  TAIL=8 step persistent_layer_moe 90 python3 -m bench.persistent_layer --moe --layers 16 \
    --programs-per-sm 1,2
  ;;
b4)
  # The skinny GEMM at 128 and 256 rows with row blocks past 64 (skinny_gemm.WIDE_TILES: W read
  # once or twice, not four times) against cuBLAS on the projections those batches run:
  # Moonlight's fused query-and-latent (9.4 µs a layer in the 256 x 128 step, about 5 of
  # FLOPs) and O, Qwen3-30B-A3B's and Llama-3-8B's QKV and O. cuBLAS's row and the fastest of
  # each shape and row count (about 90 s). A winner becomes a TUNED row at that count.
  TAIL=30 step wide_gemm 120 bash -c 'python3 -m bench.skinny_gemm --rows 128,256 \
    --shapes moonlight_qkv_a,moonlight_o,qwen3_qkv,qwen3_o,qkv,o --tiles wide 2>&1 \
    | grep -E "^\| [a-z0-9_]+ \| [0-9]+ x [0-9]+ \| [0-9]+ \| (torch|.*<)"'
  ;;
b5)
  # Constrained decoding's step (every request under one regex that cannot end in the run;
  # a synthetic tokenizer of the preset's 128k vocabulary) with overlapped scheduling, which
  # constrained batches take since the sixteenth session (the mask filled while the forward
  # pass runs), and without it, as they ran before (about 150 s).
  for overlap in on off; do
    flag=""; [ "$overlap" = off ] && flag="--disable-overlap-schedule"
    TAIL=4 step "constrained_$overlap" 75 python3 -m bench.engine --preset llama3-8b \
      --skip-hf --prefill '' --decode 1x128,64x128 --repeats 2 --regex $flag
  done
  ;;
b6)
  # The persistent experiment's last question (bench/NOTES.md): does it lose because each
  # program keeps only two K steps of registers in flight? The GEMV tiles on the tensor cores
  # (the vector as row 0 of 16) let Triton pipeline their weight loads through shared memory,
  # in both forms alike. The chain first, then Qwen3-30B-A3B's attention half and whole layers
  # (which also checks the barrier after the counter's acquire: two programs an SM gave a wrong
  # whole-layer output before it), about 150 s; then the down kernel's tiles below.
  for tiles in "16 256 4" "16 512 3"; do
    set -- $tiles
    TAIL=8 step "chain_dot_$1x$2" 40 python3 -m bench.persistent_chain --block-n "$1" \
      --block-k "$2" --dot-stages "$3" --programs-per-sm 1,2 --spin-ns 0
  done
  TAIL=8 step layer_dot 50 python3 -m bench.persistent_layer --block-n 16 --block-k 256 \
    --gemv-dot --stages 3 --programs-per-sm 1,2
  TAIL=8 step layer_moe 50 python3 -m bench.persistent_layer --moe --layers 16 \
    --programs-per-sm 1,2
  TAIL=8 step layer_moe_dot 50 python3 -m bench.persistent_layer --moe --layers 16 \
    --block-n 16 --block-k 256 --gemv-dot --stages 3 --programs-per-sm 1,2
  # Then the small MoE path's down kernel on the tensor cores (SmallBatchTiles.down_dot, the
  # seventh value: its stages) against the CUDA-core down, one layer at one token, each model
  # with its default gate-up (Qwen3-30B-A3B's CUDA-core tiles, Moonlight's dot tiles), 30 s.
  small_down_dot
  ;;
b7)
  # Batch 1 now: Qwen3-30B-A3B's step by kernel (its last profile predates Y, b2 and the
  # norm with the gate's logits), the one-row projections that cuBLAS runs (Qwen3-30B-A3B's
  # and Llama-3-8B's QKV, Moonlight's fused query-and-latent) against our tiles with more
  # K steps in flight (tensor-core row-0-of-16 tiles pipelined 4-6 deep, the prefetching
  # CUDA-core tiles, split K), then both MoE models' batch-1 figures (about 250 s).
  TAIL=40 step profile_qwen3_1 70 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --top 24
  TAIL=40 step gemv_rows1 80 bash -c 'python3 -m bench.skinny_gemm --rows 1 \
    --shapes qwen3_qkv,qkv,moonlight_qkv_a --tiles fma:8:512,pf:8:512,pf:4:1024,\
dot:16:256:1:4:4,dot:16:256:1:4:6,dot:16:128:1:4:8,dot:32:256:1:4:4,dot:16:256:2:4:4,\
tma:16:256:1:4:4,tma:16:256:1:4:6,tma:32:128:1:4:6,pf:4:1024:2 2>&1 | grep -E "^\|"'
  for preset in qwen3-30b-a3b moonlight-16b-a3b; do
    TAIL=4 step "${preset%%-*}_1" 60 python3 -m bench.engine --preset "$preset" --skip-hf \
      --prefill '' --decode 1x128,64x128 --repeats 3
  done
  ;;
b8)
  # The O projection at batch 1 with its weight streamed into registers while the decode
  # attention runs (skinny_gemm's preloading tiles, `pre`; the split and combine launches let
  # it be scheduled first: pdl.TRIGGER_FIRST_MAX_ROWS): its tests compiled, the tiles alone
  # (no attention before them: only the launch overlaps), then Qwen3-30B-A3B 1 x 128 through
  # bench/gpu/preload_ab.py: today's launches, the preloading tiles with and without the
  # trigger, tiles of half the registers in two splits, then QKV preloaded too (about 540 s).
  TAIL=6 step preload_tests 90 python3 -m pytest -x -q -rf tests/engine/test_skinny_gemm.py \
    -k "preload or matches_torch"
  TAIL=24 step preload_alone 60 bash -c 'python3 -m bench.skinny_gemm --rows 1 \
    --shapes qwen3_o,moonlight_o,o --tiles tma:64:128:4:4:4,pre:16:4096:1:16,pre:16:2048:2:8,\
pre:8:4096:1:8,pre:16:2048:1:8,pre:8:2048:1:4,pre:8:2048:2:4 2>&1 | grep "^|"'
  for cfg in ":0" "pre:16:4096:1:16:1" "pre:16:4096:1:16:0" "pre:16:2048:2:8:1"; do
    tiles=${cfg%:*}; first=${cfg##*:}
    TAIL=3 step "qwen3_${tiles//:/_}_tf$first" 60 python3 bench/gpu/preload_ab.py \
      --tiles "$tiles" --trigger-first "$first" -- --preset qwen3-30b-a3b --skip-hf \
      --prefill '' --decode 1x128 --repeats 3
  done
  # QKV preloaded beside the MoE's down launch (which, with the norm after it, triggers first).
  for qkv in pre:8:2048:1:4 pre:16:2048:1:8; do
    TAIL=3 step "qwen3_qkv_${qkv//:/_}" 60 python3 bench/gpu/preload_ab.py \
      --tiles pre:16:4096:1:16 --qkv-tiles "$qkv" -- --preset qwen3-30b-a3b --skip-hf \
      --prefill '' --decode 1x128 --repeats 3
  done
  ;;
b9)
  # b8 for Moonlight (MLA's decode, combine and output absorption trigger first; O is 2048 x
  # 2048, 64 KB a program at 16 rows) and Llama-3-8B (O 4096 x 4096: 32 MB, more than the
  # registers hold: three 64 KB programs an SM, the rest after them), about 450 s; first the
  # tiny checkpoints' greedy tokens with every one-row product preloaded and the triggers on,
  # each prompt alone (a decode batch of one), against transformers.
  TAIL=10 step greedy_preload 90 python3 bench/gpu/preload_ab.py --every-one-row --greedy
  for cfg in ":0" "pre:16:2048:1:8:1" "pre:8:2048:1:4:1" "pre:16:2048:1:8:0"; do
    tiles=${cfg%:*}; first=${cfg##*:}
    TAIL=3 step "moonlight_${tiles//:/_}_tf$first" 65 python3 bench/gpu/preload_ab.py \
      --tiles "$tiles" --trigger-first "$first" -- --preset moonlight-16b-a3b --skip-hf \
      --prefill '' --decode 1x128 --repeats 3
  done
  TAIL=3 step moonlight_qkv 65 python3 bench/gpu/preload_ab.py --tiles pre:16:2048:1:8 \
    --qkv-tiles pre:8:2048:1:4 -- --preset moonlight-16b-a3b --skip-hf --prefill '' \
    --decode 1x128 --repeats 3
  for cfg in ":0" "pre:16:2048:2:8:1" "pre:8:4096:1:8:1"; do
    tiles=${cfg%:*}; first=${cfg##*:}
    TAIL=3 step "llama_${tiles//:/_}_tf$first" 50 python3 bench/gpu/preload_ab.py \
      --tiles "$tiles" --trigger-first "$first" -- --preset llama3-8b --skip-hf \
      --prefill '' --decode 1x128 --repeats 3
  done
  ;;
b10)
  # b8 and b9's essentials in one call, for a session short of device time (about 420 s): the
  # kernel's tests compiled, each MoE model at batch 1 as today, with O preloaded, and with its
  # first projection too, then the greedy tokens with every one-row product preloaded.
  TAIL=4 step preload_tests 60 python3 -m pytest -x -q -rf tests/engine/test_skinny_gemm.py \
    -k preload
  for cfg in "||0" "pre:16:4096:1:16||1" "pre:16:4096:1:16|pre:8:2048:1:4|1"; do
    IFS='|' read -r o q first <<<"$cfg"
    TAIL=3 step "qwen3_${o//:/_}_${q//:/_}_tf$first" 60 python3 bench/gpu/preload_ab.py \
      --tiles "$o" --qkv-tiles "$q" --trigger-first "$first" -- --preset qwen3-30b-a3b \
      --skip-hf --prefill '' --decode 1x128 --repeats 3
  done
  for first in 0 1; do
    o=""; q=""; [ "$first" = 1 ] && { o=pre:16:2048:1:8; q=pre:8:2048:1:4; }
    TAIL=3 step "moonlight_tf$first" 65 python3 bench/gpu/preload_ab.py --tiles "$o" \
      --qkv-tiles "$q" --trigger-first "$first" -- --preset moonlight-16b-a3b --skip-hf \
      --prefill '' --decode 1x128 --repeats 3
  done
  TAIL=10 step greedy_preload 90 python3 bench/gpu/preload_ab.py --every-one-row --greedy \
    -- qwen3-moe deepseek-v3 llama
  ;;
b11|b15)
  # The preloading projections' A/B (about 260 s, now the default: the H100's figures in
  # bench/NOTES.md, the nineteenth session): each MoE model at batch 1 as before them
  # (--without-preload, no early triggers) and as the default, back to back. b15 (about 400 s)
  # then runs the two rows at their targets' line, Moonlight 256 x 128 and Llama-3-8B 64 x 128.
  for preset in qwen3-30b-a3b moonlight-16b-a3b; do
    for first in 0 1; do
      before=""; [ "$first" = 0 ] && before=--without-preload
      TAIL=3 step "${preset%%-*}_tf$first" 70 python3 bench/gpu/preload_ab.py $before \
        --trigger-first "$first" -- --preset "$preset" --skip-hf \
        --prefill '' --decode 1x128 --repeats 3
    done
  done
  if [ "$1" = b15 ]; then
    TAIL=3 step moonlight_256 70 python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf \
      --prefill '' --decode 256x128 --repeats 3
    TAIL=3 step llama_64 60 python3 -m bench.engine --preset llama3-8b --skip-hf \
      --prefill '' --decode 1x128,64x128 --repeats 3
  fi
  ;;
b12)
  # Where batch 1's time goes with O and the first projection preloaded (the profile's kernel
  # table, about 260 s): Qwen3-30B-A3B and Moonlight before the preloading rows, then as the
  # default.
  for preset in qwen3-30b-a3b moonlight-16b-a3b; do
    for first in 0 1; do
      before=""; [ "$first" = 0 ] && before=--without-preload
      TAIL=34 step "profile_${preset%%-*}_tf$first" 70 python3 bench/gpu/preload_ab.py \
        $before --trigger-first "$first" --profile -- --preset "$preset" --decode 1x128 --top 24
    done
  done
  ;;
b13)
  # The nineteenth session's untimed changes (about 400 s): the norm with the gate's logits
  # loading its gate rows before its wait while the O projection's preloading launch lets it
  # be scheduled first (skinny_gemm.PRELOAD_TRIGGERS_FIRST, off), its tests compiled, then
  # each MoE model at batch 1 off and on, alternating; then the small MoE path at one token
  # with K steps of whole rows (the gate-up's 16 x 256 tiles read each row in 512-byte pieces).
  # Moonlight also with MLA's W_UV product on head_bmm at one row (HEAD_BMM_OUTPUT_MAX_ROWS,
  # off: cuBLAS's launch ends the chain of early triggers before its O's preloading tiles).
  TAIL=4 step gate_tests 90 python3 -m pytest -x -q -rf tests/engine/test_fused_ops.py \
    tests/engine/test_triton_attention.py -k "gate or output_absorption"
  for t in 0 1 0 1; do
    TAIL=3 step "qwen3_pt$t" 60 python3 bench/gpu/preload_ab.py --preload-trigger "$t" \
      -- --preset qwen3-30b-a3b --skip-hf --prefill '' --decode 1x128 --repeats 3
  done
  for cfg in 0:0 0:1 1:1 0:0 0:1 1:1; do
    TAIL=3 step "moonlight_pt${cfg%:*}_uv${cfg#*:}" 65 python3 bench/gpu/preload_ab.py \
      --preload-trigger "${cfg%:*}" --output-absorb-rows "${cfg#*:}" -- \
      --preset moonlight-16b-a3b --skip-hf --prefill '' --decode 1x128 --repeats 3
  done
  TAIL=30 step small_long_k 100 bash -c 'python3 -m bench.moe_kernel --shape qwen3-30b-a3b \
    --shape moonlight-16b-a3b-fused --tokens 1 --path small --reps 20 \
    --small-tiles 16,256,8,256,4 --small-tiles 32,256,8,256,4,3 --small-tiles 4,1024,8,256,4 \
    --small-tiles 2,2048,8,256,4 --small-tiles 8,512,8,256,4 --small-tiles 16,256,2,1024,4 \
    --small-tiles 4,1024,2,1024,4 2>&1 | grep "^## \|^### \|^| 1 "'
  ;;
b14)
  # Llama-3-8B at batch 1 with its O (4,096 x 4,096: 32 MB, more than the registers hold
  # beside the attention) and its QKV (6,144 x 4,096) on preloading tiles of 4-8 rows, the
  # sizes that did best on Qwen3-30B-A3B's O (about 200 s): the default, then each.
  for cfg in "||" "pre:4:4096:1:4||" "pre:8:4096:1:8||" "pre:4:4096:1:4|pre:4:4096:1:4|"; do
    IFS='|' read -r o q _ <<<"$cfg"
    TAIL=3 step "llama_${o//:/_}_${q//:/_}" 50 python3 bench/gpu/preload_ab.py --tiles "$o" \
      --qkv-tiles "$q" -- --preset llama3-8b --skip-hf --prefill '' --decode 1x128 --repeats 3
  done
  ;;
b16)
  # Moonlight at batch 1 with MLA's W_UV product on head_bmm (HEAD_BMM_OUTPUT_MAX_ROWS 1) and
  # without, alternating three times (about 90 s; b13's second pair: 2.48 against 2.52 ms on
  # an H100), then b14's Llama-3-8B preloading tiles. Each run's decode row is printed.
  for i in 1 2 3; do
    for uv in 0 1; do
      ROWS='^\| 1x128' step "moonlight_uv${uv}_$i" 65 python3 bench/gpu/preload_ab.py \
        --output-absorb-rows "$uv" -- --preset moonlight-16b-a3b --skip-hf --prefill '' \
        --decode 1x128 --repeats 3
    done
  done
  for cfg in "||" "pre:4:4096:1:4||" "pre:8:4096:1:8||" "pre:4:4096:1:4|pre:4:4096:1:4|"; do
    IFS='|' read -r o q _ <<<"$cfg"
    ROWS='^\| 1x128' step "llama_${o//:/_}_${q//:/_}" 50 python3 bench/gpu/preload_ab.py \
      --tiles "$o" --qkv-tiles "$q" -- --preset llama3-8b --skip-hf --prefill '' \
      --decode 1x128 --repeats 3
  done
  ;;
b17)
  # Llama-3-8B at batch 1 with O and QKV on 4-row preloading tiles and without, alternating
  # three times (about 100 s; b16's one pair: 5.62 against 5.70 ms on an H100).
  for i in 1 2 3; do
    for cfg in "||" "pre:4:4096:1:4|pre:4:4096:1:4|"; do
      IFS='|' read -r o q _ <<<"$cfg"
      ROWS='^\| 1x128' step "llama_${o//:/_}_$i" 50 python3 bench/gpu/preload_ab.py \
        --tiles "$o" --qkv-tiles "$q" -- --preset llama3-8b --skip-hf --prefill '' \
        --decode 1x128 --repeats 3
    done
  done
  ;;
b18)
  # Batch 1 by kernel as the twentieth session left it (every preloading row, W_UV on
  # head_bmm; about 200 s): Qwen3-30B-A3B's and Moonlight's profiles, then the small MoE
  # path's down kernel on the tensor cores against the CUDA-core down (b6's last step).
  for preset in qwen3-30b-a3b moonlight-16b-a3b; do
    TAIL=34 step "profile_${preset%%-*}" 70 python3 -m bench.profile_decode --preset "$preset" \
      --decode 1x128 --top 24
  done
  small_down_dot
  ;;
b19)
  # The small MoE path's down routing again and loading its first K step before its PDL wait,
  # scheduled while the gate-up runs (SmallBatchTiles.down_preload, off; about 300 s): its
  # tests compiled, then each MoE model at batch 1, the default against 4 x 128 and 8 x 128
  # down tiles with the preload (100 and 167-168 registers: only the first beside three
  # gate-up programs an SM), alternating twice; then the tiny checkpoints' greedy tokens with it.
  TAIL=3 step down_preload_tests 80 python3 -m pytest -x -q -rf tests/engine/test_fused_moe.py \
    -k "preloaded or small_batch_routing or small_path"
  for preset in qwen3-30b-a3b moonlight-16b-a3b; do
    for i in 1 2; do
      for tiles in none 4,128 8,128; do
        opt=""; [ "$tiles" != none ] && opt="--down-preload $tiles"
        ROWS='^\| 1x128' step "${preset%%-*}_dp${tiles/,/x}_$i" 60 python3 \
          bench/gpu/preload_ab.py $opt -- --preset "$preset" --skip-hf --prefill '' \
          --decode 1x128 --repeats 3
      done
    done
  done
  TAIL=6 step greedy_down_preload 90 python3 bench/gpu/preload_ab.py --greedy \
    --down-preload 4,128 -- qwen3-moe deepseek-v3
  ;;
b20)
  # The twentieth session's defaults (about 250 s): the small path's preloading down compiled
  # against the plain down (bit for bit) and the routed MoE against torch, then each model's
  # decode rows for the README.
  ROWS='down preloaded|routed MoE qwen3-30b-a3b T=(1|4):|checks passed|FAILED' \
    step check_moe 60 python3 -m bench.check_moe_gpu --shape qwen3-30b-a3b --skip-mla
  for preset in qwen3-30b-a3b moonlight-16b-a3b llama3-8b; do
    ROWS='^device|^\| [0-9]+x' step "final_${preset%%-*}" 75 python3 -m bench.engine \
      --preset "$preset" --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  done
  ;;
b21)
  # The preloading down's tiles for Qwen3-30B-A3B at batch 1 (about 130 s): the default 4 x 128
  # (100 registers) against 8 x 64 and 2 x 256 (106) and 4 x 64 (61: two beside the gate-up).
  for tiles in 4,128 8,64 2,256 4,64 4,128 8,64; do
    ROWS='^\| 1x128' step "qwen3_dp${tiles/,/x}" 50 python3 bench/gpu/preload_ab.py \
      --down-preload "$tiles" -- --preset qwen3-30b-a3b --skip-hf --prefill '' \
      --decode 1x128 --repeats 3
  done
  ;;
b22)
  # The routing's packed keys (moe_routing.PACKED_TOPK: one block-wide reduction a choice
  # instead of two; the gate-up's weight loads wait on its routing), off by default until this
  # has run: on (PDSERVE_PACKED_TOPK=1) and off on one machine (about 330 s). The routing
  # checked compiled at full shapes with it on, then one layer at one token with the routing
  # in the kernels and with the ids given (what the routing costs), each way; then each MoE
  # model at batch 1, alternating.
  ROWS='^routing .*T=(1|4|257):|routed MoE .*T=1:|checks passed|FAILED' step check_routing 80 \
    env PDSERVE_PACKED_TOPK=1 python3 -m bench.check_moe_gpu --shape qwen3-30b-a3b \
    --shape moonlight-16b-a3b --skip-mla
  for packed in 1 0; do routing_cost "packed$packed" PDSERVE_PACKED_TOPK=$packed; done
  for i in 1 2; do
    for packed in 1 0; do
      for preset in qwen3-30b-a3b moonlight-16b-a3b; do
        ROWS='^\| 1x128' step "${preset%%-*}_packed${packed}_$i" 55 \
          env PDSERVE_PACKED_TOPK=$packed python3 -m bench.engine --preset "$preset" \
          --skip-hf --prefill '' --decode 1x128 --repeats 3
      done
    done
  done
  ;;
b23)
  # The input norm inside the first projection's preloading launch at one row
  # (skinny_gemm.NORM_IN_PRELOAD, off; about 290 s), after what one link of the chain costs
  # (bench.pdl_chain): its tests compiled, the tiny checkpoints' greedy tokens a prompt at a
  # time with it on, then each MoE model at batch 1 off and on, alternating twice.
  ROWS='^NVIDIA|^\| ' step pdl_chain 40 python3 -m bench.pdl_chain  # what one link costs
  TAIL=3 step norm_in_qkv_tests 90 python3 -m pytest -x -q -rf \
    tests/engine/test_skinny_gemm.py -k "norm_folded or preloading"
  TAIL=6 step greedy_norm_in_qkv 90 python3 bench/gpu/preload_ab.py --greedy --norm-in-qkv 1 \
    -- qwen3-moe deepseek-v3
  for i in 1 2; do
    for on in 0 1; do
      for preset in qwen3-30b-a3b moonlight-16b-a3b; do
        ROWS='^\| 1x128' step "${preset%%-*}_norm${on}_$i" 55 python3 bench/gpu/preload_ab.py \
          --norm-in-qkv "$on" -- --preset "$preset" --skip-hf --prefill '' --decode 1x128 \
          --repeats 3
      done
    done
  done
  ;;
b24)
  # RoPE with the KV write and the norm with the gate's logits triggering first at one row too
  # (pdl.MORE_TRIGGER_FIRST, off; about 220 s): the tiny checkpoints' greedy tokens a prompt at
  # a time with it on, then each MoE model at batch 1 off and on, alternating twice.
  TAIL=6 step greedy_more_tf 90 python3 bench/gpu/preload_ab.py --greedy \
    --more-trigger-first 1 -- qwen3-moe deepseek-v3 llama
  for i in 1 2; do
    for on in 0 1; do
      for preset in qwen3-30b-a3b moonlight-16b-a3b; do
        ROWS='^\| 1x128' step "${preset%%-*}_mtf${on}_$i" 55 python3 bench/gpu/preload_ab.py \
          --more-trigger-first "$on" -- --preset "$preset" --skip-hf --prefill '' \
          --decode 1x128 --repeats 3
      done
    done
  done
  ;;
b25)
  # Three switches of the small MoE path, off by default (about 330 s): one token's routing
  # inside a warp (moe_routing.route_token, PDSERVE_WARP_ROUTE=1; off, route_rows), the down's
  # pairs summed in one reduction (fused_moe_small.COMBINE_ONE_SUM, PDSERVE_COMBINE_ONE_SUM=1)
  # and the token row and activations loaded in their weight tile's layout (TILE_LOADS,
  # PDSERVE_TILE_LOADS=1). Checked compiled with all three on (the small path's routing against
  # the routing kernel's, also at DeepSeek-V3's and Kimi-K2's experts and groups, the
  # preloading down bit for bit against the plain one, the routed MoE against torch), what the
  # routing costs one layer each way (the ids given against routing in the kernels), the tiny checkpoints' greedy tokens a prompt at a time with all three on,
  # then each MoE model at batch 1 with none, the first, the first two and all three;
  # alternating twice.
  all3="env PDSERVE_WARP_ROUTE=1 PDSERVE_COMBINE_ONE_SUM=1 PDSERVE_TILE_LOADS=1"
  ROWS='^small-path routing|down preloaded|routed MoE .*T=1:|checks passed|FAILED' \
    step check_warp_route 100 $all3 python3 -m bench.check_moe_gpu --shape qwen3-30b-a3b \
    --shape moonlight-16b-a3b --routing-shape deepseek-v3 --routing-shape kimi-k2 --skip-mla
  # SKIP_COST=1 leaves out the routing cost (the twenty-third session, for its 570 s).
  [ -n "${SKIP_COST:-}" ] || for warp in 1 0; do routing_cost "warp$warp" PDSERVE_WARP_ROUTE=$warp; done
  TAIL=6 step greedy_warp_route 90 $all3 python3 bench/gpu/preload_ab.py --greedy -- \
    qwen3-moe deepseek-v3
  for i in 1 2; do
    for flags in 000 100 110 111; do
      for preset in qwen3-30b-a3b moonlight-16b-a3b; do
        ROWS='^\| 1x128' step "${preset%%-*}_s${flags}_$i" 55 env \
          PDSERVE_WARP_ROUTE=${flags:0:1} PDSERVE_COMBINE_ONE_SUM=${flags:1:1} \
          PDSERVE_TILE_LOADS=${flags:2:1} python3 -m bench.engine --preset "$preset" \
          --skip-hf --prefill '' --decode 1x128 --repeats 3
      done
    done
  done
  ;;
b26)
  # The tile-shaped loads in one kernel at a time (b25 timed both at once: Qwen3-30B-A3B 2.90 ->
  # 3.12 ms), then b20's README rows with the twenty-third session's defaults and a batch-1
  # profile (about 450 s).
  # The preloading down compiled with its activations in the tile's shape against the plain
  # down (bit for bit); Qwen3-30B-A3B at batch 1 with neither, the down's only and the
  # gate-up's only (PDSERVE_TILE_LOADS_DOWN / _GATE_UP), alternating twice; then each model's
  # decode rows.
  ROWS='down preloaded|routed MoE qwen3-30b-a3b T=(1|4):|checks passed|FAILED' \
    step check_tile_down 60 env PDSERVE_TILE_LOADS_DOWN=1 python3 -m bench.check_moe_gpu \
    --shape qwen3-30b-a3b --skip-mla
  for i in 1 2; do
    for flags in 00 01 10; do
      ROWS='^\| 1x128' step "qwen3_t${flags}_$i" 55 env PDSERVE_TILE_LOADS_GATE_UP=${flags:0:1} \
        PDSERVE_TILE_LOADS_DOWN=${flags:1:1} python3 -m bench.engine --preset qwen3-30b-a3b \
        --skip-hf --prefill '' --decode 1x128 --repeats 3
    done
  done
  for preset in qwen3-30b-a3b moonlight-16b-a3b llama3-8b; do
    ROWS='^device|^\| [0-9]+x' step "final_${preset%%-*}" 75 python3 -m bench.engine \
      --preset "$preset" --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  done
  # Where Qwen3-30B-A3B's batch-1 step goes now, on this machine.
  TAIL=45 step profile_qwen3 75 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --top 16
  ;;
b27)
  # The MLA decode's combine in the W_UV product at batch 1 (PDSERVE_MLA_COMBINE_IN_OUTPUT=1,
  # off by default; about 250 s): checked compiled against the combine launch then head_bmm
  # (16 and 128 heads), the tiny DeepSeek-V3's greedy tokens a prompt at a time with it on,
  # then Moonlight 1 x 128 off / on, alternating three times.
  ROWS='MLA combine in|checks passed|FAILED' step check_mla_combine 90 \
    python3 -m bench.check_moe_gpu --mla-only
  TAIL=6 step greedy_mla_combine 90 env PDSERVE_MLA_COMBINE_IN_OUTPUT=1 \
    python3 bench/gpu/preload_ab.py --greedy -- deepseek-v3
  for i in 1 2 3; do
    for on in 0 1; do
      ROWS='^\| 1x128' step "moonlight_c${on}_$i" 55 env PDSERVE_MLA_COMBINE_IN_OUTPUT=$on \
        python3 -m bench.engine --preset moonlight-16b-a3b --skip-hf --prefill '' \
        --decode 1x128 --repeats 3
    done
  done
  ;;
b30)
  # RoPE, the q/k norms and the KV write in the decode attention's launch
  # (PDSERVE_DECODE_ROPE_IN_ATTENTION=1, off), now with the group's rotated queries in
  # registers (about 200 s): its tests compiled, the tiny Llama's, Qwen3's and Qwen3-MoE's
  # greedy tokens a prompt at a time with it on, then Qwen3-30B-A3B and Llama-3-8B 1 x 128 off
  # / on, alternating twice.
  TAIL=4 step test_rope_in_decode 60 python3 -m pytest -x -q -rf \
    tests/engine/test_triton_attention.py -k 'rope_folded_in_equals'
  TAIL=8 step greedy_rope_in_decode 70 env PDSERVE_DECODE_ROPE_IN_ATTENTION=1 \
    python3 bench/gpu/preload_ab.py --greedy -- llama qwen3 qwen3-moe
  for i in 1 2; do
    for on in 0 1; do
      for preset in qwen3-30b-a3b llama3-8b; do
        ROWS='^\| 1x128' step "${preset%%-*}_rope${on}_$i" 45 env \
          PDSERVE_DECODE_ROPE_IN_ATTENTION=$on python3 -m bench.engine --preset "$preset" \
          --skip-hf --prefill '' --decode 1x128 --repeats 5
      done
    done
  done
  ;;
b31)
  # The README's decode rows with the defaults, for an H200 (b26 without its decided A/B;
  # about 250 s), and where Qwen3-30B-A3B's batch-1 step goes on that machine.
  readme_rows
  TAIL=45 step profile_qwen3 75 python3 -m bench.profile_decode --preset qwen3-30b-a3b \
    --decode 1x128 --top 16
  ;;
b34)
  # How close a launch that only reads comes to the copy rate at a decode layer's sizes, and
  # what a boundary between two such launches costs (`bench.read_kernel`, about 150 s), then
  # where the small MoE path's two kernels stand against that (one layer at one token) and
  # where their warps wait (ncu, if its counters are readable on this machine).
  TAIL=12 step read_ceiling 90 bash -c 'python3 -m bench.read_kernel --sizes-mb 17,25,50,75 \
    --programs-per-sm 2,3,4 --num-warps 4,8 --block 1024,2048 --unroll 1,2,4 | grep -v "^| "
    python3 -m bench.read_kernel --sizes-mb 75 --programs-per-sm 3 --num-warps 4 \
    --block 1024 --unroll 2 --chain 50,25 | grep "^chain"'
  ROWS='^## |^\| 1 ' step layer_small 40 bash -c 'for s in qwen3-30b-a3b \
    moonlight-16b-a3b-fused; do echo "## $s"; python3 -m bench.moe_kernel --shape $s \
    --tokens 1 --path small-routed --reps 20 | grep "^| 1 "; done'
  TAIL=60 step ncu_small_moe 90 bash -c 'ncu --clock-control none \
    -k regex:"small_gate_up|small_down_preload" --launch-count 4 --section SpeedOfLight \
    --section Occupancy --metrics regex:smsp__warp_issue_stalled_.*_per_warp_active.pct \
    python3 -m bench.moe_kernel --shape qwen3-30b-a3b --tokens 1 --path small-routed \
    --reps 1 --layers 1 | grep -v "^    ---\|^ *$\|^          \|WRN\|INF" | cut -c1-110'
  ;;
b35)
  # The decode attention kernels reading the length and page-table row, and RoPE with the KV
  # store its token's position, slot and cos/sin rows, before their PDL wait
  # (PDSERVE_METADATA_BEFORE_WAIT; on by default since this ran, taken; about 420 s): their tests compiled with
  # it on, the tiny Llama's, Qwen3's, Qwen3-MoE's and DeepSeek-V3's greedy tokens a prompt
  # at a time with it on, then Qwen3-30B-A3B, Moonlight and Llama-3-8B at 1 x 128 and
  # Llama-3-8B at 64 x 128, off and on, alternating twice.
  TAIL=4 step test_metadata 90 env PDSERVE_METADATA_BEFORE_WAIT=1 python3 -m pytest -x -q \
    -rf tests/engine/test_triton_attention.py tests/engine/test_fused_ops.py \
    -k 'decode_matches or decode_with_rope or rope_and_kv_store or qk_norm_rope'
  TAIL=8 step greedy_metadata 100 env PDSERVE_METADATA_BEFORE_WAIT=1 \
    python3 bench/gpu/preload_ab.py --greedy -- llama qwen3 qwen3-moe deepseek-v3
  for i in 1 2; do
    for on in 0 1; do
      for preset in qwen3-30b-a3b moonlight-16b-a3b llama3-8b; do
        shapes=1x128; [ "$preset" = llama3-8b ] && shapes=1x128,64x128
        ROWS='^\| [0-9]+x128' step "${preset%%-*}_meta${on}_$i" 45 env \
          PDSERVE_METADATA_BEFORE_WAIT=$on python3 -m bench.engine --preset "$preset" \
          --skip-hf --prefill '' --decode $shapes --repeats 5
      done
    done
  done
  ;;
b36)
  # Expert parallelism over NCCL on a multi-GPU kind (about 120 s): the tiny Qwen3-MoE's and
  # DeepSeek-V3's greedy tokens at EP 2 (and 4 on four GPUs) against EP 1 and transformers,
  # every page back; then the gloo driver's CPU tests, to show both backends pass.
  nvidia-smi -L | wc -l
  TAIL=6 step ep_nccl 240 python3 -m pytest -q -rs tests/gpu/test_expert_parallel_nccl.py
  TAIL=3 step ep_gloo 120 python3 -m pytest -q tests/engine/test_expert_parallel.py
  ;;
b37)
  # Llama-3-8B's gate-up with its activation on TMA tiles over 128 rows of x (TUNED in the
  # 256-row graph since the twenty-seventh session) against cuBLAS + the activation at the
  # graphs' other row counts past 64, then the engine at 256 x 512 and 256 x 128 with the
  # row against cuBLAS, alternating twice (about 400 s). Ran in the twenty-eighth session:
  # TUNED takes the tiles from 224 rows.
  ROWS='^\| gate' step gate_up_rows 120 python3 -m bench.skinny_gemm --shapes gate_up_silu \
    --rows 72,96,128,160,192,224,248,256 --tiles tma:128:64:1:8:4:128
  for i in 1 2; do
    for row in cublas tma:128:64:1:8:4:128; do
      ROWS='^\| [0-9]+x' step "gate_up_${row%%:*}_$i" 80 python3 bench/gpu/preload_ab.py \
        --tuned-row "gate_up:28672:4096:256=$row" -- --preset llama3-8b --skip-hf \
        --prefill '' --decode 256x128,256x512 --repeats 1
    done
  done
  ;;
b38)
  # One call for an H200 (about 520 s): the README's rows (b31's engine runs, without its
  # profile), then b37's gate-up rows and one alternation of its engine A/B.
  readme_rows
  ROWS='^\| gate' step gate_up_rows 60 python3 -m bench.skinny_gemm --shapes gate_up_silu \
    --rows 72,128,192,248,256 --reps 10 --tiles tma:128:64:1:8:4:128
  for row in cublas tma:128:64:1:8:4:128; do
    ROWS='^\| [0-9]+x' step "gate_up_${row%%:*}" 70 python3 bench/gpu/preload_ab.py \
      --tuned-row "gate_up:28672:4096:256=$row" -- --preset llama3-8b --skip-hf \
      --prefill '' --decode 256x512 --repeats 1
  done
  ;;
b39)
  # The bfloat16 first divergences b37's machine showed (DeepSeek-V3's token outside the torch
  # run's top 5, Qwen3's an exact tie), with the top 20 and the ties (about 60 s).
  TAIL=12 step greedy 120 python3 -m bench.gpu.greedy_gpu deepseek-v3 qwen3
  ;;
b40)
  # One call for an H200 (about 420 s): the README's rows, then b39's greedy check.
  readme_rows
  TAIL=12 step greedy 100 python3 -m bench.gpu.greedy_gpu deepseek-v3 qwen3
  ;;
b41)
  readme_rows  # the README's decode rows alone (about 345 s), for a call that must be short
  step staged_upload 40 python3 -m pytest -q -rf tests/engine/test_staged_upload.py
  ;;
b43)
  moe_rows  # the MoE models' README rows alone (about 180 s), for a call with little time left
  step staged_upload 40 python3 -m pytest -q -rf tests/engine/test_staged_upload.py
  ;;
b42)
  # Moonlight's 8 x 2,048 prefill (2x transformers at the line): where its kernels' time goes,
  # then the same-run pair with transformers (about 300 s). Compute-bound, so an H100's ratio
  # stands for the H200's.
  TAIL=60 step profile_prefill 150 python3 -m bench.profile_decode --preset moonlight-16b-a3b \
    --decode '' --profile-prefill 8x2048 --top 30
  ROWS='^device|^\| [0-9]+x' step prefill_pair 200 python3 -m bench.engine \
    --preset moonlight-16b-a3b --decode '' --prefill 8x2048 --repeats 2
  ;;
b44)
  # For an H100 (about 230 s): the staged upload's CUDA test, then Moonlight's 8 x 2,048 pair
  # with every pinned slot grown in the warm-up (b42's profile found the second slot's first
  # allocation in a timed step).
  step staged_upload 40 python3 -m pytest -q -rf tests/engine/test_staged_upload.py
  ROWS='^device|^\| [0-9]+x' step prefill_pair 200 python3 -m bench.engine \
    --preset moonlight-16b-a3b --decode '' --prefill 8x2048 --repeats 3
  ;;
b45)
  prefill_tiles
  ;;
b46)
  # DeepSeek-V3's and Kimi-K2's MoE prefill tiles as the engine runs them (the shared expert
  # fused; no tuned rows: `default_config`), with the prefill GEMMs then searched apart (about
  # 450 s; one layer's weights, 23 and 34 GB).
  for shape in deepseek-v3-fused kimi-k2-fused; do tune_prefill "$shape"; done
  ;;
b47)
  # One call for either kind (about 550 s on an H200, 500 on an H100): on an H200 the MoE
  # models' README rows first (not taken on an H200 since the fifteenth session); then b45;
  # then the MoE tile rule's A/B on DeepSeek-V3's and Kimi-K2's shapes (they have no tuned
  # rows), and on an H100 b46's DeepSeek-V3 half if time is left.
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then moe_rows; fi
  prefill_tiles
  defaults_ab
  if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    tune_prefill deepseek-v3-fused
  fi
  ;;
b48)
  prefill_engine_ab
  ;;
b50)
  # One call for either kind. The decode split kernel with a second loop for short ranges
  # (`DecodeTiles.short_n`: per sequence, in the same launch) against 32- and 64-key tiles
  # (about 60 s), then Llama-3-8B's one-split rows with the fastest of those at 64 x 144 (through
  # `PDSERVE_DECODE_TILES`) against the default, twice, back to back; on an H200 the MoE
  # models' README rows and Llama's batch 1 too. (The thirty-second session's H100: plain
  # 32-key tiles 15.3 against 17.8 µs at 64 x 128, 0.03-0.08 ms off the engine's 128-token
  # rows but 0.05 onto 64 x 2,048, which the second loop is to keep.)
  TAIL=40 step decode_short 120 python3 -m bench.attention_kernel \
    --shapes 64x144,64x512,64x2048,256x512 --block-n 32,64 --num-warps 4 --num-stages 3 \
    --short 0,32:160,32:256,32:512
  best=$(python3 - "$OUT/decode_short.txt" <<'PY'
import sys
rows = []  # (µs, tiles) of the rows with a short loop at 64 x 144 but the engine's own
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.split("|")]
    if len(cells) > 7 and cells[1] == "64x144" and cells[5] != "-" and "*" not in cells[7]:
        try:
            rows.append((float(cells[7].rstrip("*<")), ",".join(cells[2:5] + cells[5].split(":"))))
        except ValueError:
            pass  # a failed configuration
print(min(rows)[1] if rows else "")
PY
)
  echo "== fastest one-split tiles with a short loop at 64 x 144: ${best:-none}"
  llama_rows() {  # NAME [TILES]: Llama-3-8B's one-split rows, with PDSERVE_DECODE_TILES=TILES
    ROWS='^device|^\| [0-9]+x' step "$1" 90 env PDSERVE_DECODE_TILES="${2:-}" python3 -m \
      bench.engine --preset llama3-8b --skip-hf --prefill '' --decode 64x128,64x2048,256x512 \
      --repeats 2
  }
  h200=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -c H200)
  llama_rows tiles_default
  [ -n "$best" ] && llama_rows tiles_best "$best"
  [ "$h200" -gt 0 ] && moe_rows
  if [ -n "$best" ]; then llama_rows tiles_default_2; llama_rows tiles_best_2 "$best"; fi
  [ "$h200" -gt 0 ] && ROWS='^device|^\| [0-9]+x' step rows_llama_1 60 python3 -m bench.engine \
    --preset llama3-8b --skip-hf --prefill '' --decode 1x128 --repeats 3
  # Batch 1's split count as its graph launches it (for 8,192 tokens) against fewer, at a
  # short context and a long one (Llama-3-8B's and Qwen3-30B-A3B's heads).
  for heads in 32/8/128 32/4/128; do
    TAIL=14 step "decode_batch1_${heads//\//_}" 60 python3 -m bench.attention_kernel \
      --shapes 1x144,1x2048 --heads "$heads" --graph-context 8192 --block-n 64 --num-warps 4 \
      --num-stages 2 --splits 0,1,4,16
  done
  true
  ;;
b51)
  # For either kind (about 300 s): DeepSeek-V3's and Kimi-K2's full-size MoE layers against the
  # reference, with their shared experts fused. (The thirty-second session's H100 ran out of
  # memory in the float32 reference of DeepSeek-V3's layer; the reference now widens one
  # expert's weights at a time and the weights are drawn in bfloat16: 23 and 34 GB a layer.)
  TAIL=30 step check_moe_deepseek 200 python3 -m bench.check_moe_gpu --shape deepseek-v3 \
    --skip-mla
  TAIL=30 step check_moe_kimi 200 python3 -m bench.check_moe_gpu --shape kimi-k2 --skip-mla
  ;;
b52)
  # For either kind (about 520 s): batch 1's decode split rule. The thirty-third session's
  # H100 timed the graphs' split count (33 at 8 KV heads, 64 at 4) slower than 16 at 144 and
  # 2,048 tokens (1.3-2.5 µs a layer). First the kernel at 144, 2,048 and 8,192 tokens with
  # the count capped and each split held to two tiles or more, then Llama-3-8B's and
  # Qwen3-30B-A3B's batch-1 rows with each rule (`PDSERVE_DECODE_SPLITS`), back to back.
  for heads in 32/8/128 32/4/128; do
    TAIL=22 step "splits_${heads//\//_}" 70 python3 -m bench.attention_kernel \
      --shapes 1x144,1x2048,1x8192 --heads "$heads" --graph-context 8192 --block-n 64 \
      --num-warps 4 --num-stages 2 --splits 0,16,32 --min-split-tiles 1,2
  done
  for rule in "" 16 64,2; do  # "" (unset): the default
    for preset in llama3-8b qwen3-30b-a3b; do
      ROWS='^device|^\| [0-9]+x' step "rule_${preset%%-*}_${rule//,/_}" 80 \
        env PDSERVE_DECODE_SPLITS="$rule" python3 -m bench.engine --preset "$preset" --skip-hf \
        --prefill '' --decode 1x128,1x2048 --repeats 2
    done
  done
  ;;
b54)
  # For either kind (about 500 s): the quartered MLA decode with each tile's page ids read a
  # step ahead (`pages_ahead`: the tiles then copied into shared memory ahead of their
  # products, 32-key tiles in 3 stages, two buffers, two programs an SM; the default at 16
  # heads and 4 warps since the thirty-fourth session) against the plain loop (64-key tiles
  # through registers, one buffer): the kernel at Moonlight's 16 heads, batch 1 included, then
  # Moonlight's decode rows with the default and the plain loop (`PDSERVE_MLA_DECODE_TILES`).
  TAIL=30 step mla_ahead 110 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 1,64,256 --contexts 128,2048 --block-h 16 \
    --tiles 64x0x2,32x0x3a,32x0x2,64x0x3a,16x4x4a
  # DeepSeek-V3's 128 heads at 64 a program (8 warps, one program an SM): the plain loop's
  # 64-key tiles against pages ahead in 16- and 32-key tiles (125 and 176 KB, 80 and 200 B of
  # spills on sm_90).
  TAIL=12 step mla_ahead_128 60 python3 -m bench.mla_kernel --mode decode --heads 128 \
    --batch-sizes 64 --contexts 128,2048 --block-h 64 --tiles 64x0x2,16x0x3a,32x0x3a
  for tiles in "" 64,0,2,0 "" 64,0,2,0; do  # "" (unset): the default
    ROWS='^device|^\| [0-9]+x' step "mla_rows_${tiles:-default}" 80 \
      env PDSERVE_MLA_DECODE_TILES="$tiles" python3 -m bench.engine \
      --preset moonlight-16b-a3b --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 2
  done
  ;;
b55)
  # For either kind, a short budget (about 330 s), in order of worth: Qwen3-30B-A3B's batch-1
  # rows with the split count capped at 16 against the default (`b52`'s engine half), the
  # quartered MLA decode with its page ids read ahead against the default (`b54`'s kernel
  # half, cut), then batch 1's split kernel at 8,192 tokens (`b52`'s first half).
  for rule in "" 16; do
    ROWS='^device|^\| [0-9]+x' step "rule_qwen3_${rule:-default}" 80 \
      env PDSERVE_DECODE_SPLITS="$rule" python3 -m bench.engine --preset qwen3-30b-a3b \
      --skip-hf --prefill '' --decode 1x128,1x2048 --repeats 2
  done
  TAIL=14 step mla_ahead 60 python3 -m bench.mla_kernel --mode decode --heads 16 \
    --batch-sizes 64,256 --contexts 128,2048 --block-h 16 --tiles 64x0x2,32x0x3a
  for heads in 32/4/128 32/8/128; do
    TAIL=8 step "splits8k_${heads//\//_}" 40 python3 -m bench.attention_kernel \
      --shapes 1x8192 --heads "$heads" --graph-context 8192 --block-n 64 \
      --num-warps 4 --num-stages 2 --splits 0,16 --min-split-tiles 1
  done
  ;;
b57)
  # An H200 only (about 130 s; on another card it runs nothing and says so): the MoE models'
  # README decode rows, none of which has run on an H200 since the twentieth session.
  if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    echo "not an H200: nothing run"; exit 3
  fi
  moe_rows
  ;;
b58)
  # An H200 only (about 450 s; on another card it runs nothing and says so): the batch-1
  # switches that were level on H100s, where the same fixed costs are a smaller share of the
  # step (the H200's faster memory makes each link of a layer's launch chain count for more):
  # the input norm in QKV's preloading launch (b23), the RoPE and gate-norm launches
  # triggering first (b24), RoPE in the decode attention (b30) and batch 1's split count
  # capped at 16 (b55), against the default, for Qwen3-30B-A3B and Moonlight at 1 x 128,
  # alternating twice. A winner still needs its greedy check (b23, b24) before it is taken.
  if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    echo "not an H200: nothing run"; exit 3
  fi
  for i in 1 2; do
    for preset in qwen3-30b-a3b moonlight-16b-a3b; do
      for ab in default norm_in_qkv more_tf rope_in_attention splits16; do
        case $ab in
          default) run=(python3 bench/gpu/preload_ab.py --) ;;
          norm_in_qkv) run=(python3 bench/gpu/preload_ab.py --norm-in-qkv 1 --) ;;
          more_tf) run=(python3 bench/gpu/preload_ab.py --more-trigger-first 1 --) ;;
          rope_in_attention) run=(env PDSERVE_DECODE_ROPE_IN_ATTENTION=1 python3 -m bench.engine) ;;
          splits16) run=(env PDSERVE_DECODE_SPLITS=16 python3 -m bench.engine) ;;
        esac
        ROWS='^\| 1x128' step "${preset%%-*}_${ab}_$i" 60 "${run[@]}" --preset "$preset" \
          --skip-hf --prefill '' --decode 1x128 --repeats 3
      done
    done
  done
  ;;
b59)
  # For either kind (about 90 s): Moonlight's prefill timelines after the thirty-fifth
  # session's host changes (each prompt's ids kept as an array, the per-sequence rows, the
  # page table's updates and the extend blocks through reused pinned buffers). Before them,
  # on that session's H100: 8 x 2,048 idle 3.6-5.3 ms a step in gaps over 4 µs, 1.5-2.5 ms of
  # it at the step's start with `aten::pin_memory` and list conversions in the host's view.
  TAIL=40 step prefill_timeline 90 python3 -m bench.profile_decode --preset moonlight-16b-a3b \
    --decode '' --profile-prefill 8x2048,64x128 --disable-cuda-graph --top 6
  ;;
b60)
  # For either kind (about 150 s): where a prefill's wall time goes (`bench.prefill_phases`:
  # the host's phases of each step beside the device's, then the host's top functions). On the
  # thirty-first session's H100 Moonlight's prefills took 79.8 / 157.8 ms (64 x 128 / 8 x 2,048)
  # against 68.3 / 145.5 ms of kernels in this session's profile: 12 ms a prefill not on the
  # device.
  for preset in moonlight-16b-a3b qwen3-30b-a3b; do
    TAIL=80 step "phases_${preset%%-*}" 120 python3 -m bench.prefill_phases --preset "$preset" \
      --prefill 64x128,8x2048 --repeats 3 --disable-cuda-graph --host-profile 22
  done
  ;;
b61)
  # For either kind (about 220 s): back-to-back prefills with overlapped scheduling (each
  # launched before the one before it is applied) against the plain loop
  # (`--disable-overlap-schedule`), alternating twice: Moonlight's and Llama-3-8B's 256 x 128 and
  # 8 x 2,048 in steps of 8,192 prompt tokens (the server's default chunked prefill size: 4 and
  # 2 steps). Expected from b60's phases: the host's 1.5-3 ms between two prefills (applying
  # one, scheduling and preparing the next) off each step after the first.
  prefill_steps_ab steps 90 256x128,8x2048 8192
  ;;
b62)
  # For either kind (about 260 s): every tiny family's greedy tokens, now also with prompts
  # arriving two at a time in 16-token prefill steps (prefills launched ahead of the step in
  # flight, chunks of a prompt ahead of the chunk before); then prefills in steps of 3,000
  # prompt tokens, which end mid-prompt (the rest launched ahead), overlapped against the
  # plain loop, alternating twice: Moonlight's and Llama-3-8B's 64 x 128 (3 steps) and 8 x 2,048
  # (6 steps).
  TAIL=40 step greedy 150 python3 -m bench.gpu.greedy_gpu
  prefill_steps_ab chunks 60 64x128,8x2048 3000
  ;;
b63)
  # An H200 (about 560 s; on another card it runs b62 instead): Moonlight's prefill pairs with
  # transformers (the 8 x 2,048 2x target's last H200 figure, 1.96-2.01x, predates the MoE
  # GEMMs' prefill tiles and the host changes: the H100 now reaches the H200's old 108.5k
  # tok/s), the MoE models' README decode rows, Llama-3-8B's, then the greedy check.
  if ! nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    echo "not an H200: b62 instead"; exec bash bench/gpu/session.sh b62
  fi
  ROWS='^device|^\| [0-9]+x' step prefill_pair 170 python3 -m bench.engine \
    --preset moonlight-16b-a3b --decode '' --prefill 8x2048,64x128 --repeats 3
  moe_rows
  ROWS='^device|^\| [0-9]+x' step rows_llama 90 python3 -m bench.engine --preset llama3-8b \
    --skip-hf --prefill '' --decode 1x128,64x128,256x128 --repeats 3
  TAIL=40 step greedy 120 python3 -m bench.gpu.greedy_gpu
  ;;
b64)
  # For either kind (about 80 s): short prefills' phases (`bench.prefill_phases`), where the
  # host's launches may bound the step (b60: 26 ms of host for Moonlight's 27 layers whatever
  # the tokens, against about 10 ms of weights at 128 tokens): first-token latency at low load.
  for preset in moonlight-16b-a3b qwen3-30b-a3b llama3-8b; do
    hp=(); [ $preset = moonlight-16b-a3b ] && hp=(--host-profile 30)
    TAIL=60 step "short_${preset%%-*}" 60 python3 -m bench.prefill_phases --preset "$preset" \
      --prefill 1x128,1x1024,4x256 --repeats 5 --disable-cuda-graph "${hp[@]}"
  done
  ;;
b65)
  # For either kind (about 260 s): short prefills run as decode rows through the decode graphs
  # (`--short-prefill-tokens`, on by default with graphs): every tiny family's greedy tokens
  # (all their prompts are short, so every prefill takes the graphs), then short prefills'
  # phases against the extend path (`--short-prefill-tokens 0`), twice. Expected from b64:
  # Moonlight's 1 x 128 from 31 ms (host-bound: 29.6 ms of launches) toward its device work
  # (about a 128-row decode step, 11-12 ms), Llama-3-8B's from 12.4 toward 6.
  TAIL=40 step greedy 150 python3 -m bench.gpu.greedy_gpu
  for i in 1 2; do
    for spt in -1 0; do
      for preset in moonlight-16b-a3b qwen3-30b-a3b llama3-8b; do
        ROWS='^\| [0-9]+x' step "short_${preset%%-*}_${spt}_$i" 60 python3 -m bench.prefill_phases \
          --preset "$preset" --prefill 1x32,1x128,1x256,4x64 --repeats 5 --short-prefill-tokens "$spt"
      done
    done
  done
  ;;
b66)
  # For either kind (about 100 s): every tiny family's greedy tokens after the decode step
  # after a prefill went out before the prefill is applied (its new rows' inputs the
  # prefill's samples on the device, the others' the host's; the staggered run mixes both).
  TAIL=40 step greedy 150 python3 -m bench.gpu.greedy_gpu
  ;;
b67)
  # For either kind (about 200 s): b66's greedy check, then where the host's time goes in
  # prefills too long for the decode graphs (over 256 tokens: Moonlight 1 x 1,024 launched
  # 20.4 ms of host in b64, 350-1,100 µs a layer): each function's own time and its
  # cumulative time under cProfile, for Moonlight and Llama-3-8B.
  TAIL=40 step greedy 150 python3 -m bench.gpu.greedy_gpu
  for preset in moonlight-16b-a3b llama3-8b; do
    TAIL=12 step "host_${preset%%-*}" 60 python3 -m bench.prefill_phases --preset "$preset" \
      --prefill 1x512,1x1024 --repeats 3 --host-profile 45
  done
  ;;
b68)
  # For either kind (about 450 s): prefills through CUDA graphs captured in pieces between
  # attention calls (engine/piecewise_graph.py): their tokens and log-probabilities against
  # the eager prefill's for every tiny family (tests/gpu/test_piecewise_graph.py), the greedy
  # check, then medium prefills' phases with the pieces against without
  # (`--disable-piecewise-cuda-graph`). Expected from b67 (Moonlight 1 x 512 31.4 ms wall,
  # 30.0 of host launches; Llama-3-8B 21.6 / 19.9): the host's share to about an attention
  # call and a replay a layer, the wall to the device's work.
  TAIL=15 step pieces_test 200 python3 -m pytest -q -x tests/gpu/test_piecewise_graph.py
  TAIL=40 step greedy 150 python3 -m bench.gpu.greedy_gpu
  for preset in moonlight-16b-a3b llama3-8b; do
    for flag in "" --disable-piecewise-cuda-graph; do
      ROWS='^\| [0-9]+x|^prefills of' step "medium_${preset%%-*}${flag:+_eager}" 90 \
        python3 -m bench.prefill_phases --preset "$preset" --prefill 1x300,1x512,1x1024,1x2048,4x256 \
        --repeats 3 $flag
    done
  done
  ;;
b69)
  # For either kind (about 300 s): low-load serving through the router, Moonlight colocated,
  # prompts of 256-512 tokens at 2 requests/s: the graphs (short prefills as decode rows,
  # longer ones in pieces) against every prefill launched from Python. Expected from b65 and
  # b68: TTFT p50 about 4-6 ms lower, the eager prefill's host launches off the path. First,
  # short prefills as decode rows (the default up to 256 tokens) against in pieces
  # (`--short-prefill-tokens 0`), which was the faster at which sizes.
  for preset in moonlight-16b-a3b; do
    for spt in -1 0; do
      ROWS='^\| [0-9]+x' step "short_${preset%%-*}_$spt" 40 python3 -m bench.prefill_phases \
        --preset "$preset" --prefill 1x32,1x128,1x256,4x64,8x32 --repeats 3 --short-prefill-tokens "$spt"
    done
  done
  for run in graphs eager; do
    wargs=""; [ $run = eager ] && wargs="--disable-piecewise-cuda-graph --short-prefill-tokens 0"
    TAIL=14 step "serving_$run" 140 python3 -m bench.serving_pd --preset moonlight-16b-a3b \
      --modes colocated --request-rates 2 --num-prompts 24 --random-input-len 512 \
      --random-output-len 32 --random-range-ratio 0.5 --slo-ttft-ms 100 --slo-itl-ms 30 \
      --out-dir "/tmp/pd_$run" --worker-args "$wargs"
  done
  ;;
b70)
  # For either kind (about 570 s): the prefill pieces' GPU tests first (both captures in the
  # shared `capturing` block since 16ebd89, run on the CPU only before), then on an H200 the
  # issues' target rows (b63's, the MoE rows first), elsewhere the greedy check and b69.
  TAIL=15 step pieces_test 150 python3 -m pytest -q -x tests/gpu/test_piecewise_graph.py
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    target_rows
  else
    TAIL=40 step greedy 150 python3 -m bench.gpu.greedy_gpu
    DEADLINE=$((DEADLINE - SECONDS)) bash bench/gpu/session.sh b69
  fi
  ;;
b71)
  # For either kind (about 250 s): the pieces' capture with buckets longer than the context
  # (b70 found bench.prefill_phases' short shapes, whose context is 265 tokens, failing the
  # start with a device-side assert: the padding batch was one sequence of the bucket's
  # length), then b69's short prefills as decode rows against in pieces.
  TAIL=15 step pieces_test 150 python3 -m pytest -q -x tests/gpu/test_piecewise_graph.py
  for spt in -1 0; do
    ROWS='^\| [0-9]+x' step "short_moonlight_$spt" 50 python3 -m bench.prefill_phases \
      --preset moonlight-16b-a3b --prefill 1x32,1x128,1x256,4x64,8x32 --repeats 3 \
      --short-prefill-tokens "$spt"
  done
  ;;
b72)
  # For either kind (about 250 s): disaggregated against colocated Llama-3-8B serving on one
  # GPU (MPS), refreshed since the decode and prefill graphs (the README's table predates them).
  TAIL=30 step serving_pd 240 python3 -m bench.serving_pd --preset llama3-8b --mps \
    --request-rates 4 8 16 --num-prompts 24 --random-input-len 1024 \
    --random-output-len 64 --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  ;;
b73)
  # For either kind (about 150 s): b72's comparison for Moonlight (MLA and MoE), up to rate inf.
  TAIL=30 step serving_pd 200 python3 -m bench.serving_pd --preset moonlight-16b-a3b --mps \
    --request-rates 4 8 16 inf --num-prompts 24 --random-input-len 1024 \
    --random-output-len 64 --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  ;;
b74)
  # On an H200 only (about 400 s): b70's target rows without the pieces' tests; elsewhere it
  # stops at once, so that a call that gets another card costs nothing more.
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    target_rows
  else
    echo "not an H200: b74 runs nothing"
  fi
  ;;
b75)
  # For either kind (about 560 s): the prefill warm-up at start. Its GPU test (no request of
  # any kind compiles a kernel after it; greedy tokens as without it), bench.first_use on
  # Moonlight without and with it (a fresh Triton cache each run), b73's colocated Moonlight
  # at rate 4 again (its first rate had the slow prefills), then Llama-3-8B's first_use.
  TAIL=12 step warmup_test 200 python3 -m pytest -q -x tests/gpu/test_prefill_warmup.py
  first_use() {  # PRESET FLAG
    TAIL=18 step "first_use_${1%%-*}${2:+_cold}" 110 python3 -m bench.first_use \
      --preset "$1" --mix 12 $2
  }
  first_use moonlight-16b-a3b --disable-prefill-warmup
  first_use moonlight-16b-a3b ""
  TAIL=12 step serving_moonlight 120 python3 -m bench.serving_pd --preset moonlight-16b-a3b \
    --mps --modes colocated --request-rates 4 --num-prompts 24 --random-input-len 1024 \
    --random-output-len 64 --slo-ttft-ms 500 --slo-itl-ms 30 --out-dir /tmp/pd
  first_use llama3-8b --disable-prefill-warmup
  first_use llama3-8b ""
  ;;
b76)
  # For either kind (about 480 s): b75 again less its serving rate (run: TTFT p99 60 ms), with
  # its two mends (the GPU test's prompts within the tiny models' context, first_use's pool
  # sized by tokens rather than by the widest batch of the longest prompts).
  warmup_checks
  ;;
b77)
  # For either kind (about 220 s): b76 cut to what a short lease holds: the GPU test, then
  # Moonlight's first_use with the warm-up (the compilations left to requests), then without.
  TAIL=12 step warmup_test 120 python3 -m pytest -q tests/gpu/test_prefill_warmup.py
  TAIL=18 step first_use_moonlight 90 python3 -m bench.first_use --preset moonlight-16b-a3b \
    --mix 12
  TAIL=18 step first_use_moonlight_cold 90 python3 -m bench.first_use \
    --preset moonlight-16b-a3b --mix 12 --disable-prefill-warmup
  ;;
b78)
  # For either kind: on an H200 b74's target rows (about 400 s); elsewhere b76 (about 480 s).
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    target_rows
  else
    warmup_checks
  fi
  ;;
*) echo "usage: bench/gpu/session.sh a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|p|q|r|s|t|u|v|w|x|y|z|A|B|C|D|E|F|G|H|I|J|K|L|M|N|O|P|R|T|W|Y|Z|b1|b2|b3|b4|b5|b6|b7|b8|b9|b10|b11|b12|b13|b14|b15|b16|b17|b18|b19|b20|b21|b22|b23|b24|b25|b26|b27|b30|b31|b34|b35|b36|b37|b38|b39|b40|b41|b42|b43|b44|b45|b46|b47|b48|b50|b51|b52|b54|b55|b57|b58|b59|b60|b61|b62|b63|b64|b65|b66|b67|b68|b69|b70|b71|b72|b73|b74|b75|b76|b77|b78"; exit 2 ;;
esac
