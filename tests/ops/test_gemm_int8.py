"""The int8 GEMM (cpp/gemm_int8.cpp) and ``Int8Linear``: int32 sums exact against
``A_q.int() @ W_q.int().T`` for every kernel this CPU runs, the float epilogue to float32
rounding, the activations' quantisation equal to its torch formula, kernels and thread
counts bitwise equal, Int8Linear within the quantisation bound of nn.Linear, and bad
arguments named."""

import copy

import pytest
import torch
from torch import nn

import ddetr
from ddetr import _native
from ddetr.ops import Int8Linear, int8_linear, module_linear
from ddetr.ops import int8 as ops_int8

pytestmark = pytest.mark.skipif(not _native.available(), reason="native extension not built")

ALL_KERNELS = ("scalar", "avx2", "avx512_vnni", "amx", "amx_emulated")
if _native.available():
    from ddetr._native import gemm as native

    RUNS = [k for k in ALL_KERNELS if native.int8_kernel_supported(k)]
else:
    RUNS = []
# every kernel, those this CPU cannot run skipped with the reason
KERNELS = [pytest.param(k, marks=pytest.mark.skipif(k not in RUNS, reason=f"this CPU cannot "
                                                    f"run the {k} int8 kernel"))
           for k in ALL_KERNELS]

# (M, N, K): single elements, odd sizes off every block (6 or 8 rows, 16 or 32 columns,
# pairs and quads of K), exact blocks, K = 1 and a long K
SHAPES = [(1, 1, 1), (1, 33, 7), (7, 17, 1), (13, 37, 19), (6, 16, 8), (8, 32, 4),
          (23, 65, 131), (5, 100, 1024), (50, 3, 2)]


def _randint8(g, *shape):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


def _quantize_reference(x: torch.Tensor):
    """Symmetric int8 per row in torch: scale = max|x| / 127, q = round-half-even."""
    scale = x.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x / safe[:, None]).clamp(-127, 127)).masked_fill((scale == 0)[:, None], 0)
    return q.to(torch.int8), scale


def _gemm(a, w_q, w_scale, bias=None, relu=False, a_scale=None, kernel="auto"):
    out = torch.full((a.shape[0], w_q.shape[0]), float("nan"))
    native.gemm_int8(a, ops_int8.pack(w_q, kernel), w_scale, out, bias, relu, a_scale)
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int32_sums_are_exact(kernel, m, n, k):
    # int8 A with scales 1: C is the int32 sum itself, exact in float (|sum| <= 2^24)
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a, w = _randint8(g, m, k), _randint8(g, n, k)
    want = (a.int() @ w.int().T).float()
    got = _gemm(a, w, torch.ones(n), a_scale=torch.ones(m), kernel=kernel)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("value", [-128, 127])
def test_extreme_values_do_not_saturate(kernel, value):
    # every product (-128)(-128) = 2^14, or -128 * 127: the largest sums K can make
    k = 1024
    a = torch.full((7, k), -128, dtype=torch.int8)
    w = torch.full((19, k), value, dtype=torch.int8)
    w[3] = -128
    got = _gemm(a, w, torch.ones(19), a_scale=torch.ones(7), kernel=kernel)
    assert torch.equal(got, (a.int() @ w.int().T).float())
    assert got[0, 3].item() == 2 ** 24


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("relu", [False, True])
def test_float_activations_to_float32_rounding(kernel, relu):
    g = torch.Generator().manual_seed(3)
    m, n, k = 37, 45, 77
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 10
    w = _randint8(g, n, k)
    w_scale, bias = torch.rand(n, generator=g) / 100, torch.randn(n, generator=g)
    q, a_scale = _quantize_reference(x)
    # C = fma(float(sum), fl(a_scale * w_scale), bias): one rounding of the exact value
    s = (a_scale[:, None] * w_scale[None, :]).double()
    want = (q.int() @ w.int().T).double() * s + bias.double()
    want = want.clamp_min(0) if relu else want
    got = _gemm(x, w, w_scale, bias, relu, kernel=kernel)
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -24 + 1e-30).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_check_auto_runs_before_amx(kernel):
    # "auto" trusts AMX only after this check: every kernel passes it
    assert native.int8_kernel_agrees(kernel)


