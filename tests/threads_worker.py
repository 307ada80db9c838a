"""Runs one family of native ops at 1 thread and at every thread count of THREADS, over
head counts and batch sizes, and exits non-zero naming each result that is not bitwise
equal to the 1-thread one. Started by tests/test_threads.py in a subprocess under a
timeout, so a kernel that hangs at some thread count fails instead of stalling the run.

    python -m tests.threads_worker {msda,msda_passes,flatten,layers,linear,int8,dropout}
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ddetr.models.transformer_layers import (DeformableTransformerDecoderLayer,
                                             DeformableTransformerEncoderLayer)
from ddetr.ops import (dropout, encoder_reference_points, flatten_multiscale, linear,
                       ms_deform_attn, relu_dropout)
from ddetr.models import native_layers
from ddetr.ops.int8 import int8_linear, pack, quantize_weight
from ddetr._native.gemm import int8_kernel_supported
from ddetr.ops.native_layers import library_ready

THREADS = (2, 3, 5, 6, 7, 8, 12, 16)  # compared with 1 thread
HEADS = (1, 3, 5, 8)
BATCHES = (1, 2, 3)
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    # bit patterns, so NaN == NaN and -0.0 != 0.0
    return t.detach().contiguous().view(_BITS[t.element_size()])


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return [out, *torch.autograd.grad(out, leaves, g)]


def compare(name: str, run: Callable[[], list[torch.Tensor]]) -> list[str]:
    """Names of the results of `run` that differ from 1 thread at some thread count."""
    torch.set_num_threads(1)
    base = [_bits(t) for t in run()]
    failures = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for i, (a, b) in enumerate(zip(base, run())):
            if not torch.equal(a, _bits(b)):
                failures.append(f"{name}: result {i} differs at {threads} threads")
    return failures


def _rand(g: torch.Generator, *shape, dtype=torch.float32, lo=0.0, hi=1.0) -> torch.Tensor:
    t = torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
    return t.to(dtype).requires_grad_()


def msda_cases():
    shapes = [(16, 20), (8, 10)]  # 1,100 queries: the backward's strip order is on
    s = sum(h * w for h, w in shapes)
    for m in HEADS:
        for n in BATCHES:
            dtypes = (torch.float32, torch.float64, torch.bfloat16) if m in (5, 8) \
                else (torch.float32,)
            for dtype in dtypes:
                def run(m=m, n=n, dtype=dtype):
                    g = torch.Generator().manual_seed(0)
                    value = _rand(g, n, s, m, 8, dtype=dtype, lo=-1)
                    loc = _rand(g, n, 1100, m, 2, 4, 2, lo=-0.1, hi=1.1)
                    attn = _rand(g, n, 1100, m, 2, 4)
                    out = ms_deform_attn(value, shapes, None, loc, attn)
                    return _grads(out, [value, loc, attn])
                yield f"msda M{m} N{n} {dtype}", run


def msda_pass_cases():
    """Each vector pass this build has (the forward's and the backward's per-sample
    channel loops), forced (the AVX2 / AVX-512 passes
    take head sizes that are multiples of 8 / 16)."""
    from ddetr.ops import msda_tuning
    shapes = [(16, 20), (8, 10)]
    s = sum(h * w for h, w in shapes)
    for name in msda_tuning.msda_tuning()["passes"]:
        for m, n, d, dtype in ((8, 1, 32, torch.float32), (3, 2, 16, torch.bfloat16),
                               (5, 1, 8, torch.float32)):
            def run(name=name, m=m, n=n, d=d, dtype=dtype):
                msda_tuning.set_msda_tuning(vector_pass=name)
                try:
                    g = torch.Generator().manual_seed(0)
                    value = _rand(g, n, s, m, d, dtype=dtype, lo=-1)
                    loc = _rand(g, n, 1100, m, 2, 4, 2, lo=-0.1, hi=1.1)
                    attn = _rand(g, n, 1100, m, 2, 4)
                    out = ms_deform_attn(value, shapes, None, loc, attn)
                    return _grads(out, [value, loc, attn])
                finally:
                    msda_tuning.set_msda_tuning(vector_pass="auto")
            yield f"msda pass {name} M{m} N{n} D{d} {dtype}", run


def flatten_cases():
    sizes = [(40, 48), (20, 24), (10, 12)]  # 2 * N * S * C >= 2^20: the thread team runs
    for n in BATCHES:
        def run(n=n):
            g = torch.Generator().manual_seed(0)
            feats = [_rand(g, n, 128, h, w, lo=-1) for h, w in sizes]
            pos = [_rand(g, n, 128, h, w, lo=-1) for h, w in sizes]
            level = _rand(g, len(sizes), 128)
            masks = [torch.zeros(n, h, w, dtype=torch.bool) for h, w in sizes]
            for mask in masks:
                mask[-1, :, mask.shape[2] * 2 // 3:] = True
            flat = flatten_multiscale(feats, masks, pos, level)
            ref = encoder_reference_points(flat.spatial_shapes, flat.valid_ratios)
            out = torch.cat([flat.src, flat.pos], -1)
            return [ref, *_grads(out, feats + pos + [level])]
        yield f"flatten N{n}", run


def _layer(kind: str, m: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = DeformableTransformerEncoderLayer if kind == "encoder" \
        else DeformableTransformerDecoderLayer
    layer = cls(120, 200, 0.1, "relu", 2, m, 4)  # D = 120 / m: 120, 40, 24, 15
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer.to(dtype).train()


def layer_cases():
    shapes = torch.tensor([(24, 30), (12, 15)])
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    for kind in ("encoder", "decoder"):
        for m in HEADS:
            for n in BATCHES:
                dtypes = (torch.float32, torch.bfloat16) if m == 8 else (torch.float32,)
                for dtype in dtypes:
                    def run(kind=kind, m=m, n=n, dtype=dtype):
                        layer = _layer(kind, m, dtype)
                        g = torch.Generator().manual_seed(1)
                        lq = s if kind == "encoder" else 300
                        x, pos = _rand(g, n, lq, 120, dtype=dtype), _rand(g, n, lq, 120, dtype=dtype)
                        ref = _rand(g, n, lq, 2, 2, dtype=torch.float32)
                        torch.manual_seed(3)  # the dropout masks
                        if kind == "encoder":
                            leaves = [x, pos, ref]
                            out = native_layers.encoder_layer(layer, x, pos, ref, shapes, None)
                        else:
                            memory = _rand(g, n, s, 120, dtype=dtype, lo=-1)
                            leaves = [x, pos, ref, memory]
                            out = native_layers.decoder_layer(layer, x, pos, ref, memory,
                                                              shapes, None)
                        return _grads(out, leaves + list(layer.parameters()))
                    yield f"{kind} layer M{m} N{n} {dtype}", run
    # 3 images of 8 blocks of 2048 rows: at up to 6 threads (4 blocks a thread) the
    # forward runs its blocks side by side on one-thread primitives, above that on the team
    big = torch.tensor([(128, 120), (32, 32)])
    for m in (5, 8):
        def run_big(m=m):
            layer = _layer("encoder", m, torch.float32)
            g = torch.Generator().manual_seed(1)
            lq = int((big[:, 0] * big[:, 1]).sum())
            x, pos = _rand(g, 3, lq, 120), _rand(g, 3, lq, 120)
            ref = _rand(g, 3, lq, 2, 2)
            torch.manual_seed(3)
            out = native_layers.encoder_layer(layer, x, pos, ref, big, None)
            return _grads(out, [x, pos, ref] + list(layer.parameters()))
        yield f"encoder layer M{m} N3 24 blocks", run_big


def linear_cases():
    for rows in (1, 3, 517, 1531):
        for dtype in (torch.float32, torch.float64):
            def run(rows=rows, dtype=dtype):
                g = torch.Generator().manual_seed(0)
                x, w = _rand(g, rows, 257, dtype=dtype, lo=-1), _rand(g, 301, 257, dtype=dtype, lo=-1)
                b = _rand(g, 301, dtype=dtype)
                return _grads(linear(x, w, b, relu=True), [x, w, b])
            yield f"linear rows {rows} {dtype}", run


def int8_cases():
    for kernel in [k for k in ("scalar", "avx2", "avx512_vnni") if int8_kernel_supported(k)]:
        for rows in (1, 5, 517, 1531):
            def run(rows=rows, kernel=kernel):
                g = torch.Generator().manual_seed(0)
                x, w = _rand(g, rows, 257, lo=-1), _rand(g, 301, 257, lo=-1)
                w_q, w_scale = quantize_weight(w)
                out = int8_linear(x, w_q, w_scale, _rand(g, 301).detach(), relu=True,
                                  packed=pack(w_q, kernel))
                return _grads(out, [x])
            yield f"int8 linear rows {rows} {kernel}", run


def dropout_cases():
    for numel in (65_537, 1_000_003):
        for dtype in (torch.float32, torch.bfloat16):
            for fn in (dropout, relu_dropout):
                def run(numel=numel, dtype=dtype, fn=fn):
                    x = _rand(torch.Generator().manual_seed(0), numel, dtype=dtype, lo=-1)
                    torch.manual_seed(5)
                    return _grads(fn(x, 0.3), [x])
                yield f"{fn.__name__} {numel} {dtype}", run


FAMILIES = {"msda": msda_cases, "msda_passes": msda_pass_cases, "flatten": flatten_cases, "layers": layer_cases,
            "linear": linear_cases, "int8": int8_cases, "dropout": dropout_cases}


def main(family: str) -> int:
    if not library_ready(torch.zeros(1)):
        print("native extension or OpenBLAS missing")
        return 2
    failures = [f for name, run in FAMILIES[family]() for f in compare(name, run)]
    print("\n".join(failures) or "all bitwise equal")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
