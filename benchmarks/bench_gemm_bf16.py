"""The bfloat16 CPU GEMM (ddetr's gemm_bf16) at the encoder layer's shapes, against the
alternatives, in GFLOP/s (2 M N K flops per GEMM):

* ``amx``: ddetr's AMX kernel (the same packs, 32 x 32 tiles of TDPBF16PS), on CPUs with
  AMX-BF16;
* ``avx512``: ddetr's AVX512-BF16 kernel (packed bf16 pairs, VDPBF16PS), bf16 in, C bf16
  (linear shapes) or float (the weight-gradient shape, as the native layers use it);
* ``widen``: ddetr's fallback, bf16 panels widened to float and OpenBLAS's sgemm;
* ``torch``: ``torch.matmul`` on the same bf16 tensors (oneDNN on CPUs with AVX512-BF16);
* ``sgemm``: OpenBLAS's float32 GEMM through the same binding, on float32 copies.

Shapes: linear layers x (M, K) @ W^T (W (N, K), so op(B) is transposed) for M in
{2048, 22223} rows and (K, N) in (256, 256), (256, 768), (256, 1024), (1024, 256), plus
the weight gradient dy^T x with M = N = 256, K = 22223 rows (op(A) transposed). The
candidates run interleaved (one call each per round, in rotating order) so that a noisy
machine slows them alike; figures are medians over ``--repeats`` rounds. Prints a table
and writes JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common beside us

import torch  # noqa: E402

import ddetr  # noqa: E402
from ddetr import _native  # noqa: E402
from ddetr._native import gemm as native_gemm  # noqa: E402
from ddetr.ops.blas import blas_available  # noqa: E402
from _common import device_name, extension_built, git, write_result  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("amx", "avx512", "widen", "torch", "sgemm")
LINEAR_KN = ((256, 256), (256, 768), (256, 1024), (1024, 256))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2048, 22223],
                   help="M of the linear shapes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per shape")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    return p.parse_args(argv)


def shapes(rows) -> list[dict]:
    """(name, M, N, K, trans_a, trans_b, C float) of every benchmarked GEMM."""
    out = [{"name": "linear", "M": m, "N": n, "K": k, "trans_a": False, "trans_b": True,
            "c_float": False} for m in rows for k, n in LINEAR_KN]
    out.append({"name": "weight_grad", "M": 256, "N": 256, "K": 22223, "trans_a": True,
                "trans_b": False, "c_float": True})
    return out


def make_calls(s: dict, ws: native_gemm.Workspace, threads: int) -> dict:
    """One zero-argument callable per implementation, on shared random operands."""
    g = torch.Generator().manual_seed(0)
    m, n, k, ta, tb = s["M"], s["N"], s["K"], s["trans_a"], s["trans_b"]
    a = torch.randn((k, m) if ta else (m, k), generator=g).bfloat16()
    b = torch.randn((n, k) if tb else (k, n), generator=g).bfloat16()
    c_dtype = torch.float32 if s["c_float"] else torch.bfloat16
    c = torch.empty(m, n, dtype=c_dtype)
    a32, b32, c32 = a.float(), b.float(), torch.empty(m, n)
    op_a = a.t() if ta else a
    op_b = b.t() if tb else b

    def native(kernel):
        return lambda: native_gemm.gemm_sizes(
            a, b, c, m=m, n=n, k=k, lda=a.shape[1], ldb=b.shape[1], ldc=n, trans_a=ta,
            trans_b=tb, threads=threads, kernel=kernel, workspace=ws)

    def sgemm():
        native_gemm.gemm_sizes(a32, b32, c32, m=m, n=n, k=k, lda=a32.shape[1],
                               ldb=b32.shape[1], ldc=n, trans_a=ta, trans_b=tb, threads=threads)

    return {"amx": native("amx"), "avx512": native("avx512"), "widen": native("widen"),
            "torch": lambda: torch.matmul(op_a, op_b), "sgemm": sgemm}


def measure(s: dict, impls, ws: native_gemm.Workspace, args) -> dict:
    calls = make_calls(s, ws, args.threads)
    times = {name: [] for name in impls}
    for r in range(args.warmup + args.repeats):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt)
    flops = 2.0 * s["M"] * s["N"] * s["K"]
    return {name: {"median_ms": 1e3 * statistics.median(t),
                   "gflops": flops / statistics.median(t) / 1e9,
                   "best_gflops": flops / min(t) / 1e9} for name, t in times.items()}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    impls = list(args.impls)
    if not native_gemm.bf16_amx_supported() and "amx" in impls:
        print("this CPU lacks AMX-BF16 (or the OS does not grant it): no amx column",
              file=sys.stderr)
        impls.remove("amx")
    if not native_gemm.bf16_avx512_supported() and "avx512" in impls:
        print("this CPU lacks AVX512-BF16: no avx512 column", file=sys.stderr)
        impls.remove("avx512")
    if not blas_available():
        print("OpenBLAS not loaded: no widen / sgemm columns", file=sys.stderr)
        impls = [i for i in impls if i not in ("widen", "sgemm")]
    ws = native_gemm.Workspace()
    rows = [{**s, **measure(s, impls, ws, args)} for s in shapes(args.rows)]
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device_name": device_name("cpu"), "torch": torch.__version__,
            "build_info": ddetr.build_info(), "git_commit": git("rev-parse", "HEAD"),
            "extension_built": extension_built(), "threads": args.threads,
            "loadavg": os.getloadavg(), "repeats": args.repeats, "warmup": args.warmup,
            "impls": impls, "bf16_default_kernel": native_gemm.bf16_kernel(),
            "argv": sys.argv[1:]}
    return {"meta": meta, "results": rows}


def print_table(result: dict) -> None:
    meta, impls = result["meta"], result["meta"]["impls"]
    # the ratio columns: ddetr's fastest kernel here against the widening path and torch
    fast = next((k for k in ("amx", "avx512") if k in impls), None)
    if not {"widen", "torch"} <= set(impls):
        fast = None
    print(f"# bf16 GEMM, GFLOP/s (median of {meta['repeats']}), {meta['device_name']}, "
          f"{meta['threads']} threads")
    print(f"{'shape':12} {'M':>6} {'N':>5} {'K':>6} {'op':5} " +
          " ".join(f"{i:>8}" for i in impls) +
          (f"  {fast}/widen {fast}/torch" if fast else ""))
    for row in result["results"]:
        op = ("T" if row["trans_a"] else "N") + ("T" if row["trans_b"] else "N")
        line = (f"{row['name']:12} {row['M']:>6} {row['N']:>5} {row['K']:>6} {op:5} " +
                " ".join(f"{row[i]['gflops']:>8.1f}" for i in impls))
        if fast:
            line += (f"  {row[fast]['gflops'] / row['widen']['gflops']:>11.2f}x"
                     f" {row[fast]['gflops'] / row['torch']['gflops']:>11.2f}x")
        print(line)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not _native.available():
        sys.exit("the ddetr extension is not built")
    result = run(args)
    print_table(result)
    write_result(args.out, "gemm_bf16_cpu", result)


if __name__ == "__main__":
    main()
