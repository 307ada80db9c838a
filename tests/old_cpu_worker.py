"""Checks a portable build on the CPU it runs on: the MSDA copies it picks (the ones named
in the EXPECT environment variable), the op against the float64 reference in float32 and
float64 with gradients, the GEMM kernels' self-checks, and a small detector's forward.
Started by tests/test_old_cpus.py under qemu's user mode with an older CPU model.

    EXPECT=generic,avx2 python -m tests.old_cpu_worker
"""

from __future__ import annotations

import os

import torch

import ddetr
from ddetr import DeformableDetr
from ddetr._native import gemm, msda
from ddetr.ops import ms_deform_attn, ms_deform_attn_reference
from tests.ops.msda_cases import Case, make_inputs

# D = 32: the AVX2 and AVX-512 copies run their vector loops
CASE = Case(((9, 11), (5, 6)), n=2, m=4, d=32, lq=7, p=3)


def check_msda() -> None:
    # points inside and outside the maps
    value, shapes, start, loc, attn = make_inputs(CASE, torch.float64, kind="random")
    # The reference in float64 only: under qemu, torch's own float32 grid_sample
    # (AVX2 gathers) was measured wrong while its float64 path was right.
    leaves64 = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(leaves64[0], shapes, start, leaves64[1], leaves64[2])
    ref_grads = torch.autograd.grad(ref.sum(), leaves64)
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        leaves = [t.to(dtype).requires_grad_() for t in (value, loc, attn)]
        out = ms_deform_attn(leaves[0], shapes, start, leaves[1], leaves[2])
        grads = torch.autograd.grad(out.sum(), leaves)
        assert (out.double() - ref).abs().max() < tol, (dtype, "output")
        for name, g, r in zip(("value", "loc", "attn"), grads, ref_grads):
            assert (g.double() - r).abs().max() < 10 * tol, (dtype, name)


def main() -> None:
    info = ddetr.build_info()
    passes = msda.cpu_passes()
    print("passes:", passes, "bf16 GEMM:", info["gemm_bf16_kernel"], "int8 GEMM:",
          info["gemm_int8_kernel"], flush=True)
    assert passes == os.environ["EXPECT"].split(","), passes
    check_msda()
    assert gemm.int8_kernel_agrees(info["gemm_int8_kernel"])
    if info["gemm_bf16_kernel"] != "widen":
        assert gemm.bf16_kernel_agrees(info["gemm_bf16_kernel"])
    model = DeformableDetr(num_classes=3, backbone="resnet18").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert torch.isfinite(out["pred_boxes"]).all() and torch.isfinite(out["pred_logits"]).all()
    print("ok", flush=True)


if __name__ == "__main__":
    main()
