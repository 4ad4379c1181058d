#!/usr/bin/env bash
# Run HERE (a machine that reaches the package registry), before the one device call of
# tools/gpu/check.sh: put everything that call needs into .gpu-kit/ (ignored by git), which the
# call carries (docs/gpu.md). The GPU machine has no network, Python 3.12 and torch 2.11+cu130,
# and no megatron-core or Transformer Engine. One call carries at most 64 MiB, the working tree
# (about 3 MiB) included, so the kit must stay under KIT_LIMIT_MIB (default 58).
#
#   bash tools/gpu/prepare.sh          # wheels + Transformer Engine (first run ~20-40 min on
#                                      # 2 cores, mostly compiling; later runs reuse the cache)
#   TE=0 bash tools/gpu/prepare.sh     # wheels only (seconds); check.sh then skips stage 2
#
#   bash tools/gpu/prepare.sh --print-pins   # the versions it would fetch, then stop
#
# Versions: megatron-core's dev pin and the `# gpu-kit:` lines of tools/requirements-dev.txt (the
# one place they are written), read below.
# .gpu-kit/wheels/  megatron-core (cp312) and the small pure-Python packages that
#                   Transformer Engine needs and the machine lacks (pydantic and its helpers)
# .gpu-kit/te/      transformer_engine-TE-sm90-cp312.tar.xz: a ready site folder with
#                   transformer_engine, its CUDA 13 core library cut down to Hopper's
#                   device code (tools/gpu/prune_fatbin.py: 463 MB -> 8.4 MiB as xz) and
#                   transformer_engine_torch compiled here against the GPU machine's torch
#                   (the +cu130 build; PyPI's torch of that version is that build) for CPython 3.12
# .gpu-kit/SHA256SUMS, .gpu-kit/VERSIONS
#
# Transformer Engine's PyTorch extension is C++ only (no device code), so it is built for x86-64
# and CPython 3.12 here, with NVTE_PYTORCH_FORCE_BUILD=TRUE (otherwise TE's setup first tries to
# download a prebuilt wheel).
#
# Needs here: a CPython 3.12 interpreter with headers (PYTHON312=..., else python3.12 on PATH,
# else pyenv's 3.12), nvcc 13 and g++ (CUDA_HOME=... if nvcc is elsewhere), readelf, xz, and
# ~6 GB of disk in TE_BUILD_DIR for torch and its CUDA 13 packages (headers and libraries).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kit=$root/.gpu-kit
requirements=$root/tools/requirements-dev.txt
# `pin dev NAME` / `pin gpu-kit NAME`: NAME's exact version in the requirements file, from its
# installed lines or from its `# gpu-kit:` lines.
pin() {
  local version
  if [ "$1" = dev ]; then
    version=$(sed -n "s/^$2==//p" "$requirements")
  else
    version=$(sed -n 's/^# gpu-kit: //p' "$requirements" | tr ' ' '\n' | sed -n "s/^$2==//p")
  fi
  [ -n "$version" ] || { echo "error: no $2==VERSION ($1) in $requirements" >&2; exit 2; }
  echo "$version"
}
te_version=$(pin gpu-kit transformer-engine)
torch_version=$(pin gpu-kit torch)
# megatron-core's dev pin, and the pure-Python packages TE needs that the machine lacks.
mapfile -t helpers < <(sed -n 's/^# gpu-kit: //p' "$requirements" | tr ' ' '\n' \
                       | grep -v -e '^torch==' -e '^transformer-engine==' -e '^$')
mcore_version=$(pin dev megatron-core)
wheels=("megatron-core==$mcore_version" "${helpers[@]}")
if [ "${1:-}" = --print-pins ]; then
  echo "torch==$torch_version transformer-engine==$te_version ${wheels[*]}"
  exit 0
fi
build=${TE_BUILD_DIR:-$HOME/.cache/spannorm-gpu-kit}
jobs=${MAX_JOBS:-2}
limit_mib=${KIT_LIMIT_MIB:-58}
platforms=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

say() { echo "[prepare] $*"; }
mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }

rm -rf "$kit/wheels" "$kit/SHA256SUMS" "$kit/VERSIONS"
mkdir -p "$kit/wheels" "$kit/te"
say "downloading wheels for CPython 3.12 / x86-64: ${wheels[*]}"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  "${platforms[@]}" -d "$kit/wheels" "${wheels[@]}"

if [ "${TE:-1}" = 0 ]; then
  say "TE=0: no Transformer Engine in the kit (check.sh will skip stage 2)"
  rm -rf "$kit/te"
else
  bundle=$kit/te/transformer_engine-$te_version-sm90-cp312.tar.xz
  mkdir -p "$build"
  cd "$build"
  # --- a CPython 3.12 with the GPU machine's torch (+cu130) and the CUDA 13 headers and libraries
  py312=
  for candidate in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import os, sys, sysconfig
