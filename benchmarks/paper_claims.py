"""The Deformable DETR paper's claims, measured in this library at demo scale.

Trains from scratch, one seed per run, on the built-in synthetic dataset (or a COCO-format
dataset given by the data flags): DETR, DETR-DC5, Deformable DETR single-scale, the same
with 1 sampling point, multi-scale, + box refinement and ++ two-stage. Every run has the
same backbone (``resnet26-tiny``: bottleneck blocks, so DC5 can dilate its last stage),
width, layers, queries, optimiser, images per epoch and epochs: the demo's recipe
(``ddetr train``), with each architecture's own classification loss. AP / AP50 /
AP_small are logged per epoch (each run's ``log.jsonl``).

Then, for every run: the final AP, AP50, AP_small, training time per epoch (with the
evaluation), batch-1 inference time and parameters; and the claims as numbers:

1. convergence: the epochs multi-scale Deformable DETR needs to reach DETR's final AP,
   against DETR's epochs (the paper: about 10x fewer);
2. small objects: AP_small of multi-scale minus single-scale, and minus DETR;
3. encoder cost against image size: one encoder layer (d_model 256, 8 heads, FFN 1024,
   forward, batch 1) over the S tokens of a four-level pyramid (strides 8-64), with
   dense attention (DETR's layer) and with deformable attention, time and peak memory,
   and the exponent of a power law fitted to time against S (the paper: about 2 for
   dense, about 1 for deformable).

Each run resumes from its own checkpoint, so the study can be spread over several
invocations (``--runs`` picks some). Writes ``paper_claims.json``, ``paper_claims.png``
(AP against epochs and against training time) and ``encoder_scaling.png`` under
``--out``; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ddetr.engine.config import make_config  # noqa: E402
from ddetr.engine.evaluate import STAT_NAMES  # noqa: E402
from ddetr.engine.plot import draw_panel, read_log  # noqa: E402
from ddetr.engine.predict import load_detector  # noqa: E402
from ddetr.engine.train import fit  # noqa: E402
from _common import PeakMemory, device_name, git  # noqa: E402
from _plot import line_plot  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# run -> its settings on top of the study's common ones
RUNS = {
    "DETR": dict(arch="detr", num_feature_levels=1, set_cost_class=1.0, cls_loss_coef=1.0),
    "DETR-DC5": dict(arch="detr", num_feature_levels=1, dilation=True, set_cost_class=1.0,
                     cls_loss_coef=1.0),
    "single-scale": dict(num_feature_levels=1),
    "single-scale 1 point": dict(num_feature_levels=1, enc_n_points=1, dec_n_points=1),
    "multi-scale": dict(num_feature_levels=4),
    "+ box refinement": dict(num_feature_levels=4, with_box_refine=True),
    "++ two-stage": dict(num_feature_levels=4, with_box_refine=True, two_stage=True),
}
COMMON = dict(backbone="resnet26-tiny", two_stage=False, with_box_refine=False, seed=42)
AP, AP50, AP_SMALL = (STAT_NAMES.index(n) for n in ("AP", "AP50", "AP_small"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=8, help="epochs of every run (default 8)")
    p.add_argument("--train_images", type=int, default=800,
                   help="synthetic training images, seen once per epoch (default 800)")
    p.add_argument("--val_images", type=int, default=200,
                   help="synthetic validation images (default 200)")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                   metavar="RUN", help=f"runs to train now (default all: {', '.join(RUNS)})")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 192, 256, 384, 512],
                   help="square image sides of the encoder-scaling measurement")
    p.add_argument("--data", nargs=4, default=None,
                   metavar=("TRAIN_IMAGES", "TRAIN_ANN", "VAL_IMAGES", "VAL_ANN"),
                   help="a COCO-format dataset instead of the synthetic one")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of minutes: 1 epoch of 16 images, 8 to validate, "
                        "sizes 64 and 96")
    p.add_argument("--out", default=os.path.join(HERE, "results", "paper_claims"),
                   help="run folders and results (default benchmarks/results/paper_claims)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_images, args.val_images, args.sizes = 1, 16, 8, [64, 96]
    return args


# ---------------------------------------------------------------- training


def run_config(name: str, args):
    """The ``TrainConfig`` of one run (its own folder under ``--out``)."""
    explicit = {**COMMON, **RUNS[name], "epochs": args.epochs, "lr_drop": args.epochs,
                "threads": args.threads, "progress": False, "num_workers": 1,
                "synthetic_train": args.train_images, "synthetic_val": args.val_images,
                "cache_dir": os.path.join(args.out, "data"),
                "output_dir": os.path.join(args.out, "runs", name.replace(" ", "_"))}
    if args.data:
        keys = ("train_images", "train_annotations", "val_images", "val_annotations")
        explicit.update(zip(keys, args.data))
        explicit.update(base_size=128, max_size=256)  # the demo's image sizes
    if args.quick:
        explicit.update(enc_layers=1, dec_layers=1, batch_size=4)
    return make_config(explicit, "cpu-small" if args.data else None)


def epochs_done(config) -> int:
    log = os.path.join(config.output_dir, "log.jsonl")
    return len(read_log(log)) if os.path.isfile(log) else 0


def train(name: str, args) -> None:
    """Trains one run to ``--epochs``, resuming from its checkpoint when it has one."""
    config = run_config(name, args)
    done = epochs_done(config)
    if done >= config.epochs:
        print(f"{name}: {done} epochs already trained", flush=True)
        return
    saved = os.path.join(config.output_dir, "checkpoint.pth")
    if done and os.path.isfile(saved):
        config.resume = saved
    print(f"{name}: training epochs {done + 1}-{config.epochs}", flush=True)
    fit(config, on_epoch=lambda r: print(
        f"  {name} epoch {r['epoch'] + 1}: AP {r.get('coco_eval_bbox', [math.nan])[AP]:.3f}"
        f" ({r['epoch_time_s']:.0f} s)", flush=True))


def inference_ms(model, side: int, repeats: int = 10) -> float:
    """Median batch-1 inference time of a trained model at ``side`` x ``side``."""
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def summarise(name: str, args) -> dict | None:
    """The run's curves and final numbers, or None when it has not been trained."""
    config = run_config(name, args)
    if not epochs_done(config):
        return None
    records = read_log(os.path.join(config.output_dir, "log.jsonl"))
    evaluated = [r for r in records if "coco_eval_bbox" in r]
    minutes = np.cumsum([r["epoch_time_s"] for r in records]) / 60
    checkpoint = os.path.join(config.output_dir, "checkpoint.pth")
    model = load_detector(checkpoint).model
    final = evaluated[-1]["coco_eval_bbox"] if evaluated else [math.nan] * len(STAT_NAMES)
    return {"epochs": len(records), "AP": final[AP], "AP50": final[AP50],
            "AP_small": final[AP_SMALL],
            "curve": [(r["epoch"] + 1, r["coco_eval_bbox"][AP], float(m))
                      for r, m in zip(records, minutes) if "coco_eval_bbox" in r],
            "epoch_s": statistics.mean(r["epoch_time_s"] for r in records),
            "inference_ms": inference_ms(model, config.base_size),
            "parameters": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------- claims


def convergence(rows: dict) -> dict | None:
    """Epochs multi-scale Deformable DETR needs to reach DETR's final AP."""
    detr, ours = rows.get("DETR"), rows.get("multi-scale")
    if not detr or not ours:
        return None
    reached = next((e for e, ap, _ in ours["curve"] if ap >= detr["AP"]), None)
    return {"detr_final_AP": detr["AP"], "detr_epochs": detr["epochs"],
            "deformable_epochs_to_reach_it": reached,
            "ratio": None if reached is None else detr["epochs"] / reached}


def small_objects(rows: dict) -> dict:
    ms = rows.get("multi-scale")
    out = {}
    for other in ("single-scale", "DETR"):
        if ms and rows.get(other):
            out[f"multi-scale minus {other}"] = ms["AP_small"] - rows[other]["AP_small"]
    return out


def _pyramid_tokens(side: int, d_model: int):
    from ddetr.ops import encoder_reference_points, flatten_multiscale
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(1, d_model, -(-side // s), -(-side // s), generator=gen)
             for s in (8, 16, 32, 64)]
    flat = flatten_multiscale(feats, None, [torch.zeros_like(f) for f in feats])
    ref = encoder_reference_points(flat.levels, flat.valid_ratios)
    return flat, ref


def encoder_scaling(sizes: list[int]) -> dict:
    """Time and peak memory of one dense and one deformable encoder layer against S."""
    from ddetr.models.detr_transformer import DetrEncoderLayer
    from ddetr.models.transformer_layers import DeformableTransformerEncoderLayer
    torch.manual_seed(0)
    dense = DetrEncoderLayer(256, 8, 1024, 0.0, "relu").eval()
    deformable = DeformableTransformerEncoderLayer(256, 1024, 0.0).eval()
    rows = []
    for side in sizes:
        flat, ref = _pyramid_tokens(side, 256)
        pad = torch.zeros(flat.src.shape[:2], dtype=torch.bool)
        calls = {"dense": lambda: dense(flat.src, pad, flat.pos),
                 "deformable": lambda: deformable(flat.src, flat.pos, ref, flat.levels,
                                                  flat.level_start_index)}
        row = {"side": side, "tokens": flat.src.shape[1]}
        for kind, call in calls.items():
            with torch.no_grad():
                call(), call()
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - start) * 1e3)
                with PeakMemory(torch.device("cpu"), fixed_mmap=True) as mem:
                    call()
            row[f"{kind}_ms"], row[f"{kind}_mb"] = statistics.median(times), mem.peak_bytes / 2**20
        rows.append(row)
        print(f"  encoder layer, S = {row['tokens']}: dense {row['dense_ms']:.1f} ms, "
              f"deformable {row['deformable_ms']:.1f} ms", flush=True)
    tokens = np.log([r["tokens"] for r in rows])
    fit = {kind: float(np.polyfit(tokens, np.log([r[f"{kind}_ms"] for r in rows]), 1)[0])
           for kind in ("dense", "deformable")} if len(rows) > 1 else {}
    return {"rows": rows, "time_exponent": fit}


