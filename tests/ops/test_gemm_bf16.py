"""The native bfloat16 GEMM (ddetr/blas.h gemm_bf16, through ddetr._native.gemm.gemm_sizes
with bfloat16 operands), every implementation: the AMX kernel (on CPUs with AMX-BF16), the
same kernel with its tile instructions emulated in C++ (on any CPU with AVX512-BF16: its
packing, blocking and epilogue), the AVX512-BF16 kernel and the widening fallback (bf16
widened to float, OpenBLAS sgemm), against float64 matmul of the same bf16 values.

Tolerances. The sums are float, so a float C may differ from the float64 result by the
float rounding of the sum: at most err = 1e-5 x (sum_k |a_k b_k| + |beta C| + |bias|)
(the size of the terms, which bounds the error even where they cancel). A bf16 C must be
the float64 result rounded to bf16, except where that result lies within err of a
rounding boundary (a tie the float sum may fall either side of): there the neighbouring
bf16 value is accepted too, and such elements must be rare (at most 1%).
"""

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch

from ddetr import _native
from ddetr._native import gemm as native_gemm
from ddetr.ops.blas import blas_available

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")

SIZES = (1, 2, 3, 15, 16, 17, 31, 33, 100, 257)
TOL = 1e-5


def _avx512_ok() -> bool:
    return _native.available() and native_gemm.bf16_avx512_supported()


def _amx_ok() -> bool:
    return _native.available() and native_gemm.bf16_amx_supported()


NO_AVX512 = "this CPU lacks AVX512-BF16 (avx512_bf16)"
NO_AMX = "this CPU lacks AMX-BF16 tiles (amx_bf16), or the OS does not grant them"
KERNELS = [
    pytest.param("amx", marks=pytest.mark.skipif(not _amx_ok(), reason=NO_AMX)),
    pytest.param("amx_emulated", marks=pytest.mark.skipif(not _avx512_ok(), reason=NO_AVX512)),
    pytest.param("avx512", marks=pytest.mark.skipif(not _avx512_ok(), reason=NO_AVX512)),
    pytest.param("widen", marks=pytest.mark.skipif(
        not blas_available(), reason="scipy-openblas32 is not loaded")),
]


WS = native_gemm.Workspace() if _native.available() else None


def gemm(kernel, a, b, c, m, n, k, trans_a, trans_b, beta=0.0, bias=None, relu=False,
         threads=2):
    """c[:, :n] = act(op(a) op(b) + beta c + bias) in place; leading dimensions are the
    tensors' row lengths (which may exceed the rows used)."""
    native_gemm.gemm_sizes(a, b, c, m=m, n=n, k=k, lda=a.shape[1], ldb=b.shape[1],
                           ldc=c.shape[1], trans_a=trans_a, trans_b=trans_b, beta=beta,
                           bias=bias, relu=relu, threads=threads, kernel=kernel, workspace=WS)


def make_case(m, n, k, trans_a, trans_b, beta, bias, relu, c_float, pad, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((k, m + pad) if trans_a else (m, k + pad), generator=g).bfloat16()
    b = torch.randn((n, k + pad) if trans_b else (k, n + pad), generator=g).bfloat16()
    c = torch.randn(m, n + pad, generator=g).to(torch.float32 if c_float else torch.bfloat16)
    bias_t = torch.randn(n, generator=g).bfloat16() if bias else None
    op_a = (a.double()[:, :m].t() if trans_a else a.double()[:, :k])
    op_b = (b.double()[:, :k].t() if trans_b else b.double()[:, :n])
    c_old = c.double()[:, :n]
    ref = op_a @ op_b + beta * c_old
    scale = op_a.abs() @ op_b.abs() + abs(beta) * c_old.abs()
    if bias:
        ref, scale = ref + bias_t.double(), scale + bias_t.double().abs()
    if relu:
        ref = ref.clamp_min(0)
    return a, b, c, bias_t, ref, scale


def check_bf16(got, ref, scale, relu):
    """got (bf16) is the rounding of some x within the float error of ref (rounding and
    ReLU are monotonic, so x's range maps to a range of bf16 values), and off the
    rounding of ref itself only rarely (ties)."""
    err = TOL * scale
    lo, hi = ref - err, ref + err
    if relu:
        lo = lo.clamp_min(0)
    g = got.double()
    assert ((g >= lo.to(torch.bfloat16).double()) & (g <= hi.to(torch.bfloat16).double())).all()
    assert (got != ref.to(torch.bfloat16)).double().mean().item() <= 0.01


def run_and_check(kernel, m, n, k, trans_a, trans_b, beta, bias, relu, c_float, pad, seed,
                  threads=2):
    a, b, c, bias_t, ref, scale = make_case(m, n, k, trans_a, trans_b, beta, bias, relu,
                                            c_float, pad, seed)
    out = c.clone()
    gemm(kernel, a, b, out, m, n, k, trans_a, trans_b, beta, bias_t, relu, threads)
    assert torch.equal(out[:, n:], c[:, n:]), "columns past N were written"
    got = out[:, :n]
    if c_float:
        assert ((got.double() - ref).abs() <= TOL * scale).all()
    else:
        check_bf16(got, ref, scale, relu)
    return out


def random_cases(count, seed):
    rng = random.Random(seed)
    for i in range(count):
        yield (rng.choice(SIZES), rng.choice(SIZES), rng.choice(SIZES), rng.random() < 0.5,
               rng.random() < 0.5, rng.choice((0.0, 1.0)), rng.random() < 0.5,
               rng.random() < 0.5, rng.random() < 0.5, rng.choice((0, 3)), seed * 1000 + i)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product((False, True), repeat=2)))
