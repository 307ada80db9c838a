"""Benchmark multi-scale deformable attention: native op vs pure-PyTorch reference vs dense.

What is measured, per shape x implementation x pass:

* implementations: ``native`` (``ddetr.ops.ms_deform_attn``), ``native-bf16v`` (the same
  with value in bfloat16, locations and weights float32; E1 only), ``reference``
  (``ms_deform_attn_reference``, grid_sample based) and ``dense``
  (``F.scaled_dot_product_attention`` over all tokens, q = k = v = the (N, M, S, D) tokens
  as in DETR's encoder; for the decoder shape D1, the 300 queries over all tokens);
* passes: ``fwd`` (under no_grad, as at inference) and ``fwd+bwd`` (forward, then the
  gradients w.r.t. value, locations and weights, or q, k, v for dense);
* shapes: E1 (batch 1, the four levels of an 800x1333 image, 8 heads of 32, 4 points,
  every one of the 22,223 tokens a query), E2 (E1 at batch 2), D1 (300 queries on the E1
  map) and a sweep of image sizes 256x256 ... 800x1333 (levels at strides 8, 16, 32, 64);
* sampling locations: ``realistic`` (each query's own pixel centre on its level,
  broadcast to all levels, plus Gaussian noise of 2 pixels of each level per level and
  point) and ``uniform`` in [0, 1] (no locality at all); weights softmax over L*P.

Ratios taken side by side (``x ref*``, CPU and CUDA, E1 / E2 / D1, unless ``--no-paired``):
a worker per (shape, native impl, pass) times the native op and the reference on the same
inputs in turns, ``--paired-rounds`` rounds of ``--repeats`` native calls and one reference
call, and reports the median of the rounds' ratios (``_common.measure_paired``); a drift of
the machine's speed during the run then moves both sides of a ratio alike.

Time: median of ``--repeats`` calls (``--slow-repeats`` for reference and dense) after
``--warmup`` untimed ones; perf_counter on CPU, CUDA events on GPU. Peak memory: each
(shape, impl, pass) runs in a fresh worker process (this script with ``--worker``), which
builds its inputs, does the timing, then makes one more call and reports its peak memory
over the inputs: on CPU the growth of the resident-set high-water mark (VmHWM, reset via
/proc/self/clear_refs, with glibc told to mmap every tensor so freed memory leaves the
resident set), on CUDA ``max_memory_allocated`` minus the inputs. Results: a table on
stdout, JSON and a PNG (time against tokens for the sweep) under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, _plot beside us

import torch  # noqa: E402

import ddetr  # noqa: E402
import _common as C  # noqa: E402
from _common import device_name, extension_built, git  # noqa: E402
import _plot  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW_IMPLS = ("reference", "dense")
COLORS = {"native": (31, 119, 180), "reference": (214, 39, 40), "dense": (44, 160, 44)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where tensors live and the kernels run")
    p.add_argument("--shapes", nargs="+", choices=("E1", "E2", "D1", "sweep"),
                   default=["E1", "E2", "D1", "sweep"], help="shape groups to run")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per native measurement")
    p.add_argument("--slow-repeats", type=int, default=3,
                   help="timed calls per reference / dense measurement (they take seconds)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--no-reference", action="store_true", help="skip the grid_sample reference")
    p.add_argument("--no-dense", action="store_true", help="skip dense SDPA attention")
    p.add_argument("--no-paired", action="store_true",
                   help="skip the side-by-side native / reference ratios (x ref*)")
    p.add_argument("--paired-rounds", type=int, default=5,
                   help="rounds of the side-by-side ratios (each: --repeats native calls, "
                        "one reference call)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                   default="float32", help="dtype of value (and q, k, v for dense)")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="directory for the JSON and PNG results")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 1 repeat, in-process: a smoke run of a few seconds")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of one worker per measurement "
                        "(faster start-up, memory figures less isolated; implied by --quick)")
    p.add_argument("--worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = args.slow_repeats = 1
        args.in_process = True
    return args


# ---------------------------------------------------------------- planning and running

def plan(args) -> list[dict]:
    """One job per (shape, impl, pass), in table order; sweep points identical to an
    already planned shape (800x1333 = E1) reuse its measurement instead of re-running."""
    groups = C.standard_shapes(args.quick)
    impls = ["native", "reference", "dense"]
    impls = [i for i in impls if not (i == "reference" and args.no_reference)
             and not (i == "dense" and args.no_dense)]
    jobs, seen = [], {}
    for group in ("E1", "E2", "D1", "sweep"):
        if group not in args.shapes:
            continue
        for shape in groups[group]:
            key = C.geometry_key(shape)
            names = impls[:1] + (["native-bf16v"] if group == "E1" and args.dtype != "bfloat16"
                                 else []) + impls[1:]
            for impl in names:
                for pass_ in C.PASSES:
                    jobs.append({"group": group, "shape": shape, "impl": impl, "pass": pass_,
                                 "reuse": seen.get((key, impl, pass_))})
                    seen.setdefault((key, impl, pass_), shape["name"])
    return jobs


def worker_spec(args, job) -> dict:
    return {"shape": job["shape"], "impl": job["impl"], "pass": job["pass"],
            "device": args.device, "dtype": args.dtype, "warmup": args.warmup,
            "repeats": args.slow_repeats if job["impl"] in SLOW_IMPLS else args.repeats,
            "isolated": not args.in_process}


def run_worker(spec: dict) -> dict:
    """Runs one measurement in a fresh interpreter; its last stdout line is the result."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        killed = " (killed: probably out of memory)" if proc.returncode < 0 else ""
        return {"ok": False, "error": f"worker rc={proc.returncode}{killed}: {tail[0][:160]}"}


