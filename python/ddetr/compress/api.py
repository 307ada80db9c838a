"""``compress(model, val_dataset, max_ap_drop)``: the search over the techniques, and its
report (JSON rows and a PNG of AP against latency)."""

from __future__ import annotations

import json
import math
import os
import time

import torch
from PIL import Image, ImageDraw

from ddetr import _cpu
from ddetr.compress.measure import pyramid_share
from ddetr.compress.search import Finetune, Search, run_search
from ddetr.engine.plot import GRID, INK, ticks
from ddetr.models.deformable_detr import DeformableDetr


def _check(model, max_ap_drop, calib_images, time_budget, latency_images, finetune) -> None:
    if not isinstance(model, DeformableDetr):
        raise ValueError(f"model: expected a ddetr DeformableDetr, got {type(model).__name__}")
    if not isinstance(max_ap_drop, (int, float)) or not 0 <= max_ap_drop <= 1:
        raise ValueError(f"max_ap_drop: expected an AP difference in [0, 1], got {max_ap_drop!r}")
    for name, v in (("calib_images", calib_images), ("latency_images", latency_images)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not isinstance(time_budget, (int, float)) or time_budget <= 0:
        raise ValueError(f"time_budget: expected minutes > 0, got {time_budget!r}")
    if finetune is not None and (not isinstance(finetune, Finetune) or
                                 not isinstance(finetune.epochs, int) or finetune.epochs < 1):
        raise ValueError(f"finetune: expected a Finetune with epochs >= 1, got {finetune!r}")


def compress(model: DeformableDetr, val_dataset, max_ap_drop: float = 0.01,
             calib_images: int = 16, device=None, time_budget: float = 10.0,
             latency_images: int = 20, progress: bool = True,
             dataset_at=None, finetune: Finetune | None = None) -> tuple[DeformableDetr, dict]:
    """The fastest combination of the techniques found whose COCO AP on ``val_dataset``
    (a ``CocoDetection``) is at most ``max_ap_drop`` below the model's, and the report
    ``{"rows": every candidate measured, "chosen": its row, "original": the model's row,
    "speedup", "ap_drop", "cpu", "device", "pyramid_share", "transformer_bound", ...}``
    (``pyramid_share``: the backbone, input projections and position encodings' share of
    the original's batch-1 time; ``transformer_bound``: 1 / that, the most any cut of the
    transformer alone can give). ``calib_images``: the first images of
    the set, for the point and query statistics; ``latency_images``: batch-1 timing;
    ``time_budget``: minutes, after which the search stops trying candidates;
    ``dataset_at``: ``scale -> the validation set with images scale times the size``, to
    search smaller inputs too (``resize_inputs``; without it the size stays);
    ``finetune``: a ``Finetune`` (distillation epochs and the training images): then
    combinations beyond the budget are also tried after a short distillation from
    ``model``, and the fastest back within ``max_ap_drop`` wins."""
    _check(model, max_ap_drop, calib_images, time_budget, latency_images, finetune)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device).eval()
    count = len(val_dataset)
    calib = [(val_dataset[i][0][None].to(device), None) for i in range(min(calib_images, count))]
    cache = {1.0: val_dataset}

    def at(scale: float):
        if scale not in cache:
            cache[scale] = dataset_at(scale)
        return cache[scale]

    search = Search(at, latency_images, device, float(max_ap_drop),
                    time.monotonic() + 60 * time_budget, resize=dataset_at is not None)
    start = time.perf_counter()
    chosen, row, rows = run_search(model, search, calib, progress, finetune)
    original = rows[0]
    share = pyramid_share(model, search.reference[1], device)
    report = {"cpu": _cpu.describe(), "device": str(device), "threads": torch.get_num_threads(),
              "max_ap_drop": max_ap_drop, "search_s": time.perf_counter() - start,
              "original": original, "chosen": row, "rows": rows,
              "speedup": 1.0 / row["relative_latency"],
              "ap_drop": original["AP"] - row["AP"], "applied": chosen.compression,
              "pyramid_share": share, "transformer_bound": 1.0 / share}
    return chosen, report


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
    """``report.json`` and ``report.png`` (AP against batch-1 latency, one dot per
    candidate, the original and the chosen one marked) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.png")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    _scatter(report, png_path)
    return json_path, png_path


# relative latencies with a tick on the log axis of the report's plot
_LATENCY_TICKS = (0.25, 0.33, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0)


def _pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both latency (lower) and AP (higher)."""
    return [r for r in rows if not any(
        o["relative_latency"] <= r["relative_latency"] and o["AP"] >= r["AP"]
        and (o["relative_latency"], o["AP"]) != (r["relative_latency"], r["AP"]) for o in rows)]


def _scatter(report: dict, path: str, size=(900, 560)) -> None:
    """AP against relative latency on a log axis; the budget's AP line, the original and
    the chosen candidate marked, the candidates on the speed / AP front named."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 64, 36, size[0] - 20, size[1] - 48
    rows = report["rows"]
    xs = [r["relative_latency"] for r in rows]
    ys = [r["AP"] for r in rows]
    x_lo, x_hi = math.log(min(min(xs), 1.0) / 1.15), math.log(max(max(xs), 1.0) * 1.15)
    y_lo, y_hi = max(0.0, min(ys) - 0.05), max(ys) + 0.03

    def px(x, y):
        return (left + (math.log(x) - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))

    draw.rectangle((left, top, right, bottom), outline=INK)
    for y in ticks(y_lo, y_hi):
        draw.line([(left, px(1, y)[1]), (right, px(1, y)[1])], fill=GRID)
        draw.text((left - 6, px(1, y)[1]), f"{y:.3g}", fill=INK, anchor="rm")
    for x in _LATENCY_TICKS:
        if x_lo <= math.log(x) <= x_hi:
            xp = px(x, y_lo)[0]
            draw.line([(xp, top), (xp, bottom)], fill=GRID)
            draw.text((xp, bottom + 6), f"{x:g}", fill=INK, anchor="mt")
    floor = report["original"]["AP"] - report["max_ap_drop"]
    if y_lo <= floor <= y_hi:
        yp = px(1, floor)[1]
        draw.line([(left, yp), (right, yp)], fill=(214, 39, 40), width=1)
        draw.text((right - 4, yp - 3), "AP budget", fill=(214, 39, 40), anchor="rb")
    draw.text(((left + right) / 2, bottom + 24), "batch-1 latency relative to the original "
              "(log scale, timed side by side; < 1 is faster)", fill=INK, anchor="mt")
    draw.text((left, 10), f"COCO AP against latency ({report['cpu']}); "
              f"max AP drop {report['max_ap_drop']}", fill=INK)
    for r in rows:
        x, y = px(r["relative_latency"], r["AP"])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(31, 119, 180))
    marked = {report["original"]["name"], report["chosen"]["name"]}
    for r in _pareto(rows):
        if r["name"] in marked:
            continue
        x, y = px(r["relative_latency"], r["AP"])
        draw.text((x + 6, y + 2), r["name"], fill=(90, 90, 90))
    same = report["chosen"]["name"] == report["original"]["name"]
    marks = [("original = chosen" if same else "original", "original", (0, 0, 0))]
    marks += [] if same else [("chosen", "chosen", (214, 39, 40))]
    for label, key, colour in marks:
        x, y = px(report[key]["relative_latency"], report[key]["AP"])
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], outline=colour, width=2)
        draw.text((x + 8, y - 14), label, fill=colour)
    image.save(path, format="PNG")
