"""Deformable DETR building blocks, the detector (and its DINO variant), the DETR
baseline and their training criteria."""

from ddetr.models.criterion import SetCriterion
from ddetr.models.deformable_detr import DeformableDetr
from ddetr.models.detr import Detr
from ddetr.models.dino import Dino, DinoCriterion
from ddetr.models.matcher import HungarianMatcher
from ddetr.models.ms_deform_attn import MSDeformAttn
from ddetr.models.postprocess import PostProcess, SoftmaxPostProcess

__all__ = ["DeformableDetr", "Detr", "Dino", "DinoCriterion", "HungarianMatcher",
           "MSDeformAttn", "PostProcess", "SetCriterion", "SoftmaxPostProcess"]
