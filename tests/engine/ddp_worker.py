"""Run by torchrun in test_distributed: a few training steps, then each rank saves its
parameters and the evaluation result it received."""

import json
import sys

import torch

from ddetr.engine import distributed
from ddetr.engine.train import run_epoch, setup
from tests.engine.tiny import tiny_config


def main(tmp_path: str) -> None:
    from pathlib import Path
    config = tiny_config(Path(tmp_path), epochs=1, dropout=0.1)
    run = setup(config)
    record = run_epoch(run, 0, max_steps=2)
    rank = distributed.rank()
    torch.save({k: v for k, v in run.model.state_dict().items()}, f"{tmp_path}/rank{rank}.pt")
    with open(f"{tmp_path}/rank{rank}.json", "w") as f:
        json.dump({"world": distributed.world_size(), "record": record}, f)
    distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
