#!/usr/bin/env bash
# The whole GPU check in ONE device call (docs/gpu.md). Here first: bash tools/gpu/prepare.sh.
#
#   run(command="bash tools/gpu/check.sh $OUT", carry=[".gpu-kit"], timeout_s=480)
#
# Stages, each writing its results into OUTDIR as each step finishes, so that a call cut short
# still returns what finished before:
#   0  versions (nvidia-smi, python3, torch, CUDA, cuDNN, NCCL); the kit's checksums; carried
#      wheels installed into a target folder put on PYTHONPATH; `import megatron.core`
#   1  without Transformer Engine: the quickstart on one GPU in bf16 with the local specs;
#      tests/test_gpu.py's non-TE cases; tools/benchmark.py at 125m and 1.3b (sequence 2048),
#      prenorm vs spannorm, bf16, local specs
#   2  with Transformer Engine (only when the kit has it): import + a smoke test of TE's modules
#      (bf16 and FP8); test_gpu.py's TE and FP8 cases; the benchmarks with TE, bf16 and FP8
# Every step runs under `timeout`, capped at its own limit and at what is left of CHECK_BUDGET_S
# (default 460 s, inside the call's 480), so stages 0 and 1 finish first (about 4 minutes when
# all goes well) and stage 2 gets the rest. OUTDIR receives 7 files at most (the device tool
# returns 8): summary.txt, stage0.log, stage1.log, stage2.log, bench-local.json, bench-te.json,
# tables.md.
#
# Uses `python3` from PATH: on the GPU machine the image's /opt/torch/.venv (Python 3.12, torch
# 2.11+cu130), never this project's .venv. Settings (environment):
#   CHECK_STAGES="1 2"     which of stages 1 and 2 to run (stage 0 always runs)
#   CHECK_BUDGET_S=460     seconds for the whole script
#   CHECK_PRESETS="125m 1.3b"  benchmark presets (sequence length CHECK_SEQ, default 2048)
#   CHECK_ALLOW_CPU=1      run without a GPU, to test this script's plumbing: a 4-step
#                          quickstart, the tiny preset in fp32 at sequence 128 with 2 timed
#                          steps, every limit x3 (CHECK_CAP_SCALE) and a 900 s budget; stage 2
#                          stops after importing TE
#   CHECK_WORK=/tmp/spannorm-gpu-check   scratch: installed packages, quickstart run, JSON
#   CHECK_FORCE_TE_BUILD=1 build TE's torch extension there even if the carried one imports
#                          (to test that fallback; CHECK_BUILD_JOBS, default all cores)
set -uo pipefail
out=${1:?usage: bash tools/gpu/check.sh OUTDIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kit=${GPU_KIT:-$root/.gpu-kit}
work=${CHECK_WORK:-/tmp/spannorm-gpu-check}
stages=${CHECK_STAGES:-1 2}
cpu=${CHECK_ALLOW_CPU:-0}
if [ "$cpu" = 1 ]; then
  budget=${CHECK_BUDGET_S:-900}; scale=${CHECK_CAP_SCALE:-3}; presets=${CHECK_PRESETS:-tiny}
  seq=${CHECK_SEQ:-128}; qs_iters=${CHECK_QUICKSTART_ITERS:-4}; local_precision=fp32
  bench_extra=(--warmup 1 --iters 2 --rounds 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  budget=${CHECK_BUDGET_S:-460}; scale=1; presets=${CHECK_PRESETS:-125m 1.3b}
  seq=${CHECK_SEQ:-2048}; qs_iters=${CHECK_QUICKSTART_ITERS:-}; local_precision=bf16
  bench_extra=()
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/summary.txt "$out"/stage[012].log "$out"/bench-local.json "$out"/bench-te.json \
  "$out"/tables.md
rm -rf "$work" && mkdir -p "$work"
cd "$root" || exit 2
summary=$out/summary.txt
failed=0
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

note() { echo "$*" | tee -a "$summary"; }
left() { echo $(( budget - SECONDS )); }

# step NAME CAP LOG CMD...: run CMD under timeout (CAP, or what is left of the budget, if less),
# its output appended to LOG and shown; one line into summary.txt. Returns CMD's status.
step() {
  local name=$1 cap=$(( $2 * scale )) log=$3; shift 3
  local limit; limit=$(left)
  [ "$cap" -lt "$limit" ] && limit=$cap
  if [ "$limit" -lt 15 ]; then
    note "  $name: SKIPPED (budget spent: $(left) s left)"
    return 124
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" >> "$log"
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS rc
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$(( SECONDS - start ))
  case $rc in
    0) note "  $name: ok (${took}s)" ;;
    124|137) note "  $name: TIMED OUT after ${took}s (limit ${limit}s)" ;;
    *) note "  $name: FAILED, exit $rc (${took}s; see $(basename "$log"))" ;;
  esac
  return "$rc"
}

