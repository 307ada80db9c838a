"""Deployment: ``to_onnx`` writes the detector as an ONNX file (see ``onnx_graph``).

Needs the ``export`` extra (``pip install "ddetr[export]"``: onnx, onnxscript and
onnxruntime to run the file). ``torch.export.export(model, (images, mask))`` and
``torch.compile(model)`` need nothing extra (see the README).
"""

from ddetr.export.onnx_graph import SUPPORTED_OPSETS, coarsest_stride, to_onnx

__all__ = ["SUPPORTED_OPSETS", "coarsest_stride", "to_onnx"]
