"""``ddetr.ops.bf16_cpu``: CPU bfloat16 convolutions and linear layers widened to float32
where oneDNN has no bfloat16, each path forced on any CPU, against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from ddetr.ops.bf16_cpu import Conv2d, bf16_cpu_path, conv2d

# (in channels, out channels, kernel, stride, padding, dilation, groups, H, W)
CASES = [(3, 8, 7, 2, 3, 1, 1, 33, 31), (16, 24, 3, 1, 1, 1, 1, 9, 10),
         (16, 16, 3, 2, 1, 1, 4, 8, 7), (8, 12, 1, 1, 0, 1, 1, 5, 6), (8, 8, 3, 1, 2, 2, 1, 7, 9)]


def inputs(case, seed=0):
    cin, cout, k, stride, pad, dil, groups, h, w = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, h, w, generator=g).bfloat16()
    weight = (torch.randn(cout, cin // groups, k, k, generator=g) / k).bfloat16()
    bias = torch.randn(cout, generator=g).bfloat16()
    return x, weight, bias, dict(stride=stride, padding=pad, dilation=dil, groups=groups)


def reference(x, weight, bias, args):
    # the exact convolution of the bfloat16 values, rounded to bfloat16 once
    return F.conv2d(x.double(), weight.double(), bias.double(), **args).bfloat16()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["widen", "torch", "auto"])
def test_bf16_conv_against_float64(case, path, monkeypatch):
    monkeypatch.setenv("DDETR_BF16_CPU", path)
    x, weight, bias, args = inputs(case)
    got = conv2d(x, weight, bias, **args)
    want = reference(x, weight, bias, args)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # one bfloat16 rounding of a float32 sum: within 2 ulps (2^-7 relative) plus a
    # float32-sum term; torch's own kernel may round partial sums, hence its looser bound
    tol = 2 ** -7 if bf16_cpu_path() == "widen" else 2 ** -5
    err = (got.double() - want.double()).abs()
    assert (err <= tol * want.double().abs() + 1e-3).all(), err.max()
    if bf16_cpu_path() == "widen":
        expected = F.conv2d(x.float(), weight.float(), bias.float(), **args).bfloat16()
        assert torch.equal(got, expected)


def test_float32_and_float64_are_torchs(monkeypatch):
    monkeypatch.setenv("DDETR_BF16_CPU", "widen")
    x, weight, bias, args = inputs(CASES[1])
    for dtype in (torch.float32, torch.float64):
        a, w, b = x.to(dtype), weight.to(dtype), bias.to(dtype)
        assert torch.equal(conv2d(a, w, b, **args), F.conv2d(a, w, b, **args))


def test_widened_under_autocast_and_differentiable(monkeypatch):
    monkeypatch.setenv("DDETR_BF16_CPU", "widen")
    x, weight, bias, args = inputs(CASES[1])
    x, weight = x.float().requires_grad_(), weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv2d(x, weight, bias.float(), **args)
    assert out.dtype == torch.bfloat16  # what autocast's own convolution returns
    expected = F.conv2d(x.bfloat16().float(), weight.bfloat16().float(), bias.float(), **args)
    assert torch.equal(out, expected.bfloat16())
    out.float().sum().backward()
    assert x.grad is not None and weight.grad is not None and torch.isfinite(x.grad).all()


def test_module_keeps_the_state_dict_and_bf16(monkeypatch):
    monkeypatch.setenv("DDETR_BF16_CPU", "widen")
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    ours = Conv2d(4, 6, 3, stride=2, padding=1)
    ours.load_state_dict(plain.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 4, 9, 9)
    assert torch.equal(ours(x), plain(x))
    ours.bfloat16()
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), plain(x.bfloat16().float()), rtol=0.02, atol=0.02)


def test_bad_setting_named(monkeypatch):
    monkeypatch.setenv("DDETR_BF16_CPU", "fast")
    with pytest.raises(ValueError, match="DDETR_BF16_CPU"):
        bf16_cpu_path()


def test_build_info_reports_the_path():
    import ddetr
    assert ddetr.build_info()["bf16_cpu"] in ("onednn", "widen", "torch")


@pytest.mark.parametrize("path", ["widen", "torch", "auto"])
@pytest.mark.parametrize("shape", [(1, 8, 4), (7, 33, 17), (2, 5, 64, 48)])
def test_bf16_linear_against_float64(shape, path, monkeypatch):
    from ddetr.ops import linear
    monkeypatch.setenv("DDETR_BF16_CPU", path)
    g = torch.Generator().manual_seed(3)
    *lead, k, n = shape
    x = torch.randn(*lead, k, generator=g).bfloat16()
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    for relu in (False, True):
        got = linear(x, weight, bias, relu=relu)
        want = F.linear(x.double(), weight.double(), bias.double())
        want = (want.relu() if relu else want).bfloat16()
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        tol = 2 ** -7 if bf16_cpu_path() == "widen" else 2 ** -5
        err = (got.double() - want.double()).abs()
        assert (err <= tol * want.double().abs() + 1e-3).all(), err.max()


def test_linear_module_widens_only_plain_bf16_linears(monkeypatch):
    from ddetr.ops.bf16_cpu import linear_module
    monkeypatch.setenv("DDETR_BF16_CPU", "widen")
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5)
    x = torch.randn(3, 12)
    assert torch.equal(linear_module(layer, x), layer(x))  # float32: the module's own call
    layer.bfloat16()
    xb = x.bfloat16()
    want = F.linear(xb.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    assert torch.equal(linear_module(layer, xb), want)
    seen = []
    layer.register_forward_hook(lambda *a: seen.append(1))
    linear_module(layer, xb)  # a hooked module runs its own forward, so its hook fires
    assert seen == [1]
