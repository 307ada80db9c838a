"""ddetr.ops.linear (OpenBLAS on the CPU) against torch's F.linear: outputs and all
gradients, the fused ReLU, every fallback, and module_linear's respect for hooks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddetr.ops import linear, module_linear
from ddetr.ops.blas import _linear_op, _mm_op, blas_available

needs_blas = pytest.mark.skipif(not blas_available(), reason="scipy-openblas32 is not loaded")

SHAPES = [((1, 1), 1), ((7,), 3), ((5, 33), 17), ((2, 300, 256), 384), ((3, 4, 65), 130),
          ((1000, 64), 257)]


@needs_blas
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_matches_torch(dtype, tol, shape, n, bias, relu):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(n, shape[-1], generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(n, generator=gen, dtype=dtype, requires_grad=True) if bias else None
    out = linear(x, w, b, relu=relu)
    ref = F.linear(x, w, b)
    ref = F.relu(ref) if relu else ref
    scale = ref.abs().max().item() + 1
    assert (out - ref).abs().max().item() <= tol * scale * shape[-1] ** 0.5
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for g, r in zip(got, want):
        assert (g - r).abs().max().item() <= tol * (r.abs().max().item() + 1) * max(shape) ** 0.5


@needs_blas
def test_gradcheck_float64():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: _linear_op(*t, False), (x, w, b))
    a = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: _mm_op(a, w, True, True), (a, w))


@needs_blas
def test_non_contiguous_inputs():
    x = torch.randn(40, 30).t()          # (30, 40), not contiguous
    w = torch.randn(40, 12).t()          # (12, 40)
    b = torch.randn(24)[::2]             # strided bias
    assert torch.allclose(linear(x, w, b), F.linear(x, w, b), atol=1e-5)


def test_fallbacks_equal_torch():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w = torch.randn(5, 8, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
    empty_k = torch.randn(4, 0)
    assert torch.equal(linear(empty_k, torch.randn(3, 0), torch.ones(3)), torch.ones(4, 3))


def test_module_linear_respects_hooks_and_subclasses():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(out))
    out = module_linear(layer, x)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], out)

    class Doubled(nn.Linear):
        def forward(self, t):
            return 2 * super().forward(t)

    doubled = Doubled(8, 4)
    assert torch.allclose(module_linear(doubled, x), 2 * F.linear(x, doubled.weight, doubled.bias))
    assert torch.allclose(module_linear(layer, x, relu=True), F.relu(layer(x)), atol=1e-6)
