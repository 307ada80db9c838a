"""Benchmark multi-scale flattening and the encoder reference points: native vs PyTorch.

What is measured, on the standard pyramid of an 800x1333 image (levels at strides 8, 16,
32 and 64: 100x167, 50x84, 25x42, 13x21 = 22,223 tokens), C = 256, batch 2, image 0
unpadded and image 1 a 600x1000 image padded to the batch size:

* ``flatten``: ``ddetr.ops.flatten_multiscale`` (``native``) against
  ``flatten_multiscale_reference`` (``reference``: the official code's flatten /
  transpose / add / cat per level), features, pos_embeds and level_embed all requiring
  gradients;
  - ``fwd``: the forward under no_grad;
  - ``bwd``: the backward alone (the forward runs untimed before each call), for upstream
    gradients of src and pos. The reference's feature and position gradients come out
    of autograd as strided views of the upstream gradients (the backward of transpose),
    so the copy back to (N, C, H, W) is left to whichever layer consumes them (a
    convolution's backward makes them contiguous). ``bwd`` therefore times both with
    their gradients made contiguous, the work the native backward does itself;
    ``bwd-views`` is the reference as returned, without that copy;
  - ``fwd+bwd``: both, gradients made contiguous.
* ``refpts``: ``encoder_reference_points`` against the reference (meshgrid, divide,
  cat, multiply), forward only (the points take no gradient in a detector).

Time: the implementations alternate call by call (``--rounds`` rounds after
``--warmup``, each round in a rotated order), so a change of load on a shared machine
hits both; the figure is the median. GB/s: bytes the native kernels must move (inputs
read once, outputs written once) over the time. Results: a table on stdout and JSON
under ``--out``.

On a Linux CPU a large share of either implementation's time goes to first-touch page
faults of its freshly allocated outputs (allocations this large are mapped anew on every
call), more than to the copies themselves. ``THP_MEM_ALLOC_ENABLE=1`` (torch's
transparent-huge-page allocation) cuts that cost for both.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ddetr  # noqa: E402
import _common as C  # noqa: E402
from _common import device_name, extension_built, git, write_result  # noqa: E402
from ddetr.ops import (encoder_reference_points, encoder_reference_points_reference,  # noqa: E402
                       flatten_multiscale, flatten_multiscale_reference)

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = {"native": (flatten_multiscale, encoder_reference_points),
         "reference": (flatten_multiscale_reference, encoder_reference_points_reference)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                   default="float32")
    p.add_argument("--image", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"),
                   help="the batch's (padded) image size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15, help="timed calls of each implementation")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls of each first")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--quick", action="store_true", help="a 96x128 image, 3 rounds: a smoke run")
    args = p.parse_args(argv)
    if args.quick:
        args.image, args.rounds, args.warmup = (96, 128), 3, 1
    return args


def make_inputs(args, device, dtype) -> dict:
    """features, masks, pos_embeds, level_embed and upstream gradients of src and pos."""
    gen = torch.Generator().manual_seed(0)
    n, c = args.batch, args.channels
    levels = C.image_levels(*args.image)
    image_mask = torch.zeros(n, *args.image, dtype=torch.bool)
    for i in range(1, n):  # every image after the first: 3/4 of the batch size
        image_mask[i, args.image[0] * 3 // 4:] = True
        image_mask[i, :, args.image[1] * 3 // 4:] = True
    # The backbone's masks: the image mask resized to each level (nearest).
    masks = [F.interpolate(image_mask[None].float(), size=(h, w))[0].bool().to(device)
             for h, w in levels]

    def maps():
        return [torch.randn(n, c, h, w, generator=gen).to(device, dtype) for h, w in levels]

    tokens = sum(h * w for h, w in levels)
    return {"features": maps(), "masks": masks, "pos_embeds": maps(),
            "level_embed": torch.randn(len(levels), c, generator=gen).to(device, dtype),
            "grads": [torch.randn(n, tokens, c, generator=gen).to(device, dtype)
                      for _ in range(2)],
            "levels": levels, "tokens": tokens}


def flatten_steps(impl: str, x: dict) -> dict:
    """One callable per pass; each runs the op once."""
    fn = IMPLS[impl][0]
    args = (x["features"], x["masks"], x["pos_embeds"], x["level_embed"])
    leaves = [t.detach().requires_grad_() for t in x["features"] + x["pos_embeds"]
              + [x["level_embed"]]]
    n = len(x["features"])

    def forward():
        return fn(leaves[:n], x["masks"], leaves[n:2 * n], leaves[-1])

    def backward(out, contiguous: bool):
        grads = torch.autograd.grad([out.src, out.pos], leaves, x["grads"])
        if contiguous:
            grads = [g.contiguous() for g in grads]
        return grads

    def fwd():
        with torch.no_grad():
            fn(*args)

    return {"fwd": (None, fwd),
            "bwd": (forward, lambda out: backward(out, True)),
            "bwd-views": (forward, lambda out: backward(out, False)) if impl == "reference"
            else None,
            "fwd+bwd": (None, lambda: backward(forward(), True))}


def time_once(setup, step, device) -> float:
    """Milliseconds of one call of ``step`` (on what ``setup`` returns, untimed)."""
    if setup is None:
        return C.time_step(step, device, warmup=0, repeats=1)[0]
    state = setup()
    return C.time_step(lambda: step(state), device, warmup=0, repeats=1)[0]


def measure_alternating(cases: dict, device, warmup: int, rounds: int) -> dict:
    """{name: [ms, ...]}: the cases called in turn, ``rounds`` times each. Each round
    starts one case later, so no case always follows the same one (what the previous
    call freed decides whether the next one's outputs land on fresh pages)."""
    for _ in range(warmup):
        for setup, step in cases.values():
            time_once(setup, step, device)
    names = list(cases)
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(time_once(*cases[name], device))
    return times


def native_bytes(x: dict, dtype, pass_: str) -> int:
    """Bytes the native flattening must move: each map read once, each token written once
    (forward: features + pos_embeds in, src + pos out, masks in and out; backward: the two
    upstream gradients in, the two map gradients out)."""
    elem = torch.empty((), dtype=dtype).element_size()
    n, c, s = x["grads"][0].shape[0], x["grads"][0].shape[2], x["tokens"]
    fwd = 4 * n * c * s * elem + 2 * n * s
    bwd = 4 * n * c * s * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}.get(pass_, 0)


