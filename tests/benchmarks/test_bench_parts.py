"""benchmarks/bench_parts.py runs as a script (tests never import the benchmarks) and
writes well-formed results: the pyramid is part of the model, the backbone part of it."""

import glob
import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_parts.py")


def test_parts_of_a_forward(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--size", "64x64", "--repeats", "2",
                           "--warmup", "1", "--threads", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "aten ops" in done.stdout
    (path,) = glob.glob(str(tmp_path / "parts_cpu_*.json"))
    with open(path) as f:
        result = json.load(f)
    assert result["size"] == [64, 64] and result["threads"] == 2 and result["repeats"] == 2
    rows = {r["part"]: r for r in result["rows"]}
    assert list(rows) == ["model", "backbone", "pyramid"]
    assert 0 < rows["backbone"]["aten_ops"] < rows["pyramid"]["aten_ops"] < rows["model"]["aten_ops"]
    assert rows["model"]["share"] == 1.0
    assert all(r["ms"] > 0 and sum(r["top_ops"].values()) <= r["aten_ops"] for r in rows.values())
    assert rows["backbone"]["top_ops"]["aten.convolution"] == 20  # resnet18-tiny: 20 convolutions
