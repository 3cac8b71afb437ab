# Sourced by quickstart.sh and test.sh: create/update .venv with the CPU torch pin first, then the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[jaxtune] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=.venv/.jaxtune-install-stamp
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16)-$1"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[jaxtune] installing dependencies into .venv (first run takes a few minutes)"
  python -m pip install -q --upgrade pip
  # torch==2.13.0 is the CPU wheel; any other spec pulls a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".$1"
  echo "$WANT" > "$STAMP"
fi
