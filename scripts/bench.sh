#!/usr/bin/env bash
# Installs rsoptim (the built wheel) with torch and runs the side-by-side benchmark against
# torch.optim on this machine. Extra arguments go to `python -m rsoptim.bench`
# (e.g. --quick, --json, --plot adam.png).
set -euo pipefail
source "$(dirname "$0")/env.sh" bench
.venv/bin/python -m rsoptim.bench "$@"
