#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (not run by CI): builds the GPU backends
# ieu-bench offers, runs `bench --scale paper` on each that builds, then a paper-scale
# slice of the default DAG for a few hundred training steps, and prints images/s and peak
# GPU memory (nvidia-smi, sampled every 0.5 s).
#
#   scripts/gpu-check.sh [OUT_DIR]        (default: ./gpu-check)
#
# Routes tried, in order (each is optional; a route that fails to build is reported and
# skipped):
#   wgpu   `--features wgpu` (Vulkan; builds from the package registries alone)
#   tch    `--features tch` (LibTorch on CUDA, from PyPI's torch 2.9.0 and its CUDA
#          libraries: scripts/libtorch.sh --cuda; registries only)
#   cuda   `--features cuda` (CubeCL CUDA; its cubecl-llvm build script downloads an LLVM
#          bundle, so it needs network access at build time)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if ! command -v nvidia-smi >/dev/null; then
  log "no nvidia-smi: this script needs a machine with an NVIDIA GPU"
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# wgpu loads Vulkan at run time: the loader (libvulkan.so.1) and the driver's ICD file.
if ! ldconfig -p | grep -q libvulkan.so.1; then
  log "no libvulkan.so.1: the wgpu route needs the Vulkan loader (Debian/Ubuntu: libvulkan1)"
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z ${VK_DRIVER_FILES:-} && -f $icd && ! -f /usr/share/vulkan/icd.d/nvidia_icd.json ]]; then
  export VK_DRIVER_FILES=$icd
fi

# Peak GPU memory of a command (MiB), sampled in the background.
with_peak_memory() {
  local tag=$1; shift
  local samples="$OUT/$tag.mem"
  : >"$samples"
  (while true; do
     nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >>"$samples" 2>/dev/null
     sleep 0.5
   done) &
  local sampler=$!
  local start=$(date +%s)
  "$@" >"$OUT/$tag.log" 2>&1
  local rc=$?
  kill "$sampler" 2>/dev/null
  local peak=$(sort -n "$samples" | tail -1)
  log "$tag: exit $rc, $(( $(date +%s) - start )) s, peak GPU memory ${peak:-?} MiB"
  return $rc
}

for feature in wgpu tch cuda; do
  log "building --features $feature"
  if [[ $feature == tch ]] && ! { libtorch_env=$(scripts/libtorch.sh --cuda 2>"$OUT/libtorch.log") \
                                   && eval "$libtorch_env"; }; then
    log "tch: LibTorch could not be installed (see $OUT/libtorch.log)"
    continue
  fi
  if ! cargo build --release --features "$feature" >"$OUT/build-$feature.log" 2>&1; then
    log "$feature: does not build here (see $OUT/build-$feature.log)"
    continue
  fi
  bin="target/release/ieu-bench"
  cp "$bin" "$OUT/ieu-bench-$feature"
  if with_peak_memory "bench-$feature" "$OUT/ieu-bench-$feature" bench --scale paper --steps 50; then
    grep -h "images/s" "$OUT/bench-$feature.log" | tee -a "$OUT/summary.txt"
  fi
  # A paper-scale slice: one attack, no defence and IEU, on generated data (no files
  # needed), at the paper's shapes, with a scale whose epochs give a few hundred steps.
  dir="$OUT/slice-$feature"
  mkdir -p "$dir"
  cp experiments/default.yaml "$dir/spec.yaml"
  sed -i 's/attack: \[badnets-white, blended\]/attack: [badnets-white]/' "$dir/spec.yaml"
  awk '/^paper:/{p=1} p' experiments/scales.yaml \
    | sed -e 's/^paper:/paper-slice:/' \
          -e 's/data: { pretrain: 25000, tune: 25000, test: 0 }/data: { pretrain: 6400, tune: 6400, test: 1000 }/' \
          -e 's/epochs: 100,/epochs: 2,/' -e 's/warmup_epochs: 5,/warmup_epochs: 1,/' -e 's/stage1: { epochs: 10,/stage1: { epochs: 1,/' \
          -e 's/finetune: { epochs: 10,/finetune: { epochs: 1,/' \
          -e 's/stegastamp: { train_images: 0, epochs: 20,/stegastamp: { train_images: 640, epochs: 1,/' \
    >"$dir/scales.yaml"
  with_peak_memory "slice-$feature" "$OUT/ieu-bench-$feature" run "$dir/spec.yaml" \
    --scale paper-slice --store "$dir/store" --jobs 1
  grep -h "done in\|done:" "$OUT/slice-$feature.log" | tee -a "$OUT/summary.txt"
  "$OUT/ieu-bench-$feature" report "$dir/spec.yaml" --scale paper-slice --store "$dir/store" \
    | tee -a "$OUT/summary.txt"
done
log "summary in $OUT/summary.txt"
