#!/usr/bin/env bash
# Run THERE (the lent GPU machine, through the device tool): install what
# tools/gpu/fetch_wheels.sh downloaded, then run the GPU tests and benchmarks. Everything goes
# under .gpu/ in the repository copy, which persists between calls while the machine is held.
#
#   bash tools/gpu/device.sh stash     # one call per part, carrying .whl/part-K (and .whl/sums)
#   bash tools/gpu/device.sh install   # unpack, install wheels, start building TE's torch extension
#   bash tools/gpu/device.sh wait      # until the build is done (call again if it says so)
#   bash tools/gpu/device.sh check     # GPU tests + benchmarks; logs and JSON into $OUT
#
# Python code then runs with:  eval "$(bash tools/gpu/device.sh env)"
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
gpu=$root/.gpu
site=$gpu/site
out=${OUT:-$gpu/out}

use_site() {
  export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
}

stash() {
  mkdir -p "$gpu/parts"
  local found=0
  for part in "$root"/.whl/part-*/bundle.tar.part-*; do
    [ -f "$part" ] || continue
    cp "$part" "$gpu/parts/" && found=1 && echo "stashed $(basename "$part")"
  done
  [ -d "$root/.whl/sums" ] && cp "$root/.whl/sums/SHA256SUMS" "$gpu/"
  [ "$found" = 1 ] || { echo "error: no .whl/part-*/ carried in this call"; return 2; }
  ls -l "$gpu/parts"
}

install() {
  [ -f "$gpu/SHA256SUMS" ] || { echo "error: stash the part that carries .whl/sums first"; return 2; }
  rm -rf "$gpu/files" && mkdir -p "$gpu/files" "$site"
  cat "$gpu"/parts/bundle.tar.part-* | tar -C "$gpu/files" -xf - || {
    echo "error: the parts do not make a whole bundle: stash every .whl/part-K"; return 2; }
  (cd "$gpu/files" && sha256sum -c --quiet ../SHA256SUMS) || {
    echo "error: checksums differ: stash the parts again"; return 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$gpu"/files/*.whl || return 1
  use_site
  # TE's PyTorch extension compiles against this machine's torch and CUDA (Hopper only: sm_90),
  # in the background so that it can outlast one call; `wait` follows it.
  rm -f "$gpu/build.done"
  NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=90 MAX_JOBS=${MAX_JOBS:-16} \
    NVTE_BUILD_MAX_JOBS=${MAX_JOBS:-16} setsid bash -c "
      python3 -m pip install -v --no-index --no-deps --no-build-isolation --target '$site' \
        '$gpu'/files/transformer_engine_torch-*.tar.gz > '$gpu/build.log' 2>&1
      echo \$? > '$gpu/build.done'" < /dev/null > /dev/null 2>&1 &
  echo "building transformer_engine_torch in the background (log: .gpu/build.log)"
  wait_build
}

wait_build() {
  local limit=${WAIT_SECONDS:-520} waited=0
  while [ ! -f "$gpu/build.done" ] && [ "$waited" -lt "$limit" ]; do
    sleep 20; waited=$((waited + 20))
    echo "  ... ${waited}s: $(tail -n 1 "$gpu/build.log" 2>/dev/null | cut -c1-150)"
  done
  if [ ! -f "$gpu/build.done" ]; then
    echo "still building: run 'bash tools/gpu/device.sh wait' again"; return 0
  fi
  if [ "$(cat "$gpu/build.done")" != 0 ]; then
    tail -n 60 "$gpu/build.log"; echo "error: the build failed (log above)"; return 1
  fi
  use_site
  python3 -c "import transformer_engine.pytorch as te, transformer_engine; \
print('transformer_engine', transformer_engine.__version__, 'imports')"
}

check() {
  use_site
  mkdir -p "$out"
  python3 - <<'PY' | tee "$out/versions.txt"
import torch, transformer_engine, megatron.core
print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformer_engine",
      transformer_engine.__version__, "| megatron-core", megatron.core.__version__)
PY
  python3 -m pytest tests/test_gpu.py tests/test_specs.py -q -p no:cacheprovider 2>&1 \
    | tee "$out/gpu-tests.log" | tail -n 25
  for preset in ${PRESETS:-125m 1.3b}; do
    python3 tools/benchmark.py --preset "$preset" --precisions bf16 fp8 \
      --placements prenorm spannorm --output "$out/benchmark-$preset.json" 2>&1 \
      | tee "$out/benchmark-$preset.log" | tail -n 12
  done
}

case "${1:-}" in
  stash) stash ;;
  install) install ;;
  wait) wait_build ;;
  check) check ;;
  env) use_site; echo "export PYTHONPATH='$PYTHONPATH'" ;;
  *) echo "usage: bash tools/gpu/device.sh stash|install|wait|check|env"; exit 2 ;;
esac
