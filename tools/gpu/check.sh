#!/usr/bin/env bash
# The GPU check on the lent machine (docs/gpu.md). Here first: bash tools/gpu/prepare.sh.
#
#   run(command="bash tools/gpu/check.sh $OUT", carry=[".gpu-kit"], timeout_s=360)
#   run(command="CHECK_STAGES=tests CHECK_BUDGET_S=270 bash tools/gpu/check.sh $OUT",
#       timeout_s=290)                     # at once, on the same warm machine
#   bash tools/gpu/check.sh --plan         # the caps and their sums, then stop
#
# Stages, in the order the targets need them; every step writes into OUTDIR as it finishes, so
# that a call cut short returns what finished before:
#   setup      (always) versions (nvidia-smi, python3, torch, CUDA, cuDNN, NCCL); the kit's
#              checksums; the carried wheels the machine lacks, installed into a target folder
#              (kept for the next call on a warm machine); `import megatron.core`
#   firstlight examples/quickstart.sh for ONE training step (data, tokenizer, train, convert,
#              generate), bf16, local layers
#   targets    the benchmark rows that carry the targets, each written to its JSON as it
#              finishes: 1.3b at sequence 2048, PreNorm and SpanNorm, bf16 with the local layers
#              (with the logging-step memory), then Transformer Engine (unpacked and imported
#              here) in bf16 and FP8
#   tests      a smoke test of TE's modules; tests/test_gpu.py without TE, then with TE
# Each step runs under `timeout`, capped at its own limit and at what is left of
# CHECK_BUDGET_S. The caps of the first call's stages add up to its budget (340 s inside a
# 360 s call); the tests get what is left, and the second call on the warm machine (the
# installed packages are kept in CHECK_WORK) has theirs. OUTDIR receives 7 files at most (the
# device tool returns 8): summary.txt, setup.log, firstlight.log, targets.log, tests.log,
# bench.json, tables.md.
#
# Uses `python3` from PATH: on the GPU machine the image's /opt/torch/.venv (Python 3.12, torch
# 2.11+cu130), never this project's .venv. Settings (environment):
#   CHECK_STAGES="firstlight targets tests"   which stages after setup
#   CHECK_BUDGET_S=340     seconds for the whole script (the call's timeout_s minus 20)
#   CHECK_PRESETS="1.3b"   benchmark presets (sequence length CHECK_SEQ, default 2048)
#   CHECK_ALLOW_CPU=1      run without a GPU, to rehearse this script: a tiny preset in fp32 at
#                          sequence 128 with 2 timed steps, every cap x CHECK_CAP_SCALE (3),
#                          a 1500 s budget; TE stops after its import, the GPU tests skip
#   CHECK_WORK=/tmp/spannorm-gpu-check   scratch: installed packages, quickstart run, JSON
#   CHECK_FRESH=1          reinstall into CHECK_WORK even if a warm machine kept it
#   CHECK_FORCE_TE_BUILD=1 build TE's torch extension there even if the carried one imports
#                          (to test that fallback; CHECK_BUILD_JOBS, default all cores)
set -uo pipefail

# ------------------------------------------------------------------------------------------------
# The caps, in seconds on the GPU (x CHECK_CAP_SCALE on a CPU rehearsal). docs/gpu.md sets them
# against the session's 15 minutes of device time; `--plan` prints the sums.
declare -A CAP=(
  [versions]=15 [checksums]=10 [install]=25 [imports]=25
  [firstlight]=75
  [bench_local]=60 [te_unpack]=15 [te_import]=25 [bench_te]=90
  [smoke]=20 [tests_local]=85 [tests_te]=85
  [te_build]=240   # the fallback build of TE's extension: only with that much time left
)
SETUP_STEPS=(versions checksums install imports)
STAGE_STEPS_firstlight=(firstlight)
STAGE_STEPS_targets=(bench_local te_unpack te_import bench_te)
STAGE_STEPS_tests=(smoke tests_local tests_te)

plan_sum() {  # the caps of setup and the stages named, summed
  local total=0 name stage
  for name in "${SETUP_STEPS[@]}"; do total=$(( total + CAP[$name] )); done
  for stage in "$@"; do
    local -n steps="STAGE_STEPS_$stage"
    for name in "${steps[@]}"; do total=$(( total + CAP[$name] )); done
  done
  echo "$total"
}

