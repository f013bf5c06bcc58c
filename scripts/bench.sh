#!/usr/bin/env bash
# Installs rsoptim (the built wheel) with torch and runs the side-by-side benchmark against
# torch.optim on this machine. Extra arguments go to `python -m rsoptim.bench`
# (e.g. --quick, --json, --plot adam.png, --no-deepspeed).
set -euo pipefail
source "$(dirname "$0")/env.sh" bench
# DeepSpeed's CPU Adam is a column of the Adam rows: deepspeed, and ninja to compile its op on
# first use (into torch's extension cache). Optional: without it the benchmark runs, and says why
# the column is missing. Only here: the tests do not depend on it.
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
if ! .venv/bin/python -m pip install --quiet "deepspeed==${DEEPSPEED_VERSION}" ninja; then
    echo "note: deepspeed ${DEEPSPEED_VERSION} did not install; the benchmark runs without its DeepSpeedCPUAdam column" >&2
fi
.venv/bin/python -m rsoptim.bench "$@"
