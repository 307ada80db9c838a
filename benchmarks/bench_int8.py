"""The int8 CPU GEMM (ddetr's gemm_int8, behind ``Int8Linear``) at the transformer's
linear shapes, against float32, in ms and GOP/s (2 M N K operations per GEMM):

* ``int8``: ddetr's int8 kernel as ``Int8Linear`` runs it: float32 x in, quantised per
  row inside, int32 sums, float32 out with the bias (weights packed beforehand, once);
* ``int8-preq``: the same GEMM on activations already int8 (the quantisation's share);
* ``sgemm``: OpenBLAS's float32 GEMM with the bias, through ddetr's binding (what
  ``ddetr.ops.linear`` runs);
* ``torch``: ``torch.nn.functional.linear`` in float32.

Shapes are M x K x N (rows, in_features, out_features): 340 and 22223 encoder tokens
(a 128 x 256 and the paper's 800 x 1333 image), 300 decoder queries, and d_model 64 or
256 with FFN widths 256 / 1024. The candidates run interleaved (one call each per
round, in rotating order) so a noisy machine slows them alike; figures are medians over
``--repeats`` rounds. Prints a table and writes JSON under ``--out``.
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
import torch.nn.functional as F  # noqa: E402

import ddetr  # noqa: E402
from ddetr import _native  # noqa: E402
from ddetr._native import gemm as native_gemm  # noqa: E402
from ddetr.ops import int8 as ops_int8  # noqa: E402
from _common import device_name, extension_built, git, write_result  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ("int8", "int8-preq", "sgemm", "torch")
SHAPES = ((340, 64, 256), (340, 256, 64), (22223, 256, 256), (300, 256, 1024),
          (300, 1024, 256), (22223, 256, 1024))
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per shape")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument("--kernel", default="auto", choices=native_gemm.INT8_KERNELS)
    p.add_argument("--quick", action="store_true", help="the first four shapes only")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    return p.parse_args(argv)


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS /proc/cpuinfo lists."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in flags]


def make_calls(m: int, k: int, n: int, kernel: str) -> dict:
    """One zero-argument callable per implementation, on shared random operands."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5,
               torch.randn(n, generator=g))
    w_q, w_scale = ops_int8.quantize_weight(w)
    x_q, x_scale = ops_int8.quantize_rows(x)
    packed = ops_int8.pack(w_q, kernel)
    out = torch.empty(m, n)
    return {"int8": lambda: native_gemm.gemm_int8(x, packed, w_scale, out, b),
            "int8-preq": lambda: native_gemm.gemm_int8(x_q, packed, w_scale, out, b,
                                                       a_scale=x_scale),
            "sgemm": lambda: native_gemm.gemm(x, w, False, True, out, b),
            "torch": lambda: F.linear(x, w, b)}


def measure(m: int, k: int, n: int, impls, args) -> dict:
    calls = make_calls(m, k, n, args.kernel)
    times = {name: [] for name in impls}
    for r in range(args.warmup + args.repeats):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ops = 2.0 * m * n * k
    return {name: {"median_ms": 1e3 * statistics.median(t),
                   "gops": ops / statistics.median(t) / 1e9,
                   "best_gops": ops / min(t) / 1e9} for name, t in times.items()}


def run(args) -> dict:
    impls = list(IMPLS)
    if not native_gemm.blas_available():
        print("OpenBLAS not loaded: no sgemm column", file=sys.stderr)
        impls.remove("sgemm")
    shapes = SHAPES[:4] if args.quick else SHAPES
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for m, k, n in shapes:
            rows.append({"M": m, "K": k, "N": n, "threads": threads,
                         **measure(m, k, n, impls, args)})
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device_name": device_name("cpu"), "cpu_flags": cpu_flags(),
            "int8_kernel": args.kernel if args.kernel != "auto" else native_gemm.int8_kernel(),
            "torch": torch.__version__, "build_info": ddetr.build_info(),
            "git_commit": git("rev-parse", "HEAD"), "extension_built": extension_built(),
            "loadavg": os.getloadavg(), "repeats": args.repeats, "warmup": args.warmup,
            "impls": impls, "argv": sys.argv[1:]}
    return {"meta": meta, "results": rows}


def print_table(result: dict) -> None:
    meta, impls = result["meta"], result["meta"]["impls"]
    print(f"# int8 GEMM ({meta['int8_kernel']} kernel), ms and GOP/s (median of "
          f"{meta['repeats']}), {meta['device_name']}, flags: {' '.join(meta['cpu_flags'])}")
    print(f"{'threads':>7} {'M x K x N':>18} " + " ".join(f"{i:>17}" for i in impls) +
          "  int8/sgemm int8/torch")
    for row in result["results"]:
        shape = f"{row['M']} x {row['K']} x {row['N']}"
        line = f"{row['threads']:>7} {shape:>18} " + " ".join(
            f"{row[i]['median_ms']:>8.3f} {row[i]['gops']:>8.1f}" for i in impls)
        fast = row["int8"]["median_ms"]
        if "sgemm" in impls:
            line += f"  {row['sgemm']['median_ms'] / fast:>9.2f}x"
        print(line + f" {row['torch']['median_ms'] / fast:>9.2f}x")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not _native.available():
        sys.exit("the ddetr extension is not built")
    if not native_gemm.int8_kernel_supported(args.kernel):
        sys.exit(f"--kernel {args.kernel}: this CPU cannot run that int8 kernel")
    result = run(args)
    print_table(result)
    write_result(args.out, "gemm_int8_cpu", result)


if __name__ == "__main__":
    main()
