"""benchmarks/plot_dino.py runs as a script on ``ddetr train`` logs: the table, the epoch
at which each run first reaches the main job's final AP, the PNG and the JSON."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "plot_dino.py")


def write_log(path, aps, seconds=100.0):
    with open(path, "w") as f:
        for epoch, ap in enumerate(aps):
            record = {"epoch": epoch, "epoch_time_s": seconds}
            if ap is not None:
                record["coco_eval_bbox"] = [ap] + [0.0] * 11
            f.write(json.dumps(record) + "\n")


def test_runs_against_the_main_job(tmp_path):
    write_log(tmp_path / "main.jsonl", [0.1, 0.2, 0.3, 0.5])
    write_log(tmp_path / "dino.jsonl", [0.2, 0.51, 0.6], 150.0)
    write_log(tmp_path / "never.jsonl", [0.1, None, 0.4])
    write_log(tmp_path / "ema.jsonl", [0.3, 0.5])
    done = subprocess.run([sys.executable, SCRIPT, "--deformable", str(tmp_path / "main.jsonl"),
                           "--dino", f"fast={tmp_path / 'dino.jsonl'}",
                           "--dino", f"slow={tmp_path / 'never.jsonl'}",
                           "--other", f"main+ema={tmp_path / 'ema.jsonl'}",
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fast first reaches it at epoch 2" in done.stdout
    assert "slow first reaches it at epoch None" in done.stdout
    assert "main+ema first reaches it at epoch 2" in done.stdout
    with open(tmp_path / "out" / "dino_vs_deformable.json") as f:
        result = json.load(f)
    assert result["main_final_ap"] == 0.5
    assert list(result["runs"]) == ["Deformable DETR", "fast", "slow", "main+ema"]
    assert result["runs"]["fast"]["mean_epoch_time_s"] == 150.0
    assert result["runs"]["slow"]["ap"] == [0.1, None, 0.4]
    assert os.path.getsize(tmp_path / "out" / "dino_vs_deformable.png") > 1000
