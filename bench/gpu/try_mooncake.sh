#!/usr/bin/env bash
# Mooncake's CUDA build on the GPU machine: does it load, which libraries are missing if not,
# and can it write GPU KV pages from one process into another's over TCP, byte for byte, and
# how fast beside cuda_ipc and a plain copy. Run there, in the repo root, carrying .whl and
# .mooncake (bash bench/gpu/fetch_wheels.sh mooncake, here, first):
#
#   bash bench/gpu/try_mooncake.sh
set -uo pipefail
source bench/gpu/setup.sh || { echo "setup failed"; exit 1; }
engine_so="$(ls /tmp/site/mooncake/engine*.so 2>/dev/null | head -1)"
echo "== libraries engine.so cannot find (none is good):"
ldd "$engine_so" | grep "not found" || echo "(none)"
echo "== import"
python3 -c "import torch; import mooncake.engine as m; print('mooncake.engine loaded:', m.__file__)" \
  || exit 1
echo "== GPU to GPU over Mooncake TCP, Llama-3-8B shape, checked by SHA-256"
python3 -m bench.kv_transfer_gpu --backend mooncake --page-sizes 1 16 64 --reps 5
echo "== the same through cuda_ipc"
python3 -m bench.kv_transfer_gpu --backend cuda_ipc --page-sizes 1 16 64 --reps 5