# ---------------------------------------------------------------- outputs


def draw_curves(rows: dict, path: str) -> None:
    image = Image.new("RGB", (1500, 460), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    by_epoch = {n: [(e, ap) for e, ap, _ in r["curve"]] for n, r in rows.items()}
    by_time = {n: [(m, ap) for _, ap, m in r["curve"]] for n, r in rows.items()}
    draw_panel(draw, (0, 0, 750, 460), "COCO AP by epoch", by_epoch)
    draw_panel(draw, (750, 0, 1500, 460), "COCO AP by training time", by_time,
               xlabel="minutes")
    image.save(path)


def draw_scaling(scaling: dict, path: str) -> None:
    rows = scaling["rows"]
    colours = {"dense": (214, 39, 40), "deformable": (31, 119, 180)}
    series = [{"label": f"{k} ({scaling['time_exponent'].get(k, math.nan):.2f})",
               "xs": [r["tokens"] for r in rows], "ys": [r[f"{k}_ms"] for r in rows],
               "color": c} for k, c in colours.items()]
    line_plot(series, path, "one encoder layer, batch 1 (fitted exponent)",
              "tokens S", "ms")


def print_table(rows: dict) -> None:
    print(f"\n{'model':<22} {'epochs':>6} {'AP':>6} {'AP50':>6} {'AP_s':>6} "
          f"{'s/epoch':>8} {'infer ms':>9} {'params':>9}")
    for name, r in rows.items():
        print(f"{name:<22} {r['epochs']:>6} {r['AP']:6.3f} {r['AP50']:6.3f} "
              f"{r['AP_small']:6.3f} {r['epoch_s']:8.0f} {r['inference_ms']:9.1f} "
              f"{r['parameters'] / 1e6:8.2f}M")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    for name in args.runs:
        train(name, args)
    rows = {n: s for n in RUNS if (s := summarise(n, args)) is not None}
    print_table(rows)
    print("encoder scaling:", flush=True)
    scaling = encoder_scaling(args.sizes)
    result = {"benchmark": "paper_claims", "finished": datetime.datetime.now().isoformat(
        timespec="seconds"), "device": device_name("cpu"), "torch": torch.__version__,
        "git_commit": git("rev-parse", "HEAD"), "threads": args.threads,
        "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": rows,
        "claims": {"convergence": convergence(rows), "small_objects": small_objects(rows),
                   "encoder_scaling": scaling}}
    with open(os.path.join(args.out, "paper_claims.json"), "w") as f:
        json.dump(result, f, indent=1)
    if rows:
        draw_curves(rows, os.path.join(args.out, "paper_claims.png"))
    draw_scaling(scaling, os.path.join(args.out, "encoder_scaling.png"))
    print(json.dumps(result["claims"]["convergence"]), json.dumps(result["claims"]["small_objects"]),
          json.dumps(scaling["time_exponent"]), sep="\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