@pytest.mark.parametrize("c_float", [False, True])
def test_sizes_against_float64(kernel, trans_a, trans_b, c_float):
    # every size on every dimension once, the other options varying with it
    for i, s in enumerate(SIZES):
        for dims in ((s, 17, 33), (31, s, 16), (15, 100, s)):
            run_and_check(kernel, *dims, trans_a, trans_b, beta=float(i % 2), bias=i % 3 == 0,
                          relu=i % 4 == 1, c_float=c_float, pad=3 * (i % 2), seed=i)


@pytest.mark.parametrize("kernel", KERNELS)
def test_random_cases(kernel):
    for case in random_cases(60, seed=1):
        run_and_check(kernel, *case)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dims", [
    (40, 70, 1100),    # K split in two blocks (AVX512: partial sums wait in float)
    (33, 48, 2049),    # three K blocks, an odd last one
    (20, 600, 1024),   # N split in two blocks (the packed B is bounded)
    (500, 90, 64),     # many row panels between the threads
])
def test_blocking(kernel, dims):
    for trans_a, trans_b in itertools.product((False, True), repeat=2):
        run_and_check(kernel, *dims, trans_a, trans_b, beta=1.0, bias=True, relu=False,
                      c_float=trans_a, pad=1, seed=sum(dims))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("c_float", [False, True])
def test_empty_k(kernel, c_float):
    # K = 0: C = act(beta C + bias); null A and B are fine
    c = torch.randn(5, 7).to(torch.float32 if c_float else torch.bfloat16)
    bias = torch.randn(7).bfloat16()
    out = c.clone()
    native_gemm.gemm_sizes(None, None, out, m=5, n=7, k=0, lda=1, ldb=1, ldc=7, trans_b=True,
                           beta=1.0, bias=bias, relu=True, threads=2, dtype=torch.bfloat16,
                           kernel=kernel, workspace=WS)
    want = (c.double() + bias.double()).clamp_min(0)
    if c_float:
        assert torch.allclose(out.double(), want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, want.float().to(torch.bfloat16))


@pytest.mark.parametrize("kernel", KERNELS[:3])
@pytest.mark.parametrize("dims", [(257, 100, 33), (40, 70, 1100), (3, 600, 31)])
def test_independent_of_threads(kernel, dims):
    a, b, c, bias, _, _ = make_case(*dims, False, True, 1.0, True, False, False, 0, 7)
    outs = []
    for threads in (1, 2, 3, 7):
        out = c.clone()
        gemm(kernel, a, b, out, *dims, False, True, 1.0, bias, False, threads)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_check_auto_runs_before_amx(kernel):
    # "auto" trusts AMX only after this check: every kernel that works passes it
    if not _avx512_ok():
        pytest.skip(NO_AVX512)
    assert native_gemm.bf16_kernel_agrees(kernel)


def _kernel_in_subprocess(value):
    code = "from ddetr._native import gemm; print(gemm.bf16_kernel())"
    env = dict(os.environ, DDETR_BF16_GEMM=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


@pytest.mark.skipif(not _avx512_ok(), reason=NO_AVX512)
def test_auto_is_the_widest_and_env_forces_another():
    forced = os.environ.get("DDETR_BF16_GEMM")
    assert native_gemm.bf16_kernel() == forced or (
        not forced and native_gemm.bf16_kernel() == ("amx" if _amx_ok() else "avx512"))
    for value in ("widen", "avx512", "amx", "amx_emulated"):
        out = _kernel_in_subprocess(value)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == value


def test_env_names_a_kernel():
    out = _kernel_in_subprocess("fastest")
    assert out.returncode != 0
    assert "DDETR_BF16_GEMM" in out.stderr and "fastest" in out.stderr


@pytest.mark.skipif(_amx_ok(), reason="this CPU has AMX")
def test_amx_refused_without_tiles():
    a = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="AMX"):
        native_gemm.gemm_sizes(a, a, a.clone(), m=4, n=4, k=4, lda=4, ldb=4, ldc=4, threads=1,
                               workspace=WS, kernel="amx")


def test_bad_arguments():
    a = torch.zeros(4, 4, dtype=torch.bfloat16)
    c = torch.zeros(4, 4, dtype=torch.bfloat16)

    def call(**kw):
        args = dict(m=4, n=4, k=4, lda=4, ldb=4, ldc=4, threads=1, c_dtype=torch.bfloat16,
                    workspace=WS, kernel="auto")
        args.update(kw)
        native_gemm.gemm_sizes(a, a, c, **args)

    with pytest.raises(ValueError, match="workspace"):
        call(workspace=native_gemm.Workspace(1024))
    with pytest.raises(ValueError, match="workspace"):
        call(workspace=None)
    with pytest.raises(ValueError, match="kernel"):
        call(kernel="fast")
    with pytest.raises(ValueError, match="float32"):
        call(c_dtype=torch.float64)
    with pytest.raises(ValueError, match="leading dimension"):
        call(lda=3)
    with pytest.raises(ValueError, match="same dtype"):
        f = torch.zeros(4, 4)
        native_gemm.gemm_sizes(f, f, f, m=4, n=4, k=4, lda=4, ldb=4, ldc=4, threads=1,
                               c_dtype=torch.bfloat16)
    assert native_gemm.workspace_bytes(torch.float32) == 0
