#!/usr/bin/env bash
# The test suite, as CI runs it: sets up .venv if needed, then runs pytest over tests/.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh -k placements -x`).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/tools/setup_env.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