def test_kernels_agree_bitwise():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(29, 301, generator=g), _randint8(g, 70, 301)
    w_scale, bias = torch.rand(70, generator=g), torch.randn(70, generator=g)
    x[3] = 0.0
    outs = [_gemm(x, w, w_scale, bias, True, kernel=k) for k in RUNS]
    assert len(outs) >= 2  # scalar and at least one vector kernel on any x86 CPU
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_quantized_rows_equal_the_torch_formula():
    g = torch.Generator().manual_seed(5)
    # 37 columns: SIMD blocks of 8 and 16 and a tail
    x = torch.randn(9, 37, generator=g) * torch.logspace(-30, 30, 9)[:, None]
    x[0] = 0.0                                      # all zeros: scale 0, no NaN
    x[1, :5] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5])  # scale 1: ties to even
    x[1, 5:] = 0.0
    x[2] = 1e-45                                    # scale underflows to 0: q = 0
    q, scale = ops_int8.quantize_rows(x)
    q_ref, scale_ref = _quantize_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    assert q[1, :5].tolist() == [127, 0, 2, 2, 0]
    assert scale[0] == 0 and scale[2] == 0 and not q[0].any() and not q[2].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rows_give_nan_rows_only(bad):
    x = torch.randn(5, 40)
    x[2, 33] = bad  # in the scalar tail of the row
    x[4, 3] = bad   # in a SIMD block
    q, scale = ops_int8.quantize_rows(x)
    assert scale[[2, 4]].isnan().all() and not q[[2, 4]].any()
    w_q, w_scale = ops_int8.quantize_weight(torch.randn(6, 40))
    out = int8_linear(x, w_q, w_scale, torch.randn(6))
    assert out[[2, 4]].isnan().all() and out[[0, 1, 3]].isfinite().all()


def test_zero_rows_give_the_bias():
    w_q, w_scale = ops_int8.quantize_weight(torch.randn(20, 33))
    bias = torch.randn(20)
    out = int8_linear(torch.zeros(4, 33), w_q, w_scale, bias)
    assert torch.equal(out, bias.expand(4, 20))


def test_thread_counts_agree_bitwise():
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(517, 257, generator=g), torch.randn(301, 257, generator=g)
    layer = Int8Linear.from_linear(nn.Linear(257, 301))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 6, 2):
            torch.set_num_threads(threads)
            outs.append(module_linear(layer, x, relu=True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    del w


def _bound(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """|int8 layer - float layer| <= (w_scale sum|x| + x_scale sum|w dequantised|) / 2,
    plus float rounding (each x and w is off by at most half its step)."""
    x2 = x.reshape(-1, x.shape[-1])
    x_scale = x2.abs().amax(dim=1) / 127
    w = layer.weight_int8.float() * layer.weight_scale[:, None]
    half_steps = (layer.weight_scale[None, :] * x2.abs().sum(1, keepdim=True)
                  + x_scale[:, None] * w.abs().sum(1)[None, :]) / 2
    return (half_steps * 1.0001 + 1e-5).view(*x.shape[:-1], -1)


@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 64), (2, 300, 64)])
def test_int8_linear_within_the_quantisation_bound(shape):
    torch.manual_seed(7)
    lin = nn.Linear(64, 96)
    layer = Int8Linear.from_linear(lin)
    x = torch.randn(shape)
    got = layer(x)
    assert got.shape == (*shape[:-1], 96)
    err = (got - lin(x)).abs()
    assert (err <= _bound(x, layer)).all()
    assert err.max() > 0  # (it is int8: not the float layer)
    assert torch.equal(module_linear(layer, x, relu=True), torch.relu(got))