# merge_json KEY SRC DEST: DEST[KEY] = SRC (a JSON object), DEST created if missing.
merge_json() {
  python3 - "$@" <<'PY'
import json, os, sys
key, src, dest = sys.argv[1:4]
merged = json.load(open(dest)) if os.path.exists(dest) else {}
merged[key] = json.load(open(src))
with open(dest + ".tmp", "w") as f:
    json.dump(merged, f, indent=1)
os.replace(dest + ".tmp", dest)
PY
}

# bench LABEL PRESET IMPL PRECISIONS CAP LOG JSON: one tools/benchmark.py run, merged into JSON,
# its table appended to tables.md.
bench() {
  local label=$1 preset=$2 impl=$3 precisions=$4 cap=$5 log=$6 json=$7
  local tmp=$work/bench-$label-$preset.json
  # shellcheck disable=SC2086
  step "benchmark $preset ($impl, $precisions)" "$cap" "$log" \
    python3 tools/benchmark.py --preset "$preset" --seq-length "$seq" \
      --placements prenorm spannorm --precisions $precisions --transformer-impl "$impl" \
      ${bench_extra[@]+"${bench_extra[@]}"} --output "$tmp"
  local rc=$?
  if [ -f "$tmp" ]; then
    merge_json "$preset" "$tmp" "$json"
    python3 - "$tmp" "$label $preset" >> "$out/tables.md" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
env = data["environment"]
print(f"\n## {sys.argv[2]}, sequence {data['args']['seq_length']}: {env['device']}, torch "
      f"{env['torch']}, megatron-core {env['megatron_core']}, TE {env['transformer_engine']}\n")
print("| precision | placement | layers | step (ms) | tokens/s | vs PreNorm | MFU | peak MiB "
      "| mem vs PreNorm |")
print("|---|---|---|---|---|---|---|---|---|")
for r in data["results"]:
    mfu, mem, ratio = r["mfu"], r["peak_memory_bytes"], r["memory_vs_prenorm"]
    cells = [r["precision"], r["placement"], r.get("transformer_impl", "?"),
             "%.1f" % (r["step_seconds"] * 1e3),
             "{:,.0f}".format(r["tokens_per_second"]), "%.3f" % r["tokens_per_second_vs_prenorm"],
             "n/a" if mfu is None else "%.1f%%" % (100 * mfu),
             "n/a" if not mem else "{:,.0f}".format(mem / 2**20),
             "n/a" if ratio is None else "%.3f" % ratio]
    print("| " + " | ".join(cells) + " |")
PY
  fi
  return "$rc"
}

# ------------------------------------------------------------------------------------------------
stage0() {
  local log=$out/stage0.log
  note "stage 0: versions and install ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n))"
  {
    echo "python3: $(command -v python3) ($(python3 --version 2>&1))"
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | tr '\n' ' ')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
      --format=csv 2>&1 || true
  } 2>&1 | tee -a "$log"
  if [ "$cpu" != 1 ] && ! nvidia-smi -L > /dev/null 2>&1; then
    note "  FAILED: no GPU (nvidia-smi finds none). This check runs on the lent GPU machine;" \
         "CHECK_ALLOW_CPU=1 tests its plumbing on a CPU"
    return 3
  fi
  if ! python3 - 2>&1 <<'PY' | tee -a "$log"
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"error: python3 ({sys.executable}) has no torch: {e}")
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN",
      torch.backends.cudnn.version(), "| NCCL",
      ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)")
