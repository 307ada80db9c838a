"""Deployment benchmark: the exported detector in ONNX Runtime against ddetr eager,
ddetr under torch.compile and transformers, batch-1 CPU inference, side by side.

The paper-size model (ResNet-50, 6 + 6 layers, d_model 256, 300 queries, 91 classes)
with the weights of a randomly initialised ``transformers.DeformableDetrForObjectDetection``
(converted with ``ddetr.convert.from_hf``, as ``bench_model.py`` does). ddetr writes one
``--dynamic`` ONNX file (``ddetr.export.to_onnx``, standard operations) that serves
every ``--sizes`` entry; ONNX Runtime runs it on the CPU execution provider with as
many threads as torch. Checked first: ONNX Runtime's logits and boxes against ddetr
eager's at every size (max difference reported). Then, at every size: the median of
``--repeats`` calls after ``--warmup`` untimed ones, each implementation in turn, in
this one process.

Prints a table and writes JSON under ``--out``.
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

import ddetr  # noqa: E402
from ddetr.export import to_onnx  # noqa: E402
from _common import device_name, extension_built, git, time_step, write_result  # noqa: E402
from bench_model import build_models  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("transformers", "ddetr", "ddetr-compile", "onnxruntime")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["512x512", "800x1333"],
                   help="image sizes HxW, batch 1 (default 512x512 800x1333)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime threads "
                                                          "(default: torch's)")
    p.add_argument("--no_compile", "--no-compile", dest="no_compile", action="store_true",
                   help="leave out ddetr under torch.compile (its compilation takes minutes)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 128x128 and 160x224, 1 repeat, no torch.compile")
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.no_compile = ["128x128", "160x224"], 1, 0, True
    args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    return args


def ort_session(path: str, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def steps(hf, ours, compiled, session, size) -> dict:
    """One batch-1 call per implementation at ``size``, outputs as numpy-comparable."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *size, generator=gen)
    mask = torch.zeros(1, *size, dtype=torch.bool)
    feed = {"images": x.numpy(), "mask": mask.numpy()}

    def call(model):
        def step():
            with torch.no_grad():
                return model(x, mask)
        return step

    def hf_step():
        with torch.no_grad():
            return hf(pixel_values=x, pixel_mask=(~mask).long())

    out = {"transformers": hf_step, "ddetr": call(ours),
           "onnxruntime": lambda: session.run(None, feed)}
    if compiled is not None:
        out["ddetr-compile"] = call(compiled)
    return out


def parity(step_ours, step_ort) -> dict:
    ref, got = step_ours(), step_ort()
    return {"max_abs_logits": float((torch.from_numpy(got[0]) - ref["pred_logits"]).abs().max()),
            "max_abs_boxes": float((torch.from_numpy(got[1]) - ref["pred_boxes"]).abs().max())}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    hf, ours = build_models(torch.device("cpu"))
    hf.eval(), ours.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ddetr.onnx")
        print("exporting the dynamic ONNX file ...", flush=True)
        t0 = time.perf_counter()
        to_onnx(ours, path, dynamic=True, height=args.sizes[0][0], width=args.sizes[0][1])
        export_s = time.perf_counter() - t0
        size_mb = os.path.getsize(path) / 1e6
        print(f"  {export_s:.0f} s, {size_mb:.0f} MB", flush=True)
        session = ort_session(path, threads)
    compiled = None if args.no_compile else torch.compile(ours)
    rows = []
    for size in args.sizes:
        calls = steps(hf, ours, compiled, session, size)
        row = {"size": list(size), "parity": parity(calls["ddetr"], calls["onnxruntime"]),
               "median_ms": {}, "times_ms": {}}
        print(f"  {size[0]}x{size[1]}: onnxruntime vs ddetr {row['parity']}", flush=True)
        if compiled is not None:
            t0 = time.perf_counter()
            calls["ddetr-compile"]()
            row["compile_s"] = time.perf_counter() - t0
        for impl in IMPLS:
            if impl not in calls:
                continue
            times = time_step(calls[impl], torch.device("cpu"), args.warmup, args.repeats)
            row["times_ms"][impl], row["median_ms"][impl] = times, statistics.median(times)
            print(f"  {size[0]}x{size[1]} {impl:<14} {row['median_ms'][impl]:10.1f} ms",
                  flush=True)
        rows.append(row)
    return {"rows": rows, "export_s": export_s, "onnx_mb": size_mb, "threads": threads}


def print_table(result: dict) -> None:
    print(f"\n(batch 1, {result['threads']} threads; speed-up: transformers / that one; "
          f"vs ddetr: ddetr eager / that one)")
    print(f"{'size':<10} {'implementation':<15} {'time':>11} {'speed-up':>9} {'vs ddetr':>9}")
    for r in result["rows"]:
        ms = r["median_ms"]
        for impl in IMPLS:
            if impl in ms:
                print(f"{r['size'][0]}x{r['size'][1]:<6} {impl:<15} {ms[impl]:8.1f} ms "
                      f"{ms['transformers'] / ms[impl]:8.2f}x {ms['ddetr'] / ms[impl]:8.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    started = datetime.datetime.now()
    result = run(args)
    print_table(result)
    import onnxruntime
    record = {
        "benchmark": "bench_export", "started": started.isoformat(timespec="seconds"),
        "device": device_name("cpu"), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": __import__("transformers").__version__,
        "build_info": ddetr.build_info(), "extension_built": extension_built(),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "args": {k: v for k, v in vars(args).items() if k != "out"}, **result}
    write_result(args.out, f"export_cpu{'_quick' if args.quick else ''}", record)


if __name__ == "__main__":
    main()