def test_int8_linear_state_dict_and_repacking():
    lin = nn.Linear(16, 8)
    layer = Int8Linear.from_linear(lin)
    assert set(layer.state_dict()) == {"weight_int8", "weight_scale", "bias"}
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    x = torch.randn(5, 16)
    first = layer(x)
    other = Int8Linear.from_linear(nn.Linear(16, 8))
    layer.load_state_dict(other.state_dict())  # in place: the pack must follow
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), first)
    assert torch.equal(copy.deepcopy(layer)(x), other(x))
    none = Int8Linear.from_linear(nn.Linear(16, 8, bias=False))
    assert none.bias is None and none(x).shape == (5, 8)


def test_gradient_reaches_the_input():
    layer = Int8Linear.from_linear(nn.Linear(12, 6))
    x = torch.randn(4, 12, requires_grad=True)
    grad = torch.randn(4, 6)
    module_linear(layer, x, relu=True).backward(grad)
    out = layer(x.detach())
    w = layer.weight_int8.float() * layer.weight_scale[:, None]
    torch.testing.assert_close(x.grad, grad.masked_fill(out <= 0, 0) @ w)


def test_bad_arguments_are_named():
    w_q, w_scale = ops_int8.quantize_weight(torch.randn(8, 16))
    x = torch.randn(3, 16)
    cases = [
        ("x", lambda: int8_linear(x.double(), w_q, w_scale)),
        ("x", lambda: int8_linear(torch.randn(3, 15), w_q, w_scale)),
        ("weight_int8", lambda: int8_linear(x, w_q.float(), w_scale)),
        ("weight_int8", lambda: int8_linear(x, w_q[0], w_scale)),
        ("weight_scale", lambda: int8_linear(x, w_q, w_scale[:7])),
        ("weight_scale", lambda: int8_linear(x, w_q, w_scale.double())),
        ("bias", lambda: int8_linear(x, w_q, w_scale, torch.zeros(9))),
        ("bias", lambda: int8_linear(x, w_q, w_scale, torch.zeros(8, dtype=torch.bfloat16))),
        ("packed", lambda: int8_linear(x, w_q, w_scale, packed=ops_int8.pack(w_q[:4]))),
        ("kernel", lambda: ops_int8.pack(w_q, "tiles")),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_the_extension_rechecks_the_packed_weights():
    w_q = torch.zeros(8, 16, dtype=torch.int8)
    packed = ops_int8.pack(w_q)
    out = torch.empty(3, 8)
    with pytest.raises(ValueError, match="packed: holds W of N 8, K 16"):
        native.gemm_int8(torch.randn(3, 15), packed, torch.ones(8), out)
    short = native.PackedInt8(packed.buffer[:100], 8, 16, packed.kernel)
    with pytest.raises(ValueError, match="packed"):
        native.gemm_int8(torch.randn(3, 16), short, torch.ones(8), out)
    packed.buffer[:4] = 0
    with pytest.raises(ValueError, match="not a buffer written by gemm_int8_pack"):
        native.gemm_int8(torch.randn(3, 16), packed, torch.ones(8), out)
    call = _native.struct("Int8GemmCall", a_dtype="float16", M=1, N=1, K=1)
    with pytest.raises(ValueError, match="a_dtype"):
        _native.call_entry("gemm_int8", call)


def test_without_the_extension_int8_is_a_clear_error(monkeypatch):
    layer = Int8Linear.from_linear(nn.Linear(4, 2))
    monkeypatch.setattr(ddetr._native, "available", lambda: False)
    with pytest.raises(RuntimeError, match="native extension"):
        layer(torch.randn(1, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_input_is_a_clear_error():
    layer = Int8Linear.from_linear(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="CPU only"):
        layer(torch.randn(1, 4, device="cuda"))
    with pytest.raises(ValueError, match="CPU only"):
        layer.cuda()(torch.randn(1, 4, device="cuda"))
