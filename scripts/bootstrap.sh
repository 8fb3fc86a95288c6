#!/usr/bin/env bash
# Make this checkout ready to run: Debian packages when missing, then a virtualenv in .venv with
# edgeprune and all its extras. Idempotent; `make` calls it when pyproject.toml or this file changes.
#
# torch comes only from constraints.txt (torch==2.13.0, the CPU build); an unpinned torch would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-compiler,executorch,fleet,dev}
DATA_DIR=/usr/share/datasets/fashion-mnist

say() { printf '==> %s\n' "$*"; }

# --- Debian packages -----------------------------------------------------------------------------
need=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then need+=(mosquitto); fi
if ! command -v chromium >/dev/null 2>&1; then need+=(chromium); fi  # the fleet dashboard test
if [ ! -e "$DATA_DIR/t10k-images-idx3-ubyte.gz" ] && [ ! -e "$DATA_DIR/t10k-images-idx3-ubyte" ]; then
  need+=(dataset-fashion-mnist)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing ${need[*]} and this machine has no apt-get; install them by hand" >&2
    exit 1
  fi
  say "installing Debian packages: ${need[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# --- Python 3.11 virtualenv ----------------------------------------------------------------------
py=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    py=$cand; break
  fi
done
if [ -z "$py" ]; then
  echo "error: edgeprune needs Python 3.11 (python3.11 or python3 on PATH)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV with $($py --version)"
  "$py" -m venv "$VENV"
fi
say "installing edgeprune[$EXTRAS] (torch pinned by constraints.txt; a first install takes a few minutes)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13."), f"expected torch 2.13.x, got {torch.__version__}"
print(f"==> ready: torch {torch.__version__}")
PY
