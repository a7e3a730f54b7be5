#!/usr/bin/env bash
# Builds the CUDA `singlora` and `singlora-lab` binaries for the H200 (sm_90) on a machine
# without a GPU or a CUDA toolkit, and leaves them compressed in .carry/ for the `device` tool
# (the recipe of ../shared/GPU.md). A cold build takes ~30 minutes on 2 cores (candle-kernels);
# keep target/.
#
#   scripts/build-cuda.sh   # -> .carry/singlora.xz, .carry/singlora-lab.xz and their wrappers
#                           #    .carry/run (singlora) and .carry/lab (singlora-lab)
#
# Environment: SINGLORA_CUDA_VENV (default ~/.cache/singlora/cuda-venv) holds the PyPI toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SINGLORA_CUDA_VENV:-$HOME/.cache/singlora/cuda-venv}
PY=${PYTHON:-python3}

# 1. CUDA 13.0 from PyPI (13.0 exactly: newer PTX is refused by driver 580)
if [ ! -x "$VENV/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc" ] && ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 \
    nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
fi
SP=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 | head -1)

# unversioned names for the linker
for l in cudart cublas cublasLt curand nvrtc; do
  f=$(ls "$SP/lib/lib$l.so."* 2>/dev/null | head -1 || true)
  [ -n "$f" ] && [ ! -e "$SP/lib/lib$l.so" ] && ln -s "$(basename "$f")" "$SP/lib/lib$l.so"
done

# 2. a link-time stand-in for libcuda.so.1 (the real one is on the GPU machine)
if [ ! -e "$SP/lib/stubs/libcuda.so" ]; then
  mkdir -p "$SP/lib/stubs"
  cargo fetch -q
  SYS=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -o "fn cu[A-Za-z0-9_]*" "$SYS" | sed 's/fn //' | sort -u | \
    awk '{print "int " $1 "(void){return 999;}"}' > "$SP/lib/stubs/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$SP/lib/stubs/libcuda.so" "$SP/lib/stubs/cuda_stub.c"
fi

# 2b. the same for libnccl.so.2 (the real one is in the GPU machine's torch venv; .carry/run
# finds it), unless SINGLORA_NO_NCCL=1 builds without several-GPU support
FEATURES=nccl
if [ "${SINGLORA_NO_NCCL:-0}" = 1 ]; then
  FEATURES=cuda
elif [ ! -e "$SP/lib/stubs/libnccl.so" ]; then
  cargo fetch -q
  SYS=$(ls -d "$HOME"/.cargo/registry/src/*/cudarc-0.19.*/src/nccl/sys/mod.rs | tail -1)
  grep -o "fn nccl[A-Za-z0-9_]*" "$SYS" | sed 's/fn //' | sort -u | \
    awk '{print "int " $1 "(void){return 999;}"}' > "$SP/lib/stubs/nccl_stub.c"
  gcc -shared -fPIC -Wl,-soname,libnccl.so.2 -o "$SP/lib/stubs/libnccl.so" "$SP/lib/stubs/nccl_stub.c"
fi

# 3. build
export CUDA_HOME="$SP" CUDA_PATH="$SP" PATH="$SP/bin:$PATH" CUDA_COMPUTE_CAP=90 \
  LIBRARY_PATH="$SP/lib:$SP/lib/stubs" NVCC_CCBIN=${NVCC_CCBIN:-gcc}
# a target dir of its own, so the CPU build in target/ stays usable
export CARGO_TARGET_DIR=${SINGLORA_CUDA_TARGET:-target/cuda}
cargo build --release --features "$FEATURES" -p singlora-cli -p singlora-lab

# 4. the binaries compressed, and per binary a wrapper that finds the GPU machine's CUDA 13
# libraries: .carry/run for singlora, .carry/lab for singlora-lab
mkdir -p .carry
for b in singlora singlora-lab; do
  strip -o ".carry/$b" "$CARGO_TARGET_DIR/release/$b"
  xz -T2 -6 -f ".carry/$b"
done
wrapper() { # WRAPPER BINARY
  sed "s/@BIN@/$2/g; s/@WRAPPER@/$1/g" > ".carry/$1" <<'SH'
#!/usr/bin/env bash
# Runs the CUDA @BIN@ binary: .carry/@WRAPPER@ ARGS...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# Both binaries are unpacked once, side by side (singlora-lab runs the singlora beside it), in
# one directory per build (a warm machine may hold an older one).
dir=${SINGLORA_BIN_DIR:-/tmp/singlora-cuda-$(cat "$here/singlora.xz" "$here/singlora-lab.xz" | cksum | cut -d' ' -f1)}
mkdir -p "$dir"
for b in singlora singlora-lab; do
  [ -x "$dir/$b" ] || { xz -dc "$here/$b.xz" > "$dir/$b"; chmod +x "$dir/$b"; }
done
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
# NCCL and cuDNN from the torch venv (nvidia-nccl-cu13, nvidia-cudnn-cu13), unless the system
# has them
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib; do
  if [ -e "$d/libnccl.so.2" ] || [ -e "$d/libcudnn.so.9" ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; fi
done
# NVLink multicast (NVLS) stays off on the lent machines
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec "$dir/@BIN@" "$@"
SH
  chmod +x ".carry/$1"
}
wrapper run singlora
wrapper lab singlora-lab
ls -la .carry/