def run_all(args, jobs) -> list[dict]:
    rows, done, t_start = [], {}, time.time()
    for i, job in enumerate(jobs, 1):
        name = f"{job['shape']['name']} {job['impl']} {job['pass']}"
        if job["reuse"]:
            result = dict(done[(job["reuse"], job["impl"], job["pass"])], reused=job["reuse"])
        else:
            spec = worker_spec(args, job)
            result = C.measure(spec) if args.in_process else run_worker(spec)
            result["repeats"] = spec["repeats"]
        done[(job["shape"]["name"], job["impl"], job["pass"])] = result
        rows.append({"group": job["group"], "shape": job["shape"]["name"], "impl": job["impl"],
                     "pass": job["pass"], **result})
        ms = result.get("median_ms", {})
        shown = ms.get("realistic", ms.get("dense"))
        status = f"{shown:.2f} ms" if result["ok"] else result["error"]
        print(f"[{i}/{len(jobs)} {time.time() - t_start:6.0f}s] {name}: {status}",
              file=sys.stderr, flush=True)
    return rows


def run_paired(args, rows, shapes) -> None:
    """x ref* for the native rows of E1, E2 and D1 that have a reference row: one worker
    each, native and reference in turns (see the module docstring); ``shapes`` by name."""
    if args.no_reference or args.no_paired:
        return
    for r in rows:
        if not (r["impl"].startswith("native") and r["group"] != "sweep" and r.get("ok")):
            continue
        spec = {"mode": "paired", "shape": shapes[r["shape"]], "impl": r["impl"],
                "pass": r["pass"],
                "device": args.device, "dtype": args.dtype, "warmup": args.warmup,
                "repeats": args.repeats, "rounds": args.paired_rounds}
        result = C.measure_paired(spec) if args.in_process else run_worker(spec)
        r["paired"] = result
        shown = f"{result['x_ref']:.1f}x" if result["ok"] else result["error"]
        print(f"[paired] {r['shape']} {r['impl']} {r['pass']}: {shown}", file=sys.stderr,
              flush=True)


