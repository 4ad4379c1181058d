#!/usr/bin/env bash
# Depth sweep: train every norm placement at several depths (up to 128 layers) with the same
# data, tokens, width and LR schedule, then report final losses, divergence, first loss spike
# and gradient norms (report.md / report.csv / report.json / loss_curves.png).
#
#   bash examples/depth_sweep/run.sh [extra spannorm-train flags]
#
# Environment (defaults in brackets):
#   PLACEMENTS   placements to train      [prenorm postnorm spannorm deepnorm perinorm spannorm_clean]
#   DEPTHS       layer counts             [8 32 128]
#   SCALE_INITS  output-projection inits  [default] (= each placement's own; e.g. "default none")
#   NPROC        ranks per run (torchrun) [1]   (2 = data parallel on 2 cores/GPUs)
#   CONFIG       spannorm-train YAML      [examples/depth_sweep/config.yaml]
#   SWEEP_DIR    output directory         [runs/depth_sweep]
#   DATA_DIR     prepared data            [$SWEEP_DIR/data]
#   RERUN=1      train runs again that already finished (default: finished runs are kept)
#   VENV         Python environment to use as it is [tools/setup_env.sh's .venv]
#
# Data is prepared as examples/quickstart.sh does (embedded corpus -> SentencePiece tokenizer
# -> Megatron indexed dataset); each step is skipped when its output exists. Extra flags go to
# spannorm-train unchanged (dense or MoE, parallel layout, precision), e.g. on 8 GPUs:
#   NPROC=8 bash examples/depth_sweep/run.sh --num-experts 8 --expert-model-parallel-size 8 --bf16
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# VENV: use this environment as it is (default: tools/setup_env.sh creates/refreshes .venv).
venv=${VENV:-$(bash "$root/tools/setup_env.sh" | tail -n 1)}
python="$venv/bin/python"
cd "$root"

PLACEMENTS=${PLACEMENTS:-"prenorm postnorm spannorm deepnorm perinorm spannorm_clean"}
DEPTHS=${DEPTHS:-"8 32 128"}
SCALE_INITS=${SCALE_INITS:-"default"}
NPROC=${NPROC:-1}
CONFIG=${CONFIG:-$root/examples/depth_sweep/config.yaml}
SWEEP_DIR=${SWEEP_DIR:-$root/runs/depth_sweep}
DATA_DIR=${DATA_DIR:-$SWEEP_DIR/data}
mkdir -p "$SWEEP_DIR/runs" "$DATA_DIR"

bash "$root/tools/prepare_embedded_data.sh" "$DATA_DIR" "$python" || exit 1

# Check the shared flags once, before any run (a bad flag would fail every run the same way).
train_iters=$("$python" - --config "$CONFIG" "$@" <<'PY'
import sys
from spannorm_megatron.errors import UserError
from spannorm_megatron.training.arguments import parse_args
try:
    print(parse_args(sys.argv[1:] + ["--num-layers", "2"]).training.train_iters)
except UserError as error:
    sys.exit(f"error: {error}")
PY
) || exit 2
sweep_start=$(date +%s)
{
  echo "config=$CONFIG"
  echo "extra_flags=$*"
  echo "placements=$PLACEMENTS"
  echo "depths=$DEPTHS"
  echo "scale_inits=$SCALE_INITS"
  echo "nproc=$NPROC"
  echo "train_iters=$train_iters"
  echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host_cpus=$(nproc)"
} > "$SWEEP_DIR/sweep.txt"

total=0
for depth in $DEPTHS; do for placement in $PLACEMENTS; do for init in $SCALE_INITS; do
  total=$((total + 1))
done; done; done

n=0
for depth in $DEPTHS; do
  for placement in $PLACEMENTS; do
    for init in $SCALE_INITS; do
      n=$((n + 1))
      name="${placement}_L${depth}"
      init_flags=()
      if [ "$init" != "default" ]; then
        name="${name}_${init}"
        init_flags=(--scale-init "$init")
      fi
      run="$SWEEP_DIR/runs/$name"
      if [ -z "${RERUN:-}" ] && grep -qx "exit_code=0" "$run/run.txt" 2>/dev/null; then
        echo "== [$n/$total] $name: finished earlier, kept (RERUN=1 to train again)"
        continue
      fi
      rm -rf "$run"
      mkdir -p "$run"
      echo "== [$n/$total] $name ($NPROC rank(s)) -> $run/train.log"
      start=$(date +%s)
      OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/torchrun" --standalone \
        --nproc_per_node "$NPROC" -m spannorm_megatron.train --config "$CONFIG" \
        --norm-placement "$placement" --num-layers "$depth" "${init_flags[@]}" \
        --data-path "$DATA_DIR/stdlib_text_document" --tokenizer-model "$DATA_DIR/tokenizer.model" \
        --tensorboard-dir "$run/tensorboard" "$@" > "$run/train.log" 2>&1
      code=$?
      seconds=$(( $(date +%s) - start ))
      printf 'placement=%s\ndepth=%s\nscale_init=%s\nnproc=%s\ntrain_iters=%s\nexit_code=%s\nseconds=%s\n' \
        "$placement" "$depth" "$init" "$NPROC" "$train_iters" "$code" "$seconds" > "$run/run.txt"
      last=$(grep -E "iteration +[0-9]+/" "$run/train.log" | tail -n 1 | sed -E 's/.*(iteration +[0-9]+\/ *[0-9]+).*(lm loss: [^|]*).*/\1 | \2/')
      echo "   exit $code after ${seconds}s; last: ${last:-no training line (see the log)}"
      if [ "$code" != 0 ]; then grep -m 1 "^error: " "$run/train.log" | sed 's/^/   /'; fi
    done
  done
done

echo "sweep_seconds=$(( $(date +%s) - sweep_start ))" >> "$SWEEP_DIR/sweep.txt"
"$python" "$root/examples/depth_sweep/report.py" "$SWEEP_DIR"
echo "Report: $SWEEP_DIR/report.md"
