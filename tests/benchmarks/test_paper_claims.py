"""benchmarks/paper_claims.py --quick runs end to end (as a script: tests never import
the benchmarks) and writes well-formed results."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "paper_claims.py")
RUNS = ["DETR", "DETR-DC5", "single-scale", "single-scale 1 point", "multi-scale",
        "+ box refinement", "++ two-stage"]


@pytest.mark.slow
def test_quick_study_writes_its_results(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "paper_claims.json") as f:
        result = json.load(f)
    assert list(result["runs"]) == RUNS
    for name, run in result["runs"].items():
        assert run["epochs"] == 1 and len(run["curve"]) == 1, name
        assert 0 <= run["AP"] <= 1 and 0 <= run["AP_small"] <= 1 or run["AP_small"] == -1, name
        assert run["inference_ms"] > 0 and run["parameters"] > 0, name
        # every run kept its own checkpoint to resume from
        assert (tmp_path / "runs" / name.replace(" ", "_") / "checkpoint.pth").is_file()
    claims = result["claims"]
    assert claims["convergence"]["detr_epochs"] == 1
    assert set(claims["small_objects"]) == {"multi-scale minus single-scale",
                                            "multi-scale minus DETR"}
    scaling = claims["encoder_scaling"]
    assert [r["side"] for r in scaling["rows"]] == [64, 96]
    assert scaling["rows"][0]["tokens"] == 8 * 8 + 4 * 4 + 2 * 2 + 1
    assert set(scaling["time_exponent"]) == {"dense", "deformable"}
    for png in ("paper_claims.png", "encoder_scaling.png"):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG" and im.width > 500
    # a second invocation resumes: every run is already trained
    again = subprocess.run([sys.executable, SCRIPT, "--quick", "--threads", "1", "--runs",
                            "DETR", "--sizes", "64", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "DETR: 1 epochs already trained" in again.stdout