if [ "${1:-}" = --plan ]; then
  first=$(plan_sum firstlight targets); second=$(plan_sum tests)
  echo "setup: $(plan_sum) s; first call (setup firstlight targets): $first s of a 340 s budget;"
  echo "second call (setup tests): $second s of a 270 s budget"
  for name in "${!CAP[@]}"; do echo "  cap $name ${CAP[$name]} s"; done | sort
  [ "$first" -le 340 ] && [ "$second" -le 270 ]
  exit
fi

out=${1:?usage: bash tools/gpu/check.sh OUTDIR | --plan}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kit=${GPU_KIT:-$root/.gpu-kit}
work=${CHECK_WORK:-/tmp/spannorm-gpu-check}
stages=${CHECK_STAGES:-firstlight targets tests}
cpu=${CHECK_ALLOW_CPU:-0}
if [ "$cpu" = 1 ]; then
  budget=${CHECK_BUDGET_S:-1500}; scale=${CHECK_CAP_SCALE:-3}; presets=${CHECK_PRESETS:-tiny}
  seq=${CHECK_SEQ:-128}; local_precision=fp32
  bench_extra=(--warmup 1 --iters 2 --rounds 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  budget=${CHECK_BUDGET_S:-340}; scale=1; presets=${CHECK_PRESETS:-1.3b}
  seq=${CHECK_SEQ:-2048}; local_precision=bf16
  bench_extra=()
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out"/summary.txt "$out"/setup.log "$out"/firstlight.log "$out"/targets.log \
  "$out"/tests.log "$out"/bench.json "$out"/tables.md
mkdir -p "$work"
cd "$root" || exit 2
summary=$out/summary.txt
failed=0
te_ready=0
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

note() { echo "$*" | tee -a "$summary"; }
left() { echo $(( budget - SECONDS )); }

# step NAME CAP_KEY LOG CMD...: run CMD under timeout (its cap, or what is left of the budget,
# if less), its output appended to LOG and shown; one line into summary.txt. Returns CMD's
# status (124 when skipped for want of time).
step() {
  local name=$1 cap=$(( ${CAP[$2]} * scale )) log=$3; shift 3
  local limit; limit=$(left)
  [ "$cap" -lt "$limit" ] && limit=$cap
  if [ "$limit" -lt 10 ]; then
    note "  $name: SKIPPED (budget spent: $(left) s left)"
    return 124
  fi
  echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)" >> "$log"
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS rc
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$(( SECONDS - start ))
  case $rc in
    0) note "  $name: ok (${took}s)" ;;
    124|137) note "  $name: TIMED OUT after ${took}s (limit ${limit}s)" ;;
    *) note "  $name: FAILED, exit $rc (${took}s; see $(basename "$log"))" ;;
  esac
  return "$rc"
}

