"""On a CUDA device: the GPU check (gpu/check.py, what `make gpu-check` runs on an offline node), from a bundle
built here for this Python: bf16 ZeRO-1/ZeRO-3 with FusedAdam and fp32 gradient sums, export parity on the GPU,
and MFU beside transformers. Each check and its figure is in gpu/check.py; this test fails naming those that failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_passes(tmp_path):
    sys.path.insert(0, str(REPO / "gpu"))
    import bundle as gb

    gb.build_bundle(tmp_path / ".gpu", target=gb.Target.this_python(), limit_mib=None, log=lambda line: None)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "gpu" / "check.py"), "--bundle", str(tmp_path / ".gpu"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    print(r.stdout)
    rep = json.loads((out / "gpu-check.json").read_text())
    failed = {k: c["detail"] for k, c in rep["checks"].items() if not c["ok"]}
    assert r.returncode == 0 and rep["ok"] and not failed, (failed, r.stderr[-2000:])
