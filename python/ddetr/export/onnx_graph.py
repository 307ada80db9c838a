"""The detector as an ONNX file: ``to_onnx``.

The graph is traced with ``torch.onnx.export`` (the dynamo exporter, onnxscript) while
ddetr's ops take their portable forms (``ddetr.ops.portable``): multi-scale deformable
attention as gathers (``msda="standard"``, any runtime) or as TensorRT's
``MultiscaleDeformableAttnPlugin_TRT`` node (``msda="trt"``, TensorRT only).

Graph inputs: ``images`` (N, 3, H, W) float32 normalised, ``mask`` (N, H, W) bool (True
on padding; all False for unpadded images) and, with ``with_postprocess``,
``target_sizes`` (N, 2) int64 (height, width) the boxes are scaled to. Outputs:
``pred_logits`` (N, Q, C) and ``pred_boxes`` (N, Q, 4) boxes_cxcywh normalised, or with
``with_postprocess`` ``scores`` (N, K), ``labels`` (N, K) int64 and ``boxes`` (N, K, 4)
boxes_xyxy in pixels of target_sizes (the official top-K over all queries and classes).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ddetr.models.deformable_detr import DeformableDetr, check_positive_ints
from ddetr.models.postprocess import PostProcess
from ddetr.ops.portable import MSDA_FORMS, portable_forms

SUPPORTED_OPSETS = range(17, 24)
MAX_SIDE = 8192  # the largest image side a --dynamic graph is declared for
TRT_DOMAIN, TRT_PLUGIN = "TRT", "MultiscaleDeformableAttnPlugin_TRT"


class DetectorGraph(nn.Module):
    """The traced function: the detector's final outputs as a tuple, or its detections."""

    def __init__(self, model: DeformableDetr, with_postprocess: bool, num_select: int):
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(num_select) if with_postprocess else None

    def forward(self, images: Tensor, mask: Tensor, target_sizes: Tensor | None = None):
        out = self.model(images, mask)
        logits, boxes_cxcywh = out["pred_logits"].float(), out["pred_boxes"].float()
        if self.postprocess is None:
            return logits, boxes_cxcywh
        found = self.postprocess.batched({"pred_logits": logits, "pred_boxes": boxes_cxcywh},
                                         target_sizes)
        return found["scores"], found["labels"], found["boxes"]


def coarsest_stride(model: DeformableDetr) -> int:
    """The stride of the model's coarsest feature level (64 for 4 levels on a ResNet)."""
    return model.level_strides()[-1]


def _require_onnx():
    """The onnx module, after checking that the exporter's packages are installed."""
    try:
        import onnx
        import onnxscript  # noqa: F401 (torch.onnx's exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs the export extra (pip install "
                          f"\"ddetr[export]\"): {e}") from None
    return onnx


def _check_arguments(model, path, opset, msda, sizes: dict, num_select) -> Path:
    if not isinstance(model, DeformableDetr):
        raise ValueError(f"model: expected a ddetr DeformableDetr, got {type(model).__name__}")
    if model.training:
        raise ValueError("model: it is in training mode (dropout on, denoising and the like); "
                         "call model.eval() before exporting")
    ratio = model.transformer.encoder_token_ratio
    if ratio < 1:
        raise ValueError(f"model: encoder_token_ratio {ratio} (Sparse "
                         f"DETR) picks a data-dependent number of tokens, which the ONNX "
                         f"export does not support yet; export the dense model")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset: expected an ONNX opset from {SUPPORTED_OPSETS.start} to "
                         f"{SUPPORTED_OPSETS.stop - 1}, got {opset!r}")
    if msda not in MSDA_FORMS:
        raise ValueError(f"msda: expected one of {', '.join(MSDA_FORMS)}, got {msda!r}")
    check_positive_ints({**sizes, "num_select": num_select})
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        why = ("is a directory" if path.is_dir() else "its folder does not exist"
               if not parent.is_dir() else "its folder is not writable")
        raise ValueError(f"path: cannot write {path}: {why}")
    return path


def _dynamic_shapes(model: DeformableDetr, with_postprocess: bool):
    """Batch, height and width as dynamic axes. A side must exceed the coarsest stride:
    a level of one row or column would change the traced layout checks."""
    low = coarsest_stride(model) + 1
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=low, max=MAX_SIDE)
    width = torch.export.Dim("width", min=low, max=MAX_SIDE)
    shapes = ({0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width})
    return shapes + ({0: batch},) if with_postprocess else shapes


