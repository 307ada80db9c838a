"""ddetr.ops.dropout / relu_dropout: the native Philox masks against the pure-PyTorch
reference (bitwise), keep-rate statistics, scaling, the backward's regenerated mask,
gradcheck, reproducibility, fallbacks and bad input."""

import pytest
import torch
import torch.nn.functional as F

from ddetr.ops import dropout, dropout_reference, philox_keep_mask, relu_dropout
from ddetr.ops.philox_dropout import _dropout_op, _relu_dropout_backward_op

DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _cuda_dtypes(device):
    return DTYPES + ([torch.float16] if device == "cuda" else [])


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 255, 1000, 4099, 70001])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.93, 1.0])
@pytest.mark.parametrize("relu", [False, True])
def test_native_equals_reference(device, numel, p, relu):
    for dtype in _cuda_dtypes(device):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).to(device, dtype)
        seed = 0x1234_5678_9ABC + numel
        out = _dropout_op(x, p, seed, relu)
        ref = dropout_reference(x.cpu(), p, seed, relu)
        assert torch.equal(out.cpu(), ref), (dtype, numel, p, relu)


def test_empty_tensor(device):
    x = torch.empty(0, 7, device=device)
    assert dropout(x, 0.5).shape == (0, 7)
    assert relu_dropout(x, 0.5).shape == (0, 7)


def test_philox_known_answer():
    # Philox4x32-10 with a zero counter and key (Random123's published test vector)
    from ddetr.ops.philox_dropout import philox_words
    words = philox_words(0, 0, 1)[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_keep_rate_and_scaling(device, p):
    torch.manual_seed(0)
    x = torch.rand(1_000_000, device=device) + 0.5  # positive: never exactly zero
    out = dropout(x, p)
    kept = out != 0
    rate = kept.float().mean().item()
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma
    assert torch.allclose(out[kept], x[kept] / (1 - p), rtol=1e-6)


def test_masks_are_independent_across_seeds_and_positions():
    a = philox_keep_mask(200_000, 0.5, seed=1)
    b = philox_keep_mask(200_000, 0.5, seed=2)
    # two independent fair masks agree on about half the elements
    assert abs((a == b).float().mean().item() - 0.5) < 0.01
    # neighbouring elements (same Philox block, different words) are not correlated
    assert abs((a[:-1] == a[1:]).float().mean().item() - 0.5) < 0.01


def test_backward_regenerates_the_forward_mask(device):
    torch.manual_seed(1)
    x = (torch.rand(3, 77, 41, device=device) + 0.1).requires_grad_()
    out = dropout(x, 0.4)
    grad = torch.randn_like(out)
    out.backward(grad)
    kept = out.detach() != 0
    expected = torch.where(kept, grad / 0.6, torch.zeros_like(grad))
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=0)


def test_relu_dropout_backward_from_output(device):
    torch.manual_seed(2)
    x = torch.randn(5, 333, device=device, requires_grad=True)
    out = relu_dropout(x, 0.25)
    grad = torch.randn_like(out)
    out.backward(grad)
    # gradient passes exactly where relu passed and the element was kept
    expected = torch.where(out.detach() > 0, grad / 0.75, torch.zeros_like(grad))
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=0)
    assert torch.equal(out.detach() > 0, (x.detach() > 0) & (out.detach() != 0))


def test_gradcheck_float64():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _dropout_op(t, 0.3, 99, False), (x,))
    # relu: keep away from the kink at 0, where the derivative does not exist
    y = (torch.rand(4, 9, dtype=torch.float64) + 0.1) * torch.randint(0, 2, (4, 9)).mul(2).sub(1)
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _dropout_op(t, 0.3, 99, True), (y,))


def test_manual_seed_reproduces_masks():
    x = torch.randn(10_000)
    torch.manual_seed(5)
    a = dropout(x, 0.5)
    torch.manual_seed(5)
    b = dropout(x, 0.5)
    c = dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_identity_when_not_training_or_p_zero():
    x = torch.randn(100)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(relu_dropout(x, 0.5, training=False), F.relu(x))
    assert torch.equal(relu_dropout(x, 0.0), F.relu(x))


def test_p_one_drops_everything(device):
    x = torch.randn(1000, device=device, requires_grad=True)
    out = dropout(x, 1.0)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_non_contiguous_input():
    base = torch.randn(64, 48)
    x = base.t()
    torch.manual_seed(3)
    out = dropout(x, 0.5)
    torch.manual_seed(3)
    again = dropout(x.contiguous(), 0.5)
    assert torch.equal(out, again)


def test_float16_on_cpu_falls_back_to_torch():
    torch.manual_seed(0)
    x = torch.ones(100_000, dtype=torch.float16)
    out = dropout(x, 0.5)
    assert out.dtype == torch.float16
    assert abs((out != 0).float().mean().item() - 0.5) < 0.02


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="p: expected a probability"):
        dropout(torch.randn(3), 1.5)
    with pytest.raises(ValueError, match="p: expected a probability"):
        relu_dropout(torch.randn(3), -0.1)
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        dropout(torch.arange(3), 0.1)


def test_relu_dropout_backward_op_matches_formula():
    out = torch.tensor([0.0, 1.5, 0.0, 2.0])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(_relu_dropout_backward_op(out, grad, 0.5),
                       torch.tensor([0.0, 4.0, 0.0, 8.0]))


@pytest.mark.cuda
def test_cuda_mask_equals_cpu_mask():
    x = torch.randn(12345)
    cpu = _dropout_op(x, 0.3, 77, True)
    gpu = _dropout_op(x.cuda(), 0.3, 77, True)
    assert torch.equal(cpu, gpu.cpu())