# ---------------------------------------------------------------- figures and table

def primary_ms(row, kind="realistic"):
    """The row's median for a location kind; dense has one figure for every kind."""
    if not row.get("ok"):
        return None
    ms = row["median_ms"]
    return ms.get("dense") if row["impl"] == "dense" else ms.get(kind)


def add_ratios(rows, shapes_by_name, dtype) -> None:
    """x_ref / x_dense: the reference's / dense time over this row's (>1: this is faster),
    both measured in the same run; gather_gbps: nominal gather bytes / time (native)."""
    index = {(r["shape"], r["impl"], r["pass"]): r for r in rows}
    for r in rows:
        ref = index.get((r["shape"], "reference", r["pass"]))
        dense = index.get((r["shape"], "dense", r["pass"]))
        r["x_ref"], r["x_dense"], r["gather_gbps"] = {}, {}, {}
        for kind in C.LOC_KINDS:
            mine = primary_ms(r, kind)
            if mine is None or r["impl"] == "dense":
                continue
            if ref and primary_ms(ref, kind):
                r["x_ref"][kind] = primary_ms(ref, kind) / mine
            if dense and primary_ms(dense):
                r["x_dense"][kind] = primary_ms(dense) / mine
            if r["impl"].startswith("native"):
                nbytes = C.gather_bytes(shapes_by_name[r["shape"]], r["impl"], r["pass"],
                                        getattr(torch, dtype))
                r["gather_gbps"][kind] = nbytes / (mine * 1e-3) / 1e9
        if r["impl"] == "dense" and ref and primary_ms(ref) and primary_ms(r):
            r["x_ref"]["realistic"] = primary_ms(ref) / primary_ms(r)


def _fmt(value, spec) -> str:
    """Formats a figure, or blanks of the same width when there is none."""
    return " " * int(spec.split(".")[0]) if value is None else format(value, spec)


