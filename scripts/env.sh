# Sourced by the other scripts: a virtual environment in .venv with the built rsoptim wheel and
# the given extras installed, exactly as a user installs it (pip, from the wheel maturin builds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
EXTRAS=${1:-torch}
# The torch the comparisons and tests run against: the version docs/torch-contract.md describes
# (rsoptim itself works with torch >= 2.8; TORCH_VERSION=2.15.0 bash scripts/test.sh, say).
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# torch first (a large download that pip's cache keeps for later runs), then maturin to build.
"$VENV_PY" -m pip install --quiet --upgrade pip
"$VENV_PY" -m pip install --quiet "maturin>=1.7,<2" "torch==${TORCH_VERSION}"
rm -rf dist
"$VENV_PY" -m maturin build --release --out dist --quiet
WHEEL=$(ls dist/rsoptim-*.whl)
"$VENV_PY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$VENV_PY" -m pip install --quiet "${WHEEL}[${EXTRAS}]"
