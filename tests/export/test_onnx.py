"""ONNX export: every variant in one --dynamic file that ONNX Runtime runs at two image
sizes with a padded batch of 2 (logits and boxes within 1e-4 of PyTorch's), the
post-processed graph, the TensorRT plugin form, compressed models and the errors."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddetr import cli
from ddetr.compress import to_int8
from ddetr.export import coarsest_stride, to_onnx
from ddetr.ops.portable import portable_forms
from tests.models.detr_cases import images, tiny_model

pytestmark = pytest.mark.slow

# variant -> (tiny_model arguments, opset): opset 17 once, the default 18 elsewhere
CASES = {
    "plain": (("plain", {}), 17),
    "box_refine": (("box_refine", {}), 18),
    "two_stage": (("two_stage", {}), 18),
    "single_scale": (("single_scale", {}), 18),
    "dc5": (("single_scale", {"dilation": True}), 18),
}


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # (no notes on constant folding)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, x, mask, **extra) -> list[np.ndarray]:
    return sess.run(None, {"images": x.numpy(), "mask": mask.numpy(),
                           **{k: v.numpy() for k, v in extra.items()}})


def eager(model, x, mask) -> dict:
    with torch.no_grad():
        return model(x, mask)


@pytest.fixture(scope="module", params=list(CASES))
def dynamic_file(request, tmp_path_factory):
    (variant, overrides), opset = CASES[request.param]
    model = tiny_model(variant, **overrides)
    path = to_onnx(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx",
                   dynamic=True, opset=opset, height=160, width=224)
    return model, path, opset


def test_every_variant_runs_in_onnx_runtime_at_two_sizes(dynamic_file):
    model, path, opset = dynamic_file
    onnx.checker.check_model(str(path), full_check=True)
    assert {o.version for o in onnx.load(str(path)).opset_import if o.domain == ""} == {opset}
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["pred_logits", "pred_boxes"]
    # a padded batch of 2 (image 1 is padded at the bottom and right), at two sizes and
    # neither the size traced with
    for h, w in ((96, 130), (200, 170)):
        x, mask = images(2, h, w)
        logits, boxes = run(sess, x, mask)
        ref = eager(model, x, mask)
        np.testing.assert_allclose(logits, ref["pred_logits"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(boxes, ref["pred_boxes"].numpy(), rtol=0, atol=1e-4)
    # a batch of 1, unpadded
    x, mask = images(1, 120, 99)
    logits, _ = run(sess, x, mask)
    np.testing.assert_allclose(logits, eager(model, x, mask)["pred_logits"].numpy(), atol=1e-4)


def test_postprocessed_graph_gives_the_detections(tmp_path):
    model = tiny_model("two_stage")
    path = to_onnx(model, tmp_path / "post.onnx", height=96, width=128, batch_size=2,
                   with_postprocess=True, num_select=7)
    x, mask = images(2, 96, 128)
    sizes = torch.tensor([[480, 640], [300, 200]])
    scores, labels, boxes = run(session(path), x, mask, target_sizes=sizes)
    want = model.postprocess(eager(model, x, mask), sizes, num_select=7)
    assert scores.shape == (2, 7) and labels.dtype == np.int64 and boxes.shape == (2, 7, 4)
    for i, found in enumerate(want):
        np.testing.assert_allclose(scores[i], found["scores"].numpy(), atol=1e-5)
        np.testing.assert_array_equal(labels[i], found["labels"].numpy())
        np.testing.assert_allclose(boxes[i], found["boxes"].numpy(), rtol=1e-5, atol=1e-3)


def test_trt_form_holds_the_plugin_node(tmp_path):
    model = tiny_model("box_refine")
    path = to_onnx(model, tmp_path / "trt.onnx", height=96, width=128, msda="trt")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    plugins = [n for n in graph.graph.node if n.op_type == "MultiscaleDeformableAttnPlugin_TRT"]
    # one per encoder and decoder layer, nothing else left of the attention sampling
    assert len(plugins) == 4 and {n.domain for n in plugins} == {"TRT"}
    assert not [n for n in graph.graph.node if n.op_type in ("GridSample", "GatherElements")]
    types = {v.name: v.type.tensor_type for v in graph.graph.value_info}
    for node in plugins:
        assert types[node.input[1]].elem_type == onnx.TensorProto.INT32  # spatial_shapes
        assert types[node.input[2]].elem_type == onnx.TensorProto.INT32  # level_start_index
        assert {a.name: a.s for a in node.attribute}["plugin_version"] == b"1"
    # eagerly the TRT form computes the attention too
    x, mask = images(1, 96, 128)
    with torch.no_grad(), portable_forms("trt"):
        got = model(x, mask)["pred_logits"]
    torch.testing.assert_close(got, eager(model, x, mask)["pred_logits"], atol=1e-5, rtol=0)


def test_compressed_models_export(tmp_path):
    x, mask = images(2, 96, 128)
    # int8 layers: int8 weights in the file, the quantisation in the graph; a rounding
    # boundary turns runtime differences of 1e-7 into one int8 step, hence the tolerance
    model = to_int8(tiny_model("plain"))
    path = to_onnx(model, tmp_path / "int8.onnx", height=96, width=128, batch_size=2)
    kinds = {t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert onnx.TensorProto.INT8 in kinds
    logits, boxes = run(session(path), x, mask)
    ref = eager(model, x, mask)
    np.testing.assert_allclose(logits, ref["pred_logits"].numpy(), atol=0.05)
    np.testing.assert_allclose(boxes, ref["pred_boxes"].numpy(), atol=1e-3)
    # bfloat16: the same rounded weights, computed in float32 (with a warning)
    model = tiny_model("plain").to(torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16 weights are exported as float32"):
        path = to_onnx(model, tmp_path / "bf16.onnx", height=96, width=128, batch_size=2)
    logits, _ = run(session(path), x, mask)
    assert next(model.parameters()).dtype == torch.bfloat16  # the model is left alone
    np.testing.assert_allclose(logits, eager(model.float(), x, mask)["pred_logits"].numpy(),
                               atol=1e-4)


def test_cli_exports_a_saved_model(tmp_path):
    model = tiny_model("single_scale")
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "cli.onnx"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "model"), "--output", str(out),
                     "--height", "64", "--width", "96", "--msda", "trt"]) == 0
    assert os.path.getsize(out) > 0
    onnx.checker.check_model(str(out))
    assert cli.main(["export", "--checkpoint", str(tmp_path / "model"), "--output",
                     str(tmp_path / "missing" / "x.onnx")]) == 2


def test_coarsest_stride():
    assert coarsest_stride(tiny_model("plain")) == 64
    assert coarsest_stride(tiny_model("single_scale")) == 32
    assert coarsest_stride(tiny_model("single_scale", dilation=True)) == 16


@pytest.mark.parametrize("change, name", [
    ({"opset": 16}, "opset"), ({"opset": 24}, "opset"), ({"opset": True}, "opset"),
    ({"msda": "grid_sample"}, "msda"), ({"height": 0}, "height"), ({"width": 2.5}, "width"),
    ({"batch_size": -1}, "batch_size"), ({"num_select": 0}, "num_select"),
])
def test_bad_arguments_are_named(tmp_path, change, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        to_onnx(tiny_model("plain"), tmp_path / "x.onnx", **change)


def test_bad_models_and_paths_are_named(tmp_path):
    model = tiny_model("plain")
    with pytest.raises(ValueError, match="^model: .*training mode"):
        to_onnx(model.train(), tmp_path / "x.onnx")
    model.eval()
    with pytest.raises(ValueError, match="^model: expected a ddetr DeformableDetr"):
        to_onnx(torch.nn.Linear(2, 2).eval(), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="^model: encoder_token_ratio 0.5"):
        to_onnx(tiny_model("plain", encoder_token_ratio=0.5), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="^path: .*folder does not exist"):
        to_onnx(model, tmp_path / "missing" / "x.onnx")
    with pytest.raises(ValueError, match="^path: .*is a directory"):
        to_onnx(model, tmp_path)
