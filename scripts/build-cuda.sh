#!/usr/bin/env bash
# Builds the CUDA release binary of safetune for the GPU machine (fat LTO, no debug info, stripped)
# and copies it to OUT (default: .device/safetune), checking that it stays under MAX_MB (default 40:
# the working tree that travels to the GPU machine is capped at 64 MiB).
#
#   scripts/build-cuda.sh [OUT]
#
# Environment (all optional):
#   CUDA13        CUDA 13.0 toolchain folder (default $HOME/.cache/cuda13; CUDA root = $CUDA13/nvidia/cu13).
#                 Laid out with SETUP_CUDA13 when it has no nvcc.
#   SETUP_CUDA13  the toolchain setup script (default ../shared/cuda/setup-cuda13.sh beside the checkout)
#   TARGET_DIR    cargo target folder (default: $CARGO_TARGET_DIR, else target-cuda in the checkout).
#                 Keep it between builds: the first build compiles candle's CUDA kernels (20-30 min).
#   CUDA_COMPUTE_CAP  default 90 (H100 / H200)
#   MAX_MB        size limit of the stripped binary, default 40
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.device/safetune}
cuda13=${CUDA13:-$HOME/.cache/cuda13}
cu=$cuda13/nvidia/cu13
setup=${SETUP_CUDA13:-$root/../shared/cuda/setup-cuda13.sh}
target=${TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target-cuda}}
max_mb=${MAX_MB:-40}

if [ ! -x "$cu/bin/nvcc" ]; then
  if [ ! -f "$setup" ]; then
    echo "error: no nvcc in $cu and no setup script at $setup (set CUDA13 or SETUP_CUDA13)" >&2
    exit 1
  fi
  echo "laying out the CUDA 13.0 toolchain in $cuda13 with $setup" >&2
  (cd "$root" && cargo fetch) # the libcuda stub lists the symbols of the fetched cudarc source
  bash "$setup" "$cuda13"
fi

export PATH="$cu/bin:$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_HOME="$cu"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export LIBRARY_PATH="$cu/lib/stubs:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols

cargo build --release --features cuda --bin safetune \
  --manifest-path "$root/Cargo.toml" --target-dir "$target"

mkdir -p "$(dirname "$out")"
rm -f "$out"
strip -o "$out" "$target/release/safetune" 2>/dev/null || cp "$target/release/safetune" "$out"
bytes=$(stat -c %s "$out")
mb=$((bytes / 1000000))
echo "wrote $out ($mb MB)"
if [ "$bytes" -ge $((max_mb * 1000000)) ]; then
  echo "error: $out is $mb MB, over the $max_mb MB limit" >&2
  exit 1
fi
