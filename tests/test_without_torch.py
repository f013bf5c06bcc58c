"""rsoptim.functional works with NumPy alone; the torch optimizers say what is missing."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None  # as if torch were not installed
import numpy as np
import rsoptim
from rsoptim import functional as F

w = np.zeros(8, dtype=np.float32)
m, v, steps = np.zeros_like(w), np.zeros_like(w), np.zeros(1, dtype=np.float32)
F.adam_([w], [np.ones_like(w)], [m], [v], steps, lr=0.1)
assert steps[0] == 1 and np.allclose(w, -0.1), w
try:
    rsoptim.Adam
except ImportError as e:
    assert "needs torch" in str(e)
else:
    raise AssertionError("rsoptim.Adam without torch must raise ImportError")
print("ok")
"""


def test_functional_api_works_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
