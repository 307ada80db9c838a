"""Where a batch-1 forward of a small detector goes: the whole model against its backbone
alone and against the backbone with the input projections and position encodings (the
``pyramid`` the transformer takes), timed round robin in one process, and how many aten
ops each runs (counted, not timed: the one figure here that the machine's noise does not
move).

By default the model is the main job's (``ddetr train`` with no flags: ``resnet18-tiny``,
``d_model`` 64, two-stage, 128-pixel images) with random weights, which time like trained
ones; ``--checkpoint`` takes a trained one. On such a model a forward is mostly fixed
cost, so this says how much any cut of the transformer (``ddetr compress``) can win
there: at most the share that is not the pyramid. Prints a table and writes JSON under
``--out``.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import ddetr  # noqa: E402
from _common import device_name, git, time_step, write_result  # noqa: E402
from ddetr.engine.builders import build_model  # noqa: E402
from ddetr.engine.config import make_config  # noqa: E402
from ddetr.engine.predict import load_detector  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a ddetr train checkpoint (default: the main job's model, random weights)")
    p.add_argument("--trust_pickle", action="store_true",
                   help="allow a checkpoint that only loads through pickle")
    p.add_argument("--size", default="128x128", help="image size, HxW")
    p.add_argument("--repeats", type=int, default=70,
                   help="timed rounds (each part once per round)")
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before timing")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="JSON directory")
    return p.parse_args(argv)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _model(args):
    if args.checkpoint is not None:
        return load_detector(args.checkpoint, trust_pickle=args.trust_pickle).model.eval()
    torch.manual_seed(0)
    return build_model(make_config({}), num_classes=4).eval()


def run(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    device = torch.device("cpu")
    model = _model(args)
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    parts = {"model": lambda: model(x),
             "backbone": lambda: model.backbone[0](x, mask),
             "pyramid": lambda: model.pyramid(x, mask)}
    rows = []
    with torch.no_grad():
        times = {name: [] for name in parts}
        for name, call in parts.items():
            time_step(call, device, args.warmup, 0)  # (also fills the caches of constants)
            counter = _OpCounter()
            with counter:
                call()
            rows.append({"part": name, "aten_ops": sum(counter.ops.values()),
                         "top_ops": dict(counter.ops.most_common(8))})
        for _ in range(args.repeats):  # round robin: the machine's drift hits all alike
            for name, call in parts.items():
                times[name] += time_step(call, device, 0, 1)
    whole = statistics.median(times["model"])
    for row in rows:
        row["ms"] = statistics.median(times[row["part"]])
        row["share"] = row["ms"] / whole
    return {"device": device_name("cpu"), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "ddetr": ddetr.__version__,
            "commit": git("rev-parse", "HEAD"), "checkpoint": args.checkpoint,
            "size": [h, w], "repeats": args.repeats, "rows": rows}


def print_table(result: dict) -> None:
    print(f"# {result['device']}, {result['threads']} threads; batch 1 at "
          f"{result['size'][0]}x{result['size'][1]}, medians of {result['repeats']} rounds")
    print(f"{'part':10s} {'ms':>8s} {'share':>7s} {'aten ops':>9s}")
    for r in result["rows"]:
        print(f"{r['part']:10s} {r['ms']:8.2f} {100 * r['share']:6.0f}% {r['aten_ops']:9d}")


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_result(args.out, "parts_cpu", result)


if __name__ == "__main__":
    main()