# bench LABEL PRESET IMPL PRECISIONS CAP_KEY LOG [EXTRA...]: one tools/benchmark.py run. It
# rewrites its own JSON after every row, so even a run cut short adds what it measured to
# OUTDIR/bench.json (key "LABEL PRESET") and its rows to tables.md.
bench() {
  local label=$1 preset=$2 impl=$3 precisions=$4 cap=$5 log=$6; shift 6
  local tmp=$work/bench-$label-$preset.json
  rm -f "$tmp"
  # shellcheck disable=SC2086
  step "benchmark $preset ($impl, $precisions)" "$cap" "$log" \
    python3 tools/benchmark.py --preset "$preset" --seq-length "$seq" \
      --placements prenorm spannorm --precisions $precisions --transformer-impl "$impl" \
      ${bench_extra[@]+"${bench_extra[@]}"} "$@" --output "$tmp"
  local rc=$?
  [ -f "$tmp" ] && python3 - "$tmp" "$label $preset" "$out/bench.json" >> "$out/tables.md" <<'PY'
import json, os, sys
src, key, dest = sys.argv[1:4]
data = json.load(open(src))
merged = json.load(open(dest)) if os.path.exists(dest) else {}
merged[key] = data
with open(dest + ".tmp", "w") as f:
    json.dump(merged, f, indent=1)
os.replace(dest + ".tmp", dest)
env = data["environment"]
print(f"\n## {key}, sequence {data['args']['seq_length']}: {env['device']}, torch "
      f"{env['torch']}, megatron-core {env['megatron_core']}, TE {env['transformer_engine']}\n")
print("| precision | placement | layers | step (ms) | tokens/s | vs PreNorm | MFU | peak MiB "
      "| mem vs PreNorm | log step adds MiB | plain step adds MiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
mib = lambda b: "n/a" if b is None else "{:,.1f}".format(b / 2**20)
for r in data["results"]:
    mfu, ratio = r["mfu"], r["memory_vs_prenorm"]
    cells = [r["precision"], r["placement"], r.get("transformer_impl", "?"),
             "%.1f" % (r["step_seconds"] * 1e3),
             "{:,.0f}".format(r["tokens_per_second"]),
             "n/a" if r["tokens_per_second_vs_prenorm"] is None
             else "%.3f" % r["tokens_per_second_vs_prenorm"],
             "n/a" if mfu is None else "%.1f%%" % (100 * mfu),
             mib(r["peak_memory_bytes"] or None), "n/a" if ratio is None else "%.3f" % ratio,
             mib(r.get("log_step_memory_bytes")), mib(r.get("plain_step_memory_bytes"))]
    print("| " + " | ".join(cells) + " |")
PY
  return "$rc"
}

# ------------------------------------------------------------------------------------------------
versions_probe() {
  echo "python3: $(command -v python3) ($(python3 --version 2>&1))"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 2 | tr '\n' ' ')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv 2>&1 || true
  python3 - <<'PY'
import os, sys
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
elif os.environ.get("cpu") != "1":
    sys.exit("error: torch.cuda.is_available() is False although nvidia-smi sees a GPU")
PY
}

setup() {
  local log=$out/setup.log
  note "setup: versions and install ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -n), stages: $stages)"
  if [ "$cpu" != 1 ] && ! nvidia-smi -L > /dev/null 2>&1; then
    note "  FAILED: no GPU (nvidia-smi finds none). This check runs on the lent GPU machine;" \
         "CHECK_ALLOW_CPU=1 rehearses it on a CPU"
    return 3
  fi
  export cpu
  export -f versions_probe
  step "versions" versions "$log" bash -c versions_probe || return 3
  if [ ! -d "$kit/wheels" ]; then
    note "  FAILED: no $kit/wheels: run 'bash tools/gpu/prepare.sh' where pip works, and carry .gpu-kit"
    return 2
  fi
  grep -h . "$kit/VERSIONS" >> "$log" 2>/dev/null
  step "kit checksums" checksums "$log" bash -c "cd '$kit' && sha256sum -c --quiet SHA256SUMS" \
    || return 2
  # The wheels go into a folder of their own on PYTHONPATH, which comes before the machine's
  # site-packages: only distributions the machine lacks are installed there, so nothing the
  # machine has is shadowed. A warm machine keeps the folder: the next call reuses it.
  local stamp=$work/site/.kit-sha256
  if [ "${CHECK_FRESH:-0}" != 1 ] && [ -f "$stamp" ] && cmp -s "$stamp" "$kit/SHA256SUMS"; then
    note "  install: kept from the last call on this machine ($work/site)"
  else
    rm -rf "$work/site"
    step "install the carried wheels the machine lacks" install "$log" python3 - "$kit/wheels" \
      "$work/site" <<'PY' || return 2
import glob, importlib.metadata, os, subprocess, sys
wheels, target = sys.argv[1:3]
wanted = []
for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    name = os.path.basename(wheel).split("-")[0]
    try:
        print(f"{name}: the machine has {importlib.metadata.version(name)}; not installed")
    except importlib.metadata.PackageNotFoundError:
        wanted.append(wheel)
        print(f"{name}: installed from {os.path.basename(wheel)}")
os.makedirs(target, exist_ok=True)
if wanted:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--target", target, *wanted], check=True)
PY
    cp "$kit/SHA256SUMS" "$stamp"
  fi
  export PYTHONPATH="$root:$work/site"
  step "imports" imports "$log" python3 -c "
import importlib
import megatron.core, spannorm_megatron
print('megatron-core', megatron.core.__version__, 'from', megatron.core.__file__)
missing = []
for name in ['numpy', 'yaml', 'psutil', 'sentencepiece', 'tensorboard', 'pytest', 'einops',
             'transformers', 'safetensors', 'typing_extensions']:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, '__version__', ''), 'from', module.__file__)
    except ImportError as e:
        missing.append(f'{name} ({e})')
