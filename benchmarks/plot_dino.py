"""DINO against Deformable DETR on the synthetic demo: both AP curves in one PNG.

Reads two ``ddetr train`` logs (``log.jsonl``): the main job (``ddetr train``, Deformable
DETR) and ``ddetr train --arch dino`` on the same data with the demo's sizes. Draws the
COCO AP per epoch and per cumulative training wall-clock second side by side, prints a
table (AP per epoch, seconds per epoch) and the epoch at which DINO first reaches the
main job's final AP, and writes the same figures as JSON beside the PNG.

    python benchmarks/plot_dino.py --deformable output-synthetic/log.jsonl \\
        --dino dino/output-synthetic/log.jsonl --out benchmarks/results/dino

``--dino`` may be given several times, as ``LABEL=PATH`` to name each run (e.g. two
schedules); ``--other LABEL=PATH`` adds further runs to compare with (e.g. the main job
with a weight average), drawn and tabulated the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image, ImageDraw

from ddetr.engine.evaluate import STAT_NAMES
from ddetr.engine.plot import draw_panel, read_log

AP = STAT_NAMES.index("AP")


def run_figures(path: str) -> dict:
    """Per epoch: AP (when evaluated) and the epoch's wall-clock seconds."""
    records = read_log(path)
    return {"epochs": [r["epoch"] + 1 for r in records],
            "ap": [r["coco_eval_bbox"][AP] if "coco_eval_bbox" in r else None for r in records],
            "epoch_time_s": [r["epoch_time_s"] for r in records]}


def first_epoch_reaching(run: dict, target: float) -> int | None:
    return next((e for e, ap in zip(run["epochs"], run["ap"]) if ap is not None and ap >= target),
                None)


def draw(runs: dict[str, dict], path: str, width: int = 1100, height: int = 420) -> None:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    canvas = ImageDraw.Draw(image)
    by_epoch = {name: [(e, ap) for e, ap in zip(r["epochs"], r["ap"]) if ap is not None]
                for name, r in runs.items()}
    by_time = {}
    for name, r in runs.items():
        elapsed, points = 0.0, []
        for ap, seconds in zip(r["ap"], r["epoch_time_s"]):
            elapsed += seconds
            if ap is not None:
                points.append((elapsed / 60, ap))
        by_time[name] = points
    half = width // 2
    draw_panel(canvas, (0, 0, half, height), "COCO AP per epoch (synthetic demo)", by_epoch)
    draw_panel(canvas, (half, 0, width, height), "COCO AP against training time", by_time,
               xlabel="minutes (2 shared cores: noisy)")
    image.save(path, format="PNG")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deformable", required=True, help="the main job's log.jsonl")
    parser.add_argument("--dino", required=True, action="append",
                        help="a --arch dino run's log.jsonl, or LABEL=PATH; repeatable")
    parser.add_argument("--other", action="append", default=[],
                        help="another run's log.jsonl to draw beside them, as LABEL=PATH; "
                             "repeatable")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "dino"),
                        help="folder for dino_vs_deformable.png and .json")
    args = parser.parse_args(argv)
    runs = {"Deformable DETR": run_figures(args.deformable)}
    for entry in args.dino + args.other:
        label, _, path = entry.rpartition("=")
        runs[label or "DINO"] = run_figures(path)
    os.makedirs(args.out, exist_ok=True)
    base = runs["Deformable DETR"]
    target = next(ap for ap in reversed(base["ap"]) if ap is not None)
    summary = {name: {**r, "first_epoch_at_main_final_ap": first_epoch_reaching(r, target),
                      "mean_epoch_time_s": sum(r["epoch_time_s"]) / len(r["epoch_time_s"])}
               for name, r in runs.items()}
    print(f"{'epoch':>5s} " + " ".join(f"{n + ' AP':>18s} {'s':>6s}" for n in runs))
    for i in range(max(len(r["epochs"]) for r in runs.values())):
        cells = []
        for r in runs.values():
            ap = r["ap"][i] if i < len(r["ap"]) else None
            seconds = r["epoch_time_s"][i] if i < len(r["epoch_time_s"]) else None
            cells.append(f"{'-' if ap is None else f'{ap:.3f}':>18s} "
                         f"{'-' if seconds is None else f'{seconds:.0f}':>6s}")
        print(f"{i + 1:5d} " + " ".join(cells))
    for name in list(runs)[1:]:
        print(f"main job's final AP {target:.3f}; {name} first reaches it at epoch "
              f"{summary[name]['first_epoch_at_main_final_ap']}")
    draw(runs, os.path.join(args.out, "dino_vs_deformable.png"))
    with open(os.path.join(args.out, "dino_vs_deformable.json"), "w") as f:
        json.dump({"main_final_ap": target, "runs": summary}, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
