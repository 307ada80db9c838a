import torch

from ddetr.engine.sampling_points import SamplingPointRecorder
from ddetr.ops import ms_deform_attn_reference
from tests.models.detr_cases import images, tiny_model


def test_recorded_points_reproduce_the_attention_output():
    model = tiny_model("box_refine")
    x, mask = images()
    outputs = []
    hooks = [layer.cross_attn.register_forward_hook(
        lambda m, args, out: outputs.append((args, out)))
        for layer in model.transformer.decoder.layers]
    with torch.no_grad(), SamplingPointRecorder(model) as recorder:
        model(x, mask)
    for h in hooks:
        h.remove()
    assert len(recorder.records) == len(model.transformer.decoder.layers)
    for record, (args, out), layer in zip(recorder.records, outputs, model.transformer.decoder.layers):
        attn = layer.cross_attn
        _, _, memory, shapes, _, padding = args
        value = attn.value_proj(memory).masked_fill(padding[..., None], 0.0)
        n, s, _ = value.shape
        # (N, S, C) -> (N, S, M, D)
        value = value.view(n, s, attn.n_heads, -1)
        again = ms_deform_attn_reference(value, shapes, None, record["locations"], record["weights"])
        assert torch.allclose(attn.output_proj(again), out, atol=1e-5)
    # hooks are removed on exit
    model(x, mask)
    assert len(recorder.records) == len(model.transformer.decoder.layers)
