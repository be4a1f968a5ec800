#!/usr/bin/env bash
# What the lent GPU machine lacks, fetched HERE (it reaches no registry): Python 3.12 x86-64
# wheels of pdserve's runtime dependencies missing from its image into .whl/, and with
# `mooncake`, Mooncake's CUDA 13 build (the image has torch 2.11+cu130, driver 580) plus the
# system libraries it links (RDMA verbs, NUMA) as Debian packages into .mooncake/. Both folders
# are git-ignored (info/exclude) and travel with a `run` by naming them in `carry`; on the GPU
# machine, `source bench/gpu/setup.sh` installs them. Ray is left out (its wheel nearly fills
# a call's 64 MiB alone; `pdserve local` does not need it) and so is a Redis server (no --registry
# in these runs; the redis client library travels, the workers import it).
#
#   bash bench/gpu/fetch_wheels.sh            # .whl/ only, about 8 MB
#   bash bench/gpu/fetch_wheels.sh mooncake   # and .mooncake/, about 51 MB more
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
for dir in /.whl/ /.mooncake/; do
  grep -qxF "$dir" "$exclude" 2>/dev/null || echo "$dir" >> "$exclude"
done
download() {  # download DIR SPEC...: binary wheels for CPython 3.12 on manylinux x86-64
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@"
}
# The versions this repo is tested with (the image's grpcio and protobuf may be older than
# the generated protos accept, so those two travel too).
download .whl grpcio==1.85.3 grpcio-health-checking==1.85.1 protobuf==7.36.2 hpack==4.2.0 \
  httptools==0.9.0 orjson==3.13.0 redis==8.1.0
# The router validates tool schemas with jsonschema; constrained decoding needs xgrammar.
download .whl jsonschema==4.26.0 jsonschema-specifications referencing rpds-py attrs \
  xgrammar==0.2.9 apache-tvm-ffi pydantic pydantic-core annotated-types typing-inspection
if [ "${1:-}" = mooncake ]; then
  # Its Python needs (aiohttp, requests, msgpack) are on the image already.
  download .mooncake mooncake-transfer-engine-cuda13==0.3.14
  # engine.so links libibverbs.so.1, libmlx5.so.1 and libnuma.so.1 even for TCP.
  (cd .mooncake && apt-get download -q libibverbs1 ibverbs-providers libnuma1 libnl-3-200 \
    libnl-route-3-200 >/dev/null) || {
    apt-get update -q >/dev/null
    (cd .mooncake && apt-get download -q libibverbs1 ibverbs-providers libnuma1 libnl-3-200 \
      libnl-route-3-200 >/dev/null)
  }
fi
du -sh .whl ${1:+.mooncake}
