"""Native ops with their autograd formulas, and pure-PyTorch references."""

from ddetr.ops import native_layers
from ddetr.ops.philox_dropout import dropout, dropout_reference, philox_keep_mask, relu_dropout
from ddetr.ops.flatten import encoder_reference_points, flatten_multiscale
from ddetr.ops.flatten_reference import (Flattened, encoder_reference_points_reference,
                                         flatten_multiscale_reference)
from ddetr.ops.blas import linear, module_linear
from ddetr.ops.int8 import Int8Linear, int8_linear
from ddetr.ops.levels import LevelTable
from ddetr.ops.msda import MSDeformAttnFunction, ms_deform_attn
from ddetr.ops.reference import ms_deform_attn_reference

__all__ = ["Flattened", "Int8Linear", "LevelTable", "MSDeformAttnFunction", "dropout",
           "dropout_reference", "encoder_reference_points", "encoder_reference_points_reference",
           "flatten_multiscale", "flatten_multiscale_reference", "int8_linear", "linear",
           "module_linear", "ms_deform_attn", "ms_deform_attn_reference", "native_layers", "philox_keep_mask",
           "relu_dropout"]
