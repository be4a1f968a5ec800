# Sourced first on the GPU machine, in the repo root: installs what bench/gpu/fetch_wheels.sh
# fetched (carried as .whl and, for Mooncake, .mooncake) into /tmp/site and sets PYTHONPATH
# (this checkout first) and LD_LIBRARY_PATH. Fails the command if an install fails.
#
#   source bench/gpu/setup.sh && python3 -m bench.kv_transfer_gpu
export PYTHONUNBUFFERED=1
# Keep NVLink multicast off, as the machine's notes ask, also in workers we start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .mooncake ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .mooncake/*.whl || return 1
  mkdir -p /tmp/sysroot
  for deb in .mooncake/*.deb; do dpkg -x "$deb" /tmp/sysroot || return 1; done
  # libcudart.so.13 comes with the image's nvidia-cuda-runtime wheel, not on the loader's path.
  cudart="$(python3 - <<'PY'
import glob, os
try:
    import nvidia
    dirs = {os.path.dirname(p) for d in nvidia.__path__
            for p in glob.glob(d + "/**/libcudart.so.13", recursive=True)}
    print(":".join(sorted(dirs)))
except ImportError:
    pass
PY
)"
  export LD_LIBRARY_PATH="/tmp/sysroot/usr/lib/x86_64-linux-gnu:/tmp/sysroot/lib/x86_64-linux-gnu${cudart:+:$cudart}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
