#!/usr/bin/env bash
# Installs what the tests need (a venv with torch, the built wheel and the test extras) and runs
# every test: the Rust core's `cargo test`, then pytest against the installed wheel.
set -euo pipefail
source "$(dirname "$0")/env.sh" test
cargo test --release -p rsoptim-core
# Run from tests/ so that `import rsoptim` is the installed wheel, not the source tree.
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
