#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment with the pinned development stack and
# an editable install of spannorm_megatron (which installs its console scripts, spannorm-*, and
# lets tools/*.py import the package). Idempotent: re-installs only when the pins change.
#
#   bash tools/setup_env.sh            # -> .venv/ beside setup.py
#   SPANNORM_VENV=/path bash tools/setup_env.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SPANNORM_VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup_env] creating virtual environment in $venv"
  "$python" -m venv "$venv"
fi

stamp="$venv/.spannorm-installed"
want=$(cat "$root/tools/requirements-dev.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_env] installing pinned requirements (tools/requirements-dev.txt)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$root/tools/requirements-dev.txt"
  echo "[setup_env] installing spannorm_megatron (editable)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e "$root"
  echo "$want" > "$stamp"
fi
# A shared environment may have been pointed at another checkout by its own setup: the editable
# install must be this one's (asked from / so that the working directory does not answer).
installed=$(cd / && "$venv/bin/python" -c \
  "import os, spannorm_megatron as m; print(os.path.dirname(os.path.dirname(m.__file__)))" \
  2>/dev/null || true)
if [ "$installed" != "$root" ]; then
  echo "[setup_env] installing spannorm_megatron from $root (editable; was: ${installed:-none})" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation -e "$root" >&2
fi
echo "$venv"
