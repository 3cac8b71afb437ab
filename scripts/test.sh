#!/usr/bin/env bash
# The test command: create/update .venv, install .[dev,tpu-compile], run the whole suite offline on CPU.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" "[dev,tpu-compile]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 JAX_PLATFORMS=cpu
set +e
python -m pytest --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