def _trt_translation():
    """The ONNX node for ``ddetr::trt_msda``: TensorRT's plugin (output (N, Lq, M, D))."""
    import onnxscript
    from onnx.defs import OpSchema
    inputs = [OpSchema.FormalParameter(name, kind) for name, kind in (
        ("value", "T"), ("spatial_shapes", "tensor(int32)"),
        ("level_start_index", "tensor(int32)"), ("sampling_locations", "T"),
        ("attention_weights", "T"))]
    schema = OpSchema(
        TRT_PLUGIN, TRT_DOMAIN, 1, inputs=inputs,
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "value type")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.STRING, name)
                    for name in ("plugin_version", "plugin_namespace")])
    node = onnxscript.values.Op(onnxscript.values.Opset(TRT_DOMAIN, 1), TRT_PLUGIN, schema)

    def trt_msda(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights):
        return node(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, plugin_version="1", plugin_namespace="")

    return {torch.ops.ddetr.trt_msda.default: trt_msda}


def _float32(model: DeformableDetr) -> DeformableDetr:
    """A bfloat16 / float16 model as a float32 copy holding the same (rounded) weights:
    ONNX's Conv takes bfloat16 only from opset 22 and ONNX Runtime's CPU has no bfloat16
    kernels. Warns, since the graph then computes in float32."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return model
    warnings.warn(f"model: its {dtype} weights are exported as float32 values (the same "
                  f"numbers); the graph computes in float32", stacklevel=3)
    return copy.deepcopy(model).float()


@contextlib.contextmanager
def _quiet_exporter():
    """Hides the exporter's notes that concern nothing here: merged axis names,
    deprecated pytree API, and torchvision ops it skips registering."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _example(model: DeformableDetr, batch_size: int, height: int, width: int,
             with_postprocess: bool, dynamic: bool) -> tuple:
    """Example inputs to trace with; for a dynamic graph a padded batch of 2 at least
    whose sides exceed the coarsest stride."""
    param = next(model.parameters())
    if dynamic:
        low = 2 * coarsest_stride(model) + 1
        batch_size, height, width = max(batch_size, 2), max(height, low), max(width, low)
    images = torch.zeros(batch_size, 3, height, width, device=param.device)
    mask = torch.zeros(batch_size, height, width, dtype=torch.bool, device=param.device)
    if dynamic:
        mask[1, height - height // 4:, :] = True
    if not with_postprocess:
        return images, mask
    sizes = torch.tensor([[height, width]] * batch_size, device=param.device)
    return images, mask, sizes


def to_onnx(model: DeformableDetr, path, *, opset: int = 18, height: int = 800,
            width: int = 1333, batch_size: int = 1, dynamic: bool = False,
            with_postprocess: bool = False, num_select: int = 100,
            msda: str = "standard") -> Path:
    """Writes ``model`` (in eval mode) as an ONNX file at ``path`` and returns the path.

    Args:
        opset: the ONNX opset, 17 to 23 (default 18).
        height, width, batch_size: the input size of a fixed-size graph; with ``dynamic``
            only the size traced with (batch, height and width are then dynamic axes, any
            side from the coarsest stride + 1 to 8192).
        with_postprocess: top-``num_select`` scores, labels and xyxy pixel boxes in the
            graph (a third input ``target_sizes``), instead of logits and boxes_cxcywh.
        msda: "standard" (gathers; ONNX Runtime and any other runtime) or "trt"
            (TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` node; only TensorRT with
            that plugin runs it, ONNX Runtime cannot).

    Raises ValueError naming the argument: a model in training mode, an unsupported
    opset or msda, a path that cannot be written. The file passes ``onnx.checker``.
    """
    path = _check_arguments(model, path, opset, msda,
                            {"height": height, "width": width, "batch_size": batch_size},
                            num_select)
    onnx = _require_onnx()
    model = _float32(model)
    graph = DetectorGraph(model, with_postprocess, num_select).eval()
    args = _example(model, batch_size, height, width, with_postprocess, dynamic)
    names = ["images", "mask"] + (["target_sizes"] if with_postprocess else [])
    outputs = (["scores", "labels", "boxes"] if with_postprocess
               else ["pred_logits", "pred_boxes"])
    with portable_forms(msda), torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            graph, args, dynamo=True, opset_version=opset, input_names=names,
            output_names=outputs, verbose=False, optimize=False,
            dynamic_shapes=_dynamic_shapes(model, with_postprocess) if dynamic else None,
            custom_translation_table=_trt_translation() if msda == "trt" else None)
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=msda == "standard")
    return path