def run(args) -> tuple[list[dict], dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    x = make_inputs(args, device, dtype)
    cases = {}
    for impl in IMPLS:
        for pass_, case in flatten_steps(impl, x).items():
            if case is not None:
                cases[("flatten", impl, pass_)] = case
    ratios = flatten_multiscale(x["features"], x["masks"], x["pos_embeds"]).valid_ratios
    for impl, (_, refpts) in IMPLS.items():
        cases[("refpts", impl, "fwd")] = (None, lambda f=refpts: f(x["levels"], ratios))
    times = measure_alternating(cases, device, args.warmup, args.rounds)
    rows = []
    for (op, impl, pass_), ts in times.items():
        ms = statistics.median(ts)
        row = {"op": op, "impl": impl, "pass": pass_, "median_ms": ms, "times_ms": ts}
        if op == "flatten" and impl == "native":
            row["gbps"] = native_bytes(x, dtype, pass_) / (ms * 1e-3) / 1e9
        rows.append(row)
    index = {(r["op"], r["impl"], r["pass"]): r for r in rows}
    for r in rows:  # reference time over this row's: > 1 means faster than the reference
        ref = index.get((r["op"], "reference", r["pass"]))
        r["x_ref"] = ref["median_ms"] / r["median_ms"] if ref else None
    if ("flatten", "native", "bwd") in index:
        views = index[("flatten", "reference", "bwd-views")]
        index[("flatten", "native", "bwd")]["x_ref_views"] = (
            views["median_ms"] / index[("flatten", "native", "bwd")]["median_ms"])
    return rows, x


def print_table(rows, meta) -> None:
    print(f"# {meta['device_name']} | torch {meta['torch']} | ddetr "
          f"{meta['build_info']['version']} | {meta['threads']} threads | {meta['dtype']} | "
          f"load average {meta['loadavg_at_start'][0]:.1f} at start, "
          f"{meta['loadavg_at_end'][0]:.1f} at end")
    print(f"# image {meta['image'][0]}x{meta['image'][1]}, batch {meta['batch']}, C "
          f"{meta['channels']}, levels {meta['levels']}, {meta['tokens']} tokens; median of "
          f"{meta['rounds']} alternating calls")
    print("# x ref: reference time / this row's (> 1 = faster); bwd-views: the reference's "
          "gradients left as strided views")
    header = f"{'op':<8} {'impl':<10} {'pass':<10} {'ms':>9} {'x ref':>7} {'GB/s':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        x_ref = "" if r["x_ref"] is None else f"{r['x_ref']:.2f}"
        gbps = f"{r['gbps']:.1f}" if "gbps" in r else ""
        extra = (f"  ({r['x_ref_views']:.2f}x the reference's bwd-views)"
                 if "x_ref_views" in r else "")
        print(f"{r['op']:<8} {r['impl']:<10} {r['pass']:<10} {r['median_ms']:>9.3f} "
              f"{x_ref:>7} {gbps:>6}{extra}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if not ddetr.build_info()["native"]:
        print("warning: ddetr's native extension is missing; 'native' is the reference",
              file=sys.stderr)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": args.device, "device_name": device_name(args.device),
            "torch": torch.__version__, "build_info": ddetr.build_info(),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "extension_built": extension_built(), "threads": torch.get_num_threads(),
            "loadavg_at_start": os.getloadavg(), "dtype": args.dtype,
            "image": list(args.image), "batch": args.batch, "channels": args.channels,
            "levels": C.image_levels(*args.image), "rounds": args.rounds,
            "warmup": args.warmup, "argv": sys.argv[1:],
            "timing_method": "CUDA events" if args.device == "cuda" else "time.perf_counter"}
    rows, x = run(args)
    meta["tokens"] = x["tokens"]
    meta["loadavg_at_end"] = os.getloadavg()
    print_table(rows, meta)
    write_result(args.out, f"flatten_{args.device}", {"meta": meta, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