assert not missing, 'missing on this machine: ' + ', '.join(missing)
" || return 2
}

# ------------------------------------------------------------------------------------------------
firstlight_quickstart() {
  # The README's main command, examples/quickstart.sh, for one training step on one rank, with
  # the image's python3 standing in for the .venv that tools/setup_env.sh would create (it
  # cannot install anything there): a folder whose bin/python and bin/torchrun call python3,
  # and setup_env.sh's stamp, so that it installs nothing.
  local venv=$work/qs-venv
  mkdir -p "$venv/bin"
  printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$venv/bin/python"
  printf '#!/bin/sh\nexec %s -m torch.distributed.run "$@"\n' "$(command -v python3)" \
    > "$venv/bin/torchrun"
  chmod +x "$venv/bin/python" "$venv/bin/torchrun"
  cat tools/requirements-dev.txt setup.py | sha256sum | cut -d' ' -f1 > "$venv/.spannorm-installed"
  local flags=(--transformer-impl local --train-iters 1 --lr-warmup-iters 0 --eval-interval 1
               --eval-iters 1 --save-interval 1 --log-interval 1)
  [ "$cpu" = 1 ] || flags+=(--bf16)   # bf16 on CPU: slow, and not the point
  rm -rf "$work/quickstart/checkpoints" "$work/quickstart/hf"
  SPANNORM_VENV=$venv RUN_DIR=$work/quickstart NPROC=1 bash examples/quickstart.sh "${flags[@]}"
}

firstlight() {
  local log=$out/firstlight.log
  note "firstlight: one quickstart step ($(left) s left)"
  export work cpu
  export -f firstlight_quickstart
  step "quickstart, one step (bf16, local layers)" firstlight "$log" \
    bash -c firstlight_quickstart || failed=1
}

# ------------------------------------------------------------------------------------------------
te_setup() {
  # Transformer Engine from the kit: unpack, import; if the extension built elsewhere does not
  # load here, build it here from the carried source (only with CAP[te_build] left), import.
  local log=$1 bundle
  bundle=$(ls "$kit"/te/transformer_engine-*.tar.xz 2>/dev/null | head -n 1)
  if [ -z "$bundle" ]; then
    note "  Transformer Engine: SKIPPED: the kit has none (prepare.sh ran with TE=0)"
    return 1
  fi
  mkdir -p "$work/te-site"
  if [ ! -d "$work/te-site/transformer_engine" ]; then
    step "unpack Transformer Engine ($(basename "$bundle"))" te_unpack "$log" \
      tar -C "$work/te-site" -xJf "$bundle" || return 1
  fi
  export PYTHONPATH="$root:$work/te-site:$work/site"
  # Must fail when transformer_engine.pytorch does not import (a skipped test proves nothing).
  # On a CPU this still loads every library and resolves every symbol.
  local import_te="import transformer_engine, transformer_engine.pytorch, transformer_engine_torch
print('transformer_engine', transformer_engine.__version__, 'imports from', transformer_engine.__file__)"
  if [ "${CHECK_FORCE_TE_BUILD:-0}" != 1 ] && \
     step "import transformer_engine.pytorch" te_import "$log" python3 -c "$import_te"; then
    te_ready=1
    return 0
  fi
  local sdist
  sdist=$(ls "$kit"/te/transformer_engine_torch-*.tar.gz 2>/dev/null | head -n 1)
  if [ -z "$sdist" ] || [ "$(left)" -lt $(( CAP[te_build] * scale )) ]; then
    note "  fallback build of TE's extension: not tried ($(left) s left, needs $(( CAP[te_build] * scale )))"
    return 1
  fi
  step "fallback: build transformer_engine_torch here" te_build "$log" bash -c "
    nvidia=\$(python3 -c 'import nvidia, os; print(nvidia.__path__[0])') &&
    for d in \${CUDA_HOME:-} /usr/local/cuda \$(dirname \$(dirname \$(readlink -f \$(command -v nvcc)))); do
      [ -f \$d/include/cuda_runtime.h ] && export CUDA_HOME=\$d && break; done &&
    export CPATH=\$nvidia/cu13/include:\$nvidia/cudnn/include:\$nvidia/nccl/include &&
    NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=${CHECK_BUILD_JOBS:-\$(nproc)} \
      python3 -m pip wheel -q --no-index --no-deps --no-build-isolation -w '$work/te-wheel' '$sdist' &&
    cd '$work/te-site' &&
    python3 -m zipfile -e '$work'/te-wheel/transformer_engine_torch-*.whl ." || return 1
  step "import transformer_engine.pytorch (extension built here)" te_import "$log" \
    python3 -c "$import_te" || return 1
  te_ready=1
}