sys.exit(sys.version_info[:2] != (3, 12)
         or not os.path.exists(os.path.join(sysconfig.get_path("include"), "Python.h")))' 2>/dev/null
    then
      py312=$(command -v "$candidate"); break
    fi
  done
  if [ -z "$py312" ]; then
    echo "error: no CPython 3.12 with its headers (Python.h) here: set PYTHON312=/path/to/python3.12," \
         "or run with TE=0 to prepare stage 1 only" >&2
    exit 2
  fi
  if [ ! -x venv/bin/python ]; then
    say "creating the build environment (CPython 3.12: $py312) in $build/venv"
    "$py312" -m venv venv
  fi
  if ! venv/bin/python -c "import torch, sys; sys.exit(torch.__version__ != '$torch_version+cu130')" 2>/dev/null; then
    say "installing torch $torch_version (CUDA 13.0 build, ~4.5 GB with its CUDA packages)"
    venv/bin/python -m pip install -q --disable-pip-version-check "torch==$torch_version" \
      "setuptools<82" wheel packaging pybind11 ninja numpy einops onnx onnxscript \
      "${wheels[@]:1}"
  fi
  nvidia=$(venv/bin/python -c "import nvidia; print(nvidia.__path__[0])")   # CUDA 13 headers

  # --- the released wheels and the source of the PyTorch extension -----------------------------
  mkdir -p dl
  if [ ! -f "dl/transformer_engine_cu13-$te_version-py3-none-manylinux_2_28_x86_64.whl" ]; then
    say "downloading transformer_engine $te_version and its CUDA 13 core wheel (171 MiB)"
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      "${platforms[@]}" -d dl "transformer_engine==$te_version" "transformer_engine_cu13==$te_version"
  fi
  if [ ! -f "dl/transformer_engine_torch-$te_version.tar.gz" ]; then
    say "downloading the source of transformer_engine_torch $te_version"
    # Its setup.py imports torch, so pip reads its metadata with the build environment's torch.
    venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: \
      --no-build-isolation -d dl "transformer_engine_torch==$te_version"
  fi

  # --- build transformer_engine_torch (C++ only: g++ against torch's and TE's headers) -------
  if ! ls wheelhouse/transformer_engine_torch-"$te_version"-cp312-*.whl > /dev/null 2>&1; then
    cuda_home=
    for d in ${CUDA_HOME:-} /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
      if [ -f "$d/include/cuda_runtime.h" ]; then cuda_home=$d; break; fi
    done
    [ -n "$cuda_home" ] || { echo "error: no CUDA toolkit (include/cuda_runtime.h): set CUDA_HOME" >&2; exit 2; }
    say "building transformer_engine_torch $te_version with $jobs jobs (nice 19; log: $build/build.log)"
    start=$SECONDS
    env PATH="$build/venv/bin:$PATH" CUDA_HOME="$cuda_home" NVTE_FRAMEWORK=pytorch \
      NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_CUDA_ARCHS=90 MAX_JOBS="$jobs" NVTE_BUILD_MAX_JOBS="$jobs" \
      CPATH="$nvidia/cu13/include:$nvidia/cudnn/include:$nvidia/nccl/include${CPATH:+:$CPATH}" \
      nice -n 19 venv/bin/python -m pip wheel -v --disable-pip-version-check --no-deps \
      --no-build-isolation -w wheelhouse "dl/transformer_engine_torch-$te_version.tar.gz" \
      > build.log 2>&1 || { tail -n 40 build.log; echo "error: the build failed (log: $build/build.log)" >&2; exit 1; }
    say "built in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
  fi

  # --- one site folder: the Python code, the pruned core library, the extension ---------------
  say "assembling the site folder (core library cut to sm_90)"
  rm -rf site && mkdir site
  (cd site && unzip -q -o "../dl/transformer_engine-$te_version-py3-none-any.whl" \
     && unzip -q -o "../dl/transformer_engine_cu13-$te_version-py3-none-manylinux_2_28_x86_64.whl" \
     && unzip -q -o ../wheelhouse/transformer_engine_torch-"$te_version"-cp312-*.whl)
  lib=site/transformer_engine/wheel_lib/libtransformer_engine.so
  python3 "$root/tools/gpu/prune_fatbin.py" "$lib" "$lib.sm90"
  mv "$lib.sm90" "$lib"
  say "checking that it imports here (CPU: loads the libraries and resolves every symbol)"
  PYTHONPATH="$build/site" venv/bin/python -c "
import transformer_engine, transformer_engine.pytorch, transformer_engine_torch
print('[prepare] transformer_engine', transformer_engine.__version__, 'imports with its torch extension')"
  say "compressing (xz)"
  tar -C site -cf - . | xz -T"$jobs" -6 > "$bundle"
  # The extension's source too (0.2 MiB): check.sh builds it there if the one built here fails.
  cp "dl/transformer_engine_torch-$te_version.tar.gz" "$kit/te/"
  cd "$root"
fi

# --- manifest and sizes --------------------------------------------------------------------------
(cd "$kit" && find . -type f ! -name SHA256SUMS ! -name VERSIONS | sort | xargs sha256sum > SHA256SUMS)
{
  echo "prepared $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -m)"
  for f in "$kit"/wheels/* "$kit"/te/*; do [ -f "$f" ] && echo "${f#"$kit"/}"; done
} > "$kit/VERSIONS"
size=$(mib "$kit")
tree=$(cd "$root" && git ls-files -z --cached --others --exclude-standard \
       | du -cb --files0-from=- 2>/dev/null | tail -n 1 | awk '{printf "%.1f", $1 / 1048576}' || true)
du -sh "$kit"/wheels "$kit"/te 2>/dev/null || true
say "kit: $size MiB (.gpu-kit), working tree: $tree MiB; one call carries at most 64 MiB"
if awk -v s="$size" -v l="$limit_mib" 'BEGIN {exit !(s > l)}'; then
  echo "error: .gpu-kit is $size MiB, over KIT_LIMIT_MIB=$limit_mib" >&2
  exit 1
fi
say "done: run(command=\"bash tools/gpu/check.sh \$OUT\", carry=[\".gpu-kit\"], timeout_s=360) (docs/gpu.md)"
