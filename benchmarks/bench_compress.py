"""Compression at the paper's size: batch-1 inference of the uncompressed ddetr model,
of ddetr models with the structural settings of ``ddetr.compress`` applied, and of
transformers' model, side by side in one process on the same random weights.

The model is a randomly initialised ``transformers.DeformableDetrForObjectDetection``
(ResNet-50, d_model 256, 6 + 6 layers, 300 queries, 91 classes) converted with
``ddetr.convert.from_hf`` (as in bench_model.py). Random weights say nothing about AP,
so this measures the speed side only, and how far each setting moves the outputs from
the uncompressed model's (max |difference| of sigmoid scores and of boxes, over the
queries both keep; 0 where the setting is exact; the sparse encoder's token scorer is
trained for seconds on the timed image, so its selection is for timing only). The models are timed round robin (each
once per round) so the machine's drift hits them alike; the median per model is shown. AP is what ``ddetr compress``
measures on a trained model. Prints a table and writes JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common and bench_model beside us

import torch  # noqa: E402

import ddetr  # noqa: E402
from ddetr import compress  # noqa: E402
from _common import blas_note, device_name, git, time_step, write_result  # noqa: E402
from bench_model import build_models  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# (name, how to build it from the uncompressed ddetr model and the image)
SETTINGS = (
    ("ddetr", lambda m, x: m),
    ("decoder 3 of 6 layers", lambda m, x: compress.truncate_decoder(m, 3)),
    ("100 of 300 queries", lambda m, x: compress.reduce_queries(m, 100)),
    ("encoder 2 of 4 points", lambda m, x: compress.prune_points(m, enc_points=2)),
    ("encoder tokens rho 0.3", lambda m, x: _sparse(m, x, 0.3)),
    ("levels 0-2 of 0-3", lambda m, x: compress.drop_levels(m, [0, 1, 2])),
    ("levels 0-1 (no C5)", lambda m, x: compress.drop_levels(m, [0, 1])),
    ("all four", lambda m, x: _sparse(compress.prune_points(compress.reduce_queries(
        compress.truncate_decoder(m, 3), 100), enc_points=2), x, 0.3)),
    ("bfloat16", lambda m, x: compress.to_bfloat16(m)),
    ("int8 linears", lambda m, x: compress.to_int8(m)),
)


def _sparse(model, x, rho: float):
    # the token scorer trained briefly on the timed image itself (random weights: the
    # selection is for timing, not accuracy)
    scorer = compress.train_token_scorer(model, [x], rho, steps=50, time_budget=20)
    return compress.sparsify_encoder(model, rho, scorer)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="800x1333", help="image size, HxW")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds (each model once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="JSON directory")
    return p.parse_args(argv)


def _moved(out: dict, ref: dict) -> dict:
    q = min(out["pred_logits"].shape[1], ref["pred_logits"].shape[1])
    scores = (out["pred_logits"][:, :q].float().sigmoid() - ref["pred_logits"][:, :q].sigmoid())
    boxes = out["pred_boxes"][:, :q].float() - ref["pred_boxes"][:, :q]
    return {"max_score_diff": scores.abs().max().item(), "max_box_diff": boxes.abs().max().item()}


def run(args) -> dict:
    h, w = (int(v) for v in args.size.split("x"))
    device = torch.device("cpu")
    hf, ours = build_models(device)
    hf.eval()
    ours.eval()
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, h, w, dtype=torch.long)
    calls = {"transformers": lambda: hf(pixel_values=x, pixel_mask=mask)}
    rows = {"transformers": {"name": "transformers"}}
    with torch.no_grad():
        ref = ours(x)
        for name, build in SETTINGS:
            model = build(ours, x).eval()
            rows[name] = {"name": name, **_moved(model(x), ref)}
            calls[name] = lambda model=model: model(x)
        # round robin: every model once per round, so the machine's drift hits all alike
        times = {name: [] for name in calls}
        for name, call in calls.items():
            time_step(call, device, args.warmup, 0)
        for _ in range(args.repeats):
            for name, call in calls.items():
                times[name] += time_step(call, device, 0, 1)
    for name, row in rows.items():
        row["ms"] = statistics.median(times[name])
    rows = list(rows.values())
    base = next(r["ms"] for r in rows if r["name"] == "ddetr")
    for r in rows:
        r["speedup_vs_ddetr"] = base / r["ms"]
        r["speedup_vs_transformers"] = rows[0]["ms"] / r["ms"]
    return {"device": device_name("cpu"), "threads": torch.get_num_threads(),
            "blas": blas_note(), "torch": torch.__version__, "ddetr": ddetr.__version__,
            "commit": git("rev-parse", "HEAD"), "size": [h, w], "rows": rows}


def print_table(result: dict) -> None:
    print(f"# {result['device']}, {result['threads']} threads, {result['blas']}; "
          f"batch 1 at {result['size'][0]}x{result['size'][1]}, random weights")
    print(f"{'model':24s} {'ms':>9s} {'vs ddetr':>9s} {'vs transf.':>10s} "
          f"{'max dscore':>10s} {'max dbox':>9s}")
    for r in result["rows"]:
        moved = (f"{r['max_score_diff']:10.2e} {r['max_box_diff']:9.2e}"
                 if "max_score_diff" in r else f"{'':10s} {'':9s}")
        print(f"{r['name']:24s} {r['ms']:9.1f} {r['speedup_vs_ddetr']:8.2f}x "
              f"{r['speedup_vs_transformers']:9.2f}x {moved}")


def main(argv=None) -> None:
    result = run(parse_args(argv))
    print_table(result)
    write_result(parse_args(argv).out, "compress_cpu", result)


if __name__ == "__main__":
    main()
