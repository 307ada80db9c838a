"""The whole detector through torch.export and torch.compile (inference): one graph with
ddetr's custom ops in it (no graph break), and the eager outputs within 1e-5."""

import pytest
import torch

from tests.models.detr_cases import VARIANTS, images, tiny_model


def _close(out: dict, ref: dict) -> None:
    for key in ("pred_logits", "pred_boxes"):
        assert (out[key] - ref[key]).abs().max().item() < 1e-5, key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_export_of_every_variant(variant):
    model = tiny_model(variant)
    x, mask = images()  # a batch of 2, the second padded
    program = torch.export.export(model, (x, mask))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "ddetr.ms_deform_attn.default" in ops
    assert "ddetr.flatten_multiscale.default" in ops
    with torch.no_grad():
        _close(program.module()(x, mask), model(x, mask))
        # no padding at all: the graph masks anyway, eager skips the mask; same result
        one = x[:1]
        _close(program.module()(x[:1].expand(2, -1, -1, -1).contiguous(),
                                torch.zeros_like(mask)), model(one.expand(2, -1, -1, -1)))


@pytest.mark.slow
def test_torch_compile_fullgraph_of_a_two_stage_model():
    model = tiny_model("two_stage")
    x, mask = images()
    compiled = torch.compile(model, fullgraph=True)  # a graph break would raise
    with torch.no_grad():
        _close(compiled(x, mask), model(x, mask))


@pytest.mark.slow
def test_torch_export_with_dynamic_batch_and_image_size():
    model = tiny_model("two_stage")
    x, mask = images(2, 160, 224)
    batch = torch.export.Dim("batch", min=1, max=64)
    height, width = (torch.export.Dim(n, min=65, max=4096) for n in ("height", "width"))
    program = torch.export.export(model, (x, mask), dynamic_shapes=(
        {0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}))
    with torch.no_grad():
        for n, h, w in ((3, 96, 130), (1, 200, 90)):
            x, mask = images(n, h, w)
            _close(program.module()(x, mask), model(x, mask))