def print_table(rows, meta) -> None:
    print(f"# {meta['device_name']} | torch {meta['torch']} | ddetr {meta['build_info']['version']}"
          f" | {meta['threads']} threads | dtype {meta['dtype']} | load average "
          f"{meta['loadavg_at_start'][0]:.1f} at start, {meta['loadavg_at_end'][0]:.1f} at end")
    print(f"# time: median ms of {meta['repeats']} (native) / {meta['slow_repeats']} "
          f"(reference, dense) calls after {meta['warmup']} warm-up; ms = realistic "
          "locations, ms(unif) = uniform locations")
    print("# x ref / x dense: reference / dense time over this row's (>1 = faster), realistic "
          "locations; peak MB: " + meta["memory_method"])
    print("# GB/s: nominal bilinear gather bytes (4 corners x D per sample; x3 for fwd+bwd) "
          "/ time")
    print("# x ref*: the same ratio with native and reference timed in turns in one process "
          "(median of the rounds' ratios; see --paired-rounds)")
    header = (f"{'shape':<9} {'tokens':>7} {'queries':>7} {'impl':<13} {'pass':<8} {'ms':>10} "
              f"{'ms(unif)':>10} {'x ref':>7} {'x ref*':>7} {'x dense':>8} {'peak MB':>9} "
              f"{'GB/s':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        shp = meta["shapes"][r["shape"]]
        lead = (f"{r['shape']:<9} {shp['tokens']:>7} {shp['queries']:>7} {r['impl']:<13} "
                f"{r['pass']:<8}")
        if not r["ok"]:
            print(f"{lead} skipped: {r['error']}")
            continue
        unif = None if r["impl"] == "dense" else r["median_ms"].get("uniform")
        peak = r["peak_mb"].get("realistic", r["peak_mb"].get("dense"))
        paired = r.get("paired") or {}
        print(f"{lead} {_fmt(primary_ms(r), '10.2f')} {_fmt(unif, '10.2f')} "
              f"{_fmt(r['x_ref'].get('realistic'), '7.2f')} "
              f"{_fmt(paired.get('x_ref') if paired.get('ok') else None, '7.2f')} "
              f"{_fmt(r['x_dense'].get('realistic'), '8.2f')} {_fmt(peak, '9.1f')} "
              f"{_fmt(r['gather_gbps'].get('realistic'), '6.1f')}"
              + (f"  (= {r['reused']})" if r.get("reused") else ""))


def plot_sweep(rows, shapes, path, meta) -> bool:
    series = []
    for impl in ("native", "reference", "dense"):
        for pass_ in C.PASSES:
            pts = sorted((shapes[r["shape"]]["tokens"], primary_ms(r)) for r in rows
                         if r["group"] == "sweep" and r["impl"] == impl and r["pass"] == pass_
                         and primary_ms(r))
            series.append({"label": f"{impl} {pass_}", "xs": [p[0] for p in pts],
                           "ys": [p[1] for p in pts], "color": COLORS[impl],
                           "dashed": pass_ == "fwd"})
    if not any(s["xs"] for s in series):
        return False
    _plot.line_plot(series, path, f"MSDA sweep, {meta['device_name']}, {meta['dtype']} "
                    "(realistic locations; dashed = fwd, solid = fwd+bwd)",
                    "tokens = queries (sum of H_l * W_l, batch 1)", "time per call (ms)")
    return True


# ---------------------------------------------------------------- environment and main

def environment(args, shapes) -> dict:
    method = ("torch.cuda max_memory_allocated minus the inputs" if args.device == "cuda"
              else "peak RSS growth over the inputs (VmHWM after clear_refs reset")
    if args.device == "cpu":
        method += ")" if args.in_process else "; glibc mmap threshold 64 KiB)"
    method += " of one call after timing, " + (
        "in-process (approximate)" if args.in_process else "fresh worker process per row")
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": args.device, "device_name": device_name(args.device),
            "torch": torch.__version__, "build_info": ddetr.build_info(),
            "git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "extension_built": extension_built(), "threads": torch.get_num_threads(),
            "loadavg_at_start": os.getloadavg(),  # the machine may be shared: context for noise
            "dtype": args.dtype, "repeats": args.repeats, "slow_repeats": args.slow_repeats,
            "paired_rounds": None if args.no_paired or args.no_reference else args.paired_rounds,
            "warmup": args.warmup, "quick": args.quick, "argv": sys.argv[1:],
            "memory_method": method,
            "timing_method": "CUDA events" if args.device == "cuda" else "time.perf_counter",
            "locations": {"realistic": f"query's own pixel centre + N(0, {C.NOISE_PX} px of "
                                       "each level) per level and point",
                          "uniform": "uniform in [0, 1]"},
            "gather_bytes": "N*Lq*M*L*P * 4 corners * D * value element size, x3 for fwd+bwd",
            "shapes": shapes}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # child: one measurement, one JSON line
        spec = json.loads(args.worker)
        measure = C.measure_paired if spec.get("mode") == "paired" else C.measure
        print(json.dumps(measure(spec)), flush=True)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible to torch")
    if not ddetr.build_info()["native"]:
        print("warning: ddetr's native extension is missing; 'native' is the reference",
              file=sys.stderr)
    jobs = plan(args)
    shapes = {j["shape"]["name"]: j["shape"] for j in jobs}
    meta = environment(args, shapes)
    rows = run_all(args, jobs)
    run_paired(args, rows, shapes)
    meta["loadavg_at_end"] = os.getloadavg()
    add_ratios(rows, shapes, args.dtype)
    print_table(rows, meta)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"msda_{args.device}_{datetime.datetime.now():%Y%m%d-%H%M%S}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    wrote = [stem + ".json"] + ([stem + ".png"] if plot_sweep(rows, shapes, stem + ".png", meta)
                                else [])
    print("wrote " + ", ".join(wrote), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
