#!/usr/bin/env bash
# Installs rsoptim (the built wheel) with torch and runs the side-by-side benchmark against
# torch.optim on this machine. Extra arguments go to `python -m rsoptim.bench`
# (e.g. --quick, --json, --plot adam.png, --no-deepspeed, --no-bitsandbytes).
set -euo pipefail
source "$(dirname "$0")/env.sh" bench
# DeepSpeed's CPU Adam is a column of the Adam rows: deepspeed, and ninja to compile its op on
# first use (into torch's extension cache). Optional: without it the benchmark runs, and says why
# the column is missing. Only here: the tests do not depend on it.
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-0.19.8}
if ! .venv/bin/python -m pip install --quiet "deepspeed==${DEEPSPEED_VERSION}" ninja; then
    echo "note: deepspeed ${DEEPSPEED_VERSION} did not install; the benchmark runs without its DeepSpeedCPUAdam column" >&2
fi
# bitsandbytes' CPU Adam8bit/AdamW8bit is a column of the 8-bit rows (0.50.2 has a CPU 8-bit
# optimizer step; the bench checks that the installed one does). Optional in the same way, and installed only here, not as an extra of the
# package: the benchmark, not rsoptim, uses it.
BITSANDBYTES_VERSION=${BITSANDBYTES_VERSION:-0.50.2}
if ! .venv/bin/python -m pip install --quiet "bitsandbytes==${BITSANDBYTES_VERSION}"; then
    echo "note: bitsandbytes ${BITSANDBYTES_VERSION} did not install; the benchmark runs without its bitsandbytes column" >&2
fi
.venv/bin/python -m rsoptim.bench "$@"