targets() {
  local log=$out/targets.log preset
  note "targets: benchmark rows ($(left) s left)"
  for preset in $presets; do
    bench local "$preset" local "$local_precision" bench_local "$log" --log-step-memory \
      || failed=1
  done
  te_setup "$log" || { failed=1; return; }
  if [ "$cpu" = 1 ] && ! nvidia-smi -L > /dev/null 2>&1; then
    note "  the TE benchmark needs the GPU: not run"
    return
  fi
  for preset in $presets; do
    bench te "$preset" transformer_engine "bf16 fp8" bench_te "$log" || failed=1
  done
}

# ------------------------------------------------------------------------------------------------
tests() {
  local log=$out/tests.log
  note "tests ($(left) s left)"
  if [ "$te_ready" = 0 ] && [ -d "$work/te-site/transformer_engine" ]; then
    export PYTHONPATH="$root:$work/te-site:$work/site"   # unpacked by an earlier call
    timeout 60 python3 -c "import transformer_engine.pytorch" > /dev/null 2>&1 && te_ready=1
  elif [ "$te_ready" = 0 ]; then
    te_setup "$log" || true
  fi
  local gpu=1
  [ "$cpu" = 1 ] && ! nvidia-smi -L > /dev/null 2>&1 && gpu=0
  if [ "$te_ready" = 1 ] && [ "$gpu" = 1 ]; then
    # TE's modules against plain torch on the same weights; FP8 against bf16.
    step "smoke test (te.Linear, te.LayerNormLinear bf16; FP8 delayed and current)" smoke \
      "$log" python3 - <<'PY' || failed=1
import torch
import transformer_engine.pytorch as te
from transformer_engine.common import recipe

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
  fi
  # test_gpu.py's cases that need no Transformer Engine (names without transformer_engine or
  # fp8), then the others. Exit 5 (none selected) is reported, not counted as a failure; on a
  # CPU every case skips.
  step "pytest tests/test_gpu.py -k 'not transformer_engine and not fp8'" tests_local "$log" \
    bash -c '
    python3 -m pytest tests/test_gpu.py -k "not transformer_engine and not fp8" -q -rs \
      -p no:cacheprovider
    rc=$?; [ "$rc" = 5 ] && { echo "pytest: no case selected"; exit 0; }; exit "$rc"' || failed=1
  if [ "$te_ready" = 1 ]; then
    # SPANNORM_EXPECT_TE=1: test_gpu.py fails (instead of skipping) where TE does not work.
    step "pytest tests/test_gpu.py -k 'transformer_engine or fp8'" tests_te "$log" \
      env SPANNORM_EXPECT_TE=$gpu python3 -m pytest tests/test_gpu.py \
        -k "transformer_engine or fp8" -q -rs -p no:cacheprovider || failed=1
  fi
}

# ------------------------------------------------------------------------------------------------
: > "$summary"
setup
rc=$?
[ "$rc" = 0 ] || { note "setup failed: stopping (${SECONDS}s)"; exit "$rc"; }
for stage in $stages; do
  case $stage in
    firstlight|targets|tests) "$stage" ;;
    *) note "unknown stage '$stage' (CHECK_STAGES takes firstlight, targets, tests)"; failed=1 ;;
  esac
done
if [ -f "$out/bench.json" ]; then
  python3 tools/gpu/targets.py "$out/bench.json" 2>> "$out/setup.log" | tee -a "$summary"
fi
note "done in ${SECONDS}s of ${budget}s: $([ "$failed" = 0 ] && echo "every step passed" \
  || echo "some steps FAILED or were cut (above)")"
exit "$failed"
