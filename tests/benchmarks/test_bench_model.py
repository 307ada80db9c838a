"""benchmarks/bench_model.py runs as a script (tests never import the benchmarks): a
quick bfloat16 run writes every implementation's row, transformers' float32 row beside
its bfloat16 one, and ddetr's change against its own float32 outputs."""

import glob
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_model.py")


@pytest.mark.slow
def test_bfloat16_quick_run(tmp_path):
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--dtype", "bfloat16",
                           "--no-profile", "--no-layers-off", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "model_cpu_*_bf16_quick.json"))
    with open(path) as f:
        result = json.load(f)
    assert result["args"]["dtype"] == "bfloat16" and result["args"]["no_train"]
    (row,) = result["rows"]
    assert row["measurement"] == "inference 128x128 b1"
    assert set(row["median_ms"]) == {"transformers-float32", "transformers", "ddetr"}
    assert all(ms > 0 for ms in row["median_ms"].values())
    # transformers' bfloat16 memory is skipped (torch's grid_sample reads out of bounds)
    assert set(row["peak_mb"]) == {"transformers-float32", "ddetr"}
    assert "transformers" in row["memory_skipped"]
    change = result["parity"]["ddetr_bfloat16_vs_float32"]["128x128"]
    assert 0 < change["logits"] < 0.2 and 0 < change["boxes"] < 0.05
    assert "transformers-float32" in done.stdout and "/ " in done.stdout