PY
  then
    note "  FAILED: python3 cannot import torch (see stage0.log)"
    return 3
  fi
  if [ "$cpu" != 1 ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    note "  FAILED: no GPU: torch.cuda.is_available() is False although nvidia-smi sees one"
    return 3
  fi
  if [ ! -d "$kit/wheels" ]; then
    note "  FAILED: no $kit/wheels: run 'bash tools/gpu/prepare.sh' where pip works, and carry .gpu-kit"
    return 2
  fi
  grep -h . "$kit/VERSIONS" >> "$log" 2>/dev/null
  step "kit checksums" 60 "$log" bash -c "cd '$kit' && sha256sum -c --quiet SHA256SUMS" || return 2
  step "install carried wheels" 90 "$log" python3 -m pip install -q --no-index --no-deps \
    --no-compile --target "$work/site" "$kit"/wheels/*.whl || return 2
  export PYTHONPATH="$root:$work/site${PYTHONPATH:+:$PYTHONPATH}"
  step "imports" 60 "$log" python3 -c "
import importlib
import megatron.core, spannorm_megatron
print('megatron-core', megatron.core.__version__, 'from', megatron.core.__file__)
missing = []
for name in ['numpy', 'yaml', 'psutil', 'sentencepiece', 'tensorboard', 'pytest', 'einops',
             'transformers', 'safetensors']:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, '__version__', ''))
    except ImportError as e:
        missing.append(f'{name} ({e})')
assert not missing, 'missing on this machine: ' + ', '.join(missing)
" || return 2
}

# ------------------------------------------------------------------------------------------------
quickstart() {
  # The README's main command, examples/quickstart.sh, with the image's python3 standing in for
  # the .venv that tools/setup_env.sh would create (it cannot install anything here): a folder
  # whose bin/python and bin/torchrun call python3, and setup_env.sh's stamp, so that it
  # installs nothing. Extra flags go to spannorm-train: bf16, local specs.
  local venv=$work/qs-venv
  mkdir -p "$venv/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$venv/bin/python"
  printf '#!/bin/sh\nexec %s -m torch.distributed.run "$@"\n' "$(command -v python3)" \
    > "$venv/bin/torchrun"
  chmod +x "$venv/bin/python" "$venv/bin/torchrun"
  cat tools/requirements-dev.txt setup.py | sha256sum | cut -d' ' -f1 > "$venv/.spannorm-installed"
  local flags=(--bf16 --transformer-impl local)
  [ "$cpu" = 1 ] && flags=(--transformer-impl local)   # bf16 on CPU: slow, and not the point
  [ -n "$qs_iters" ] && flags+=(--train-iters "$qs_iters" --eval-interval "$qs_iters"
                                --save-interval "$qs_iters" --lr-warmup-iters 2 --log-interval 5)
  SPANNORM_VENV=$venv RUN_DIR=$work/quickstart NPROC=1 bash examples/quickstart.sh "${flags[@]}"
}

quickstart_direct() {
  # The same steps without examples/quickstart.sh, on one rank (if the script itself failed).
  local run=$work/quickstart-direct
  mkdir -p "$run" && ln -sfn "$work/quickstart/data" "$run/data"   # what the script prepared
  local flags=(--bf16 --transformer-impl local)
  [ "$cpu" = 1 ] && flags=(--transformer-impl local)
  [ -n "$qs_iters" ] && flags+=(--train-iters "$qs_iters" --eval-interval "$qs_iters"
                                --save-interval "$qs_iters" --lr-warmup-iters 2 --log-interval 5)
  bash tools/prepare_embedded_data.sh "$run/data" python3 &&
  python3 -m spannorm_megatron.train --config examples/configs/quickstart.yaml \
    --data-path "$run/data/stdlib_text_document" --tokenizer-model "$run/data/tokenizer.model" \
    --save "$run/checkpoints" --tensorboard-dir "$run/tensorboard" "${flags[@]}" &&
  python3 tools/convert_to_hf.py --load "$run/checkpoints" --save "$run/hf" \
    --tokenizer-model "$run/data/tokenizer.model" --overwrite &&
  python3 tools/generate.py --load "$run/hf" --prompt "def read_config(path):" \
    --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 0
}

stage1() {
  local log=$out/stage1.log
  note "stage 1: no Transformer Engine, local specs ($(left) s left)"
  export work cpu qs_iters
  export -f quickstart quickstart_direct
  step "quickstart (examples/quickstart.sh, bf16, local specs)" 120 "$log" bash -c quickstart
  case $? in
    0) ;;
    124|137) failed=1 ;;   # too slow: the same steps again would be as slow
    *) failed=1            # e.g. two ranks on one GPU: the same steps on one rank
       step "quickstart steps on one rank (bf16, local specs)" 90 "$log" bash -c quickstart_direct ;;
  esac
  # test_gpu.py's cases that need no Transformer Engine: those whose names mention neither
  # transformer_engine nor fp8 (stage 2 runs exactly the others). Exit 5 (none selected) is
  # reported, not counted as a failure.
  step "pytest tests/test_gpu.py -k 'not transformer_engine and not fp8'" 120 "$log" bash -c '
    python3 -m pytest tests/test_gpu.py -k "not transformer_engine and not fp8" -q -rs \
      -p no:cacheprovider
    rc=$?
    if [ "$rc" = 5 ]; then echo "pytest: no test_gpu.py case without Transformer Engine is selected"; exit 0; fi
    exit "$rc"' || failed=1
  local preset cap
  for preset in $presets; do
    cap=75; [ "$preset" = 1.3b ] && cap=120
    bench local "$preset" local "$local_precision" "$cap" "$log" "$out/bench-local.json" \
      || failed=1
  done
}

# ------------------------------------------------------------------------------------------------
stage2() {
  local log=$out/stage2.log
  local bundle
  bundle=$(ls "$kit"/te/transformer_engine-*.tar.xz 2>/dev/null | head -n 1)
  if [ -z "$bundle" ]; then
    note "stage 2: SKIPPED: the kit has no Transformer Engine (prepare.sh ran with TE=0)"
    return 0
  fi
  note "stage 2: Transformer Engine from $(basename "$bundle") ($(left) s left)"
  mkdir -p "$work/te-site"
  step "unpack Transformer Engine" 60 "$log" tar -C "$work/te-site" -xJf "$bundle" || return 1
  export PYTHONPATH="$root:$work/te-site:$work/site"
  # Must fail when transformer_engine.pytorch does not import (a skipped test file proves
  # nothing). On a CPU this still loads every library and resolves every symbol.
  local import_te="import transformer_engine, transformer_engine.pytorch, transformer_engine_torch
print('transformer_engine', transformer_engine.__version__, 'imports from', transformer_engine.__file__)"
  local gpu=1
  [ "$cpu" = 1 ] && ! nvidia-smi -L > /dev/null 2>&1 && gpu=0
  local force=${CHECK_FORCE_TE_BUILD:-0}
  if [ "$force" = 1 ] || ! step "import transformer_engine.pytorch" 60 "$log" python3 -c "$import_te"
  then
    [ "$gpu" = 1 ] || [ "$force" = 1 ] || return 1
    # The extension built elsewhere does not load here: build it here from the carried source
    # (C++ only, 28 files on 16 cores), then try again.
    local sdist
    sdist=$(ls "$kit"/te/transformer_engine_torch-*.tar.gz 2>/dev/null | head -n 1)
    [ -n "$sdist" ] || return 1
    step "fallback: build transformer_engine_torch here" 240 "$log" bash -c "
      nvidia=\$(python3 -c 'import nvidia, os; print(nvidia.__path__[0])') &&
      for d in \${CUDA_HOME:-} /usr/local/cuda \$(dirname \$(dirname \$(readlink -f \$(command -v nvcc)))); do
        [ -f \$d/include/cuda_runtime.h ] && export CUDA_HOME=\$d && break; done &&
      export CPATH=\$nvidia/cu13/include:\$nvidia/cudnn/include:\$nvidia/nccl/include &&
      NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=${CHECK_BUILD_JOBS:-\$(nproc)} \
        python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w '$work/te-wheel' '$sdist' &&
      cd '$work/te-site' &&
      python3 -m zipfile -e '$work'/te-wheel/transformer_engine_torch-*.whl ." || return 1
    step "import transformer_engine.pytorch (extension built here)" 60 "$log" \
      python3 -c "$import_te" || return 1
  fi
  if [ "$gpu" = 0 ]; then
    note "  the rest of stage 2 needs the GPU: stopped here"
    return 0
  fi
  # The smoke test compares TE's modules with plain torch on the same weights.
  step "smoke test (te.Linear, te.LayerNormLinear bf16; FP8 delayed and current)" 90 \
    "$log" python3 - <<'PY' || return 1
import torch
import transformer_engine, transformer_engine_torch
import transformer_engine.pytorch as te
from transformer_engine.common import recipe

print("transformer_engine", transformer_engine.__version__, "from", transformer_engine.__file__)
torch.manual_seed(0)
x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())

linear = te.Linear(1024, 2048, params_dtype=torch.bfloat16)
ref = x @ linear.weight.t() + linear.bias
y = linear(x)
y.float().sum().backward()
print(f"te.Linear bf16: relative error {rel(y, ref):.2e}")
assert rel(y, ref) < 1e-2 and torch.isfinite(x.grad).all()

lnl = te.LayerNormLinear(1024, 1024, normalization="RMSNorm", params_dtype=torch.bfloat16)
normed = torch.nn.functional.rms_norm(x.float(), (1024,), lnl.layer_norm_weight.float(), lnl.eps)
ref = normed.to(torch.bfloat16) @ lnl.weight.t() + lnl.bias
print(f"te.LayerNormLinear (RMSNorm) bf16: relative error {rel(lnl(x), ref):.2e}")
assert rel(lnl(x), ref) < 2e-2

for name, fp8_recipe in [("delayed", recipe.DelayedScaling()),
                         ("current (tensorwise)", recipe.Float8CurrentScaling())]:
    for _ in range(3):  # delayed scaling takes its scales from the steps before
        with te.autocast(enabled=True, recipe=fp8_recipe):
            y8 = linear(x)
        y8.float().sum().backward()
    print(f"FP8 {name}: relative error vs bf16 {rel(y8, y):.2e}")
    assert torch.isfinite(y8).all() and rel(y8, y) < 0.15
print("smoke test passed")
PY
  # SPANNORM_EXPECT_TE=1: test_gpu.py fails (instead of skipping) where TE does not work.
  step "pytest tests/test_gpu.py -k 'transformer_engine or fp8'" 150 "$log" \
    env SPANNORM_EXPECT_TE=1 python3 -m pytest tests/test_gpu.py -k "transformer_engine or fp8" \
      -q -rs -p no:cacheprovider || failed=1
  local preset cap first=() rest=()
  for preset in $presets; do   # 1.3b first: the MFU target
    if [ "$preset" = 1.3b ]; then first+=("$preset"); else rest+=("$preset"); fi
  done
  for preset in ${first[@]+"${first[@]}"} ${rest[@]+"${rest[@]}"}; do
    cap=75; [ "$preset" = 1.3b ] && cap=100
    bench te "$preset" transformer_engine "bf16 fp8" "$cap" "$log" "$out/bench-te.json" || failed=1
  done
}

# ------------------------------------------------------------------------------------------------
: > "$summary"
stage0
rc=$?
[ "$rc" = 0 ] || { note "stage 0 failed: stopping (${SECONDS}s)"; exit "$rc"; }
case " $stages " in *" 1 "*) stage1 ;; esac
case " $stages " in *" 2 "*) stage2 || failed=1 ;; esac
if ls "$out"/bench-*.json > /dev/null 2>&1; then
  python3 tools/gpu/targets.py "$out"/bench-*.json 2>> "$out/stage0.log" | tee -a "$summary"
fi
note "done in ${SECONDS}s: $([ "$failed" = 0 ] && echo "every step passed" || echo "some steps FAILED (above)")"
exit "$failed"
