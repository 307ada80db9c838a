"""The op is a torch.library custom op: torch.compile and torch.export trace it whole."""

import torch

from ddetr import MSDeformAttn
from ddetr.ops import ms_deform_attn
from tests.ops.msda_cases import CASES, make_inputs


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)

    def forward(self, query, reference_points, src, shapes, start, mask):
        return self.attn(query, reference_points, src, shapes, start, mask)


def tiny_inputs():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 6], [2, 3]])
    start = torch.tensor([0, 24])
    src = torch.randn(2, 30, 16, generator=g)
    query = torch.randn(2, 7, 16, generator=g)
    ref = torch.rand(2, 7, 2, 2, generator=g)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True
    return query, ref, src, shapes, start, mask


def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    model = Tiny()
    inputs = tiny_inputs()
    compiled = torch.compile(model, fullgraph=True)  # inductor: generates C++ here
    want = model(*inputs)
    got = compiled(*inputs)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want.sum().backward()
    for a, b in zip(grads, model.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_export_keeps_the_custom_op():
    torch.manual_seed(0)
    model = Tiny().eval()
    inputs = tiny_inputs()
    exported = torch.export.export(model, inputs)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "ddetr.ms_deform_attn.default" in targets
    torch.testing.assert_close(exported.module()(*inputs), model(*inputs))


def test_opcheck():
    value, shapes, start, loc, attn = make_inputs(CASES[2], torch.float64)
    args = (value.requires_grad_(), shapes, start, loc.requires_grad_(), attn.requires_grad_())
    torch.library.opcheck(torch.ops.ddetr.ms_deform_attn.default, args)
    # and the public wrapper agrees with the raw op
    torch.testing.assert_close(ms_deform_attn(*args), torch.ops.ddetr.ms_deform_attn(*args))
