import json
import os
import subprocess
import sys

import torch

from tests.engine.tiny import make_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_cpu_processes_stay_in_sync(tmp_path):
    make_data(tmp_path / "cache")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.engine.ddp_worker", str(tmp_path)]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # different shards and dropout per rank: only synchronised gradients keep them equal
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in records] == [2, 2]
    # losses are averaged over the ranks and the evaluation is shared
    assert records[0]["record"]["train_loss"] == records[1]["record"]["train_loss"]
    assert records[0]["record"]["coco_eval_bbox"] == records[1]["record"]["coco_eval_bbox"]
    assert len(records[0]["record"]["coco_eval_bbox"]) == 12
