#!/usr/bin/env bash
# The test suite, as CI runs it: sets up .venv if needed, then runs pytest over tests/.
#   bash tools/run_tests.sh               # everything (what .ci/run runs)
#   bash tools/run_tests.sh --fast        # the fast tier: no test marked `slow` or `torchrun`
#                                         # (tests/conftest.py), a few minutes on 2 cores
# Other arguments go to pytest (e.g. `bash tools/run_tests.sh -k placements -x`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then
    args+=(-m "not slow and not torchrun")
  else
    args+=("$arg")
  fi
done
venv=$(bash "$root/tools/setup_env.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m pytest tests -q -p no:cacheprovider ${args[@]+"${args[@]}"}
