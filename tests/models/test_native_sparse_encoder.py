"""The native encoder layer on selected rows (Sparse DETR: Lq of the S memory tokens
updated, every token a value) against the layer's PyTorch path on the same rows, and
against the dense layer when every row is selected; gradients, gradcheck, bad input."""

import pytest
import torch

from ddetr.models.native_layers import encoder_layer
from ddetr.models.token_selection import RowIndex
from ddetr.models.transformer_layers import DeformableTransformerEncoder
from ddetr.ops.native_layers import library_ready
from tests.models.test_native_layers import (SHAPES, assert_close_relative, make_inputs,
                                             make_layer)

pytestmark = pytest.mark.skipif(not library_ready(torch.zeros(1)),
                                reason="native extension or OpenBLAS missing")


def pick_rows(n, s, lq, seed=3):
    """(N, Lq) distinct ascending token indices per image, from [0, S)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(s, generator=g)[:lq].sort()[0] for _ in range(n)])


def sparse_inputs(levels, n, lq, dtype=torch.float64, mask=True, pos=True):
    """The encoder inputs of `make_inputs` as memory (N, S, C) plus the rows to update:
    x, pos, ref (N, Lq, ...) gathered from it, all leaves."""
    inp = make_inputs("encoder", levels, n=n, dtype=dtype, mask=mask, pos=pos)
    rows = RowIndex(pick_rows(n, inp["x"].shape[1], lq), inp["x"].shape[1])
    picked = {k: None if inp[k] is None else rows.gather(inp[k]).detach().requires_grad_()
              for k in ("x", "pos", "ref")}
    return {**inp, **picked, "memory": inp["x"]}


def run(layer, inp, native):
    if native:
        return encoder_layer(layer, inp["x"], inp["pos"], inp["ref"], inp["shapes"], None,
                             inp["mask"], memory=inp["memory"])
    layer.native_layers = False
    return layer(inp["x"], inp["pos"], inp["ref"], inp["shapes"], None, inp["mask"],
                 memory=inp["memory"])


def outputs_and_grads(layer, inp, native):
    leaves = [inp[k] for k in ("x", "pos", "ref", "memory") if inp[k] is not None]
    leaves += list(layer.parameters())
    out = run(layer, inp, native)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2),
                           dtype=out.dtype)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.parametrize("levels", list(SHAPES))
@pytest.mark.parametrize("n,lq,mask,pos", [(1, 1, False, True), (2, 5, True, True),
                                           (3, 13, True, False), (2, 1, True, True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rows_match_pytorch_path(levels, n, lq, mask, pos, dtype, tol):
    lv = SHAPES[levels]
    layer = make_layer("encoder", lv, dtype)
    inp = sparse_inputs(lv, n, lq, dtype, mask, pos)
    assert_close_relative(outputs_and_grads(layer, inp, True),
                          outputs_and_grads(layer, inp, False), tol)


@pytest.mark.parametrize("native", [True, False])
def test_every_row_equals_the_dense_layer(native):
    # Lq = S, rows in order, memory = the same tokens: exactly the dense layer
    lv = SHAPES["five"]
    layer = make_layer("encoder", lv, torch.float32)
    dense = make_inputs("encoder", lv, dtype=torch.float32)
    sparse = {**dense, "memory": dense["x"].detach().clone()}
    with torch.no_grad():
        want = (encoder_layer(layer, dense["x"], dense["pos"], dense["ref"], dense["shapes"],
                              None, dense["mask"]) if native else run(
            layer, {**dense, "memory": None}, False))
        assert torch.equal(run(layer, sparse, native), want)


def test_gradcheck():
    lv = [(3, 4), (2, 2)]
    layer = make_layer("encoder", lv)
    inp = sparse_inputs(lv, n=2, lq=3)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, pos, memory, *params):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(names, params))):
            return run(layer, dict(inp, x=x, pos=pos, memory=memory), native=True)

    args = [inp["x"], inp["pos"], inp["memory"], *layer.parameters()]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("native", [True, False])
def test_encoder_stack_updates_only_the_chosen_tokens(native):
    lv = SHAPES["three"]
    layers = [make_layer("encoder", lv, seed=i) for i in range(2)]
    for layer in layers:
        layer.native_layers = native
    encoder = DeformableTransformerEncoder(layers)
    inp = make_inputs("encoder", lv, n=2)
    index = pick_rows(2, inp["x"].shape[1], 6)
    args = (inp["x"], inp["pos"], inp["ref"], inp["shapes"], None, inp["mask"])
    with torch.no_grad():
        out = encoder(*args, token_index=index)
    chosen = torch.zeros(inp["x"].shape[:2], dtype=torch.bool).scatter_(1, index, True)
    assert torch.equal(out[~chosen], inp["x"][~chosen])
    assert not torch.isclose(out[chosen], inp["x"][chosen]).any()
    # with autograd (out of place) the same values, and gradients reach every token
    grad_out = encoder(*args, token_index=index)
    torch.testing.assert_close(grad_out, out, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(grad_out.sum(), inp["x"])
    assert torch.isfinite(g).all() and (g[~chosen] != 1).any()


def test_bad_input():
    lv = SHAPES["three"]
    layer = make_layer("encoder", lv)
    inp = sparse_inputs(lv, n=2, lq=4)
    with pytest.raises(ValueError, match="input_flatten"):
        run(layer, dict(inp, memory=inp["memory"][:1]), native=True)
    with pytest.raises(ValueError, match="memory: expected torch.float64"):
        run(layer, dict(inp, memory=inp["memory"].float()), native=True)
    # the rows without their memory: the mask no longer fits the 4 "tokens"
    with pytest.raises(ValueError, match="input_padding_mask"):
        run(layer, dict(inp, memory=None), native=True)
    with pytest.raises(ValueError, match="spatial_shapes"):
        run(layer, dict(inp, memory=None, mask=None), native=True)
