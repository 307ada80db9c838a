"""Native ops with their autograd formulas, and pure-PyTorch references."""

from ddetr.ops.msda import MSDeformAttnFunction, ms_deform_attn
from ddetr.ops.reference import ms_deform_attn_reference

__all__ = ["MSDeformAttnFunction", "ms_deform_attn", "ms_deform_attn_reference"]
