"""Deformable DETR building blocks, the detector and its training criterion."""

from ddetr.models.criterion import SetCriterion
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.postprocess import PostProcess

__all__ = ["DeformableDetr", "HungarianMatcher", "MSDeformAttn", "PostProcess", "SetCriterion"]
