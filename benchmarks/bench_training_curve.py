"""The detector's loss curve with native layers against the PyTorch path.

Trains the ``ddetr train`` demo configuration (synthetic data, the README's first
command) twice from the same seed, once with ``--native_layers`` and once with
``--no-native_layers``, for ``--steps`` iterations each: the same initial weights, the
same batches in the same order. Dropout draws different masks on the two paths (each
with its own Philox stream), so the curves agree within noise rather than bit for bit;
with ``--dropout 0`` they agree to rounding. Prints the mean loss over windows of
``--window`` steps for both, the time per step, and writes JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import torch  # noqa: E402

from ddetr.engine.config import make_config  # noqa: E402
from ddetr.engine.train import setup, to_device, train_step  # noqa: E402
from _common import device_name, git, write_result  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training iterations per path")
    p.add_argument("--window", type=int, default=50, help="steps per averaged window")
    p.add_argument("--dropout", type=float, default=None,
                   help="transformer dropout (default: the demo configuration's)")
    p.add_argument("--cache_dir", default=None, help="where the synthetic data lives "
                                                     "(default: the ddetr cache)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="JSON directory")
    return p.parse_args(argv)


def losses(native: bool, args, workdir: str) -> tuple[list[float], float]:
    """Per-step training losses and seconds per step of one path."""
    overrides = {"native_layers": native, "output_dir": os.path.join(workdir, str(native)),
                 "progress": False}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    if args.cache_dir:
        overrides["cache_dir"] = args.cache_dir
    run = setup(make_config(overrides))
    run.model.train()
    values, start = [], time.perf_counter()
    while len(values) < args.steps:
        for images, mask, targets in run.train_loader:
            images, mask, targets = to_device(images, mask, targets, run.device)
            out = train_step(run.model, run.criterion, images, mask, targets, run.optimizer,
                             run.config.clip_max_norm, run.amp, run.scaler)
            values.append(out["loss"])
            if len(values) == args.steps:
                break
    return values, (time.perf_counter() - start) / args.steps


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        curves = {}
        for native in (True, False):
            curves["native" if native else "pytorch"] = losses(native, args, workdir)
    rows = []
    for i in range(0, args.steps, args.window):
        a = statistics.fmean(curves["native"][0][i:i + args.window])
        b = statistics.fmean(curves["pytorch"][0][i:i + args.window])
        rows.append({"steps": [i, min(i + args.window, args.steps)], "native": a, "pytorch": b,
                     "relative_difference": (a - b) / b})
    print(f"# training loss, native layers vs PyTorch path, {device_name('cpu')}, "
          f"{args.steps} steps (s/step: native {curves['native'][1]:.3f}, "
          f"pytorch {curves['pytorch'][1]:.3f})")
    print(f"{'steps':>11} {'native':>10} {'pytorch':>10} {'rel. diff':>10}")
    for r in rows:
        print(f"{r['steps'][0]:>5}-{r['steps'][1]:<5} {r['native']:>10.4f} {r['pytorch']:>10.4f} "
              f"{r['relative_difference']:>+10.3%}")
    write_result(args.out, "training_curve",
                 {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "device_name": device_name("cpu"), "torch": torch.__version__,
                           "git_commit": git("rev-parse", "HEAD"), "argv": sys.argv[1:]},
                  "windows": rows,
                  "losses": {k: v[0] for k, v in curves.items()},
                  "seconds_per_step": {k: v[1] for k, v in curves.items()}})


if __name__ == "__main__":
    main()
