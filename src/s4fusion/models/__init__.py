"""S4Fusion network modules."""

from .cmsa import CMSA, CMSABlock, PatchMark
from .config import S4FusionConfig
from .layers import FoldHead, OverlapPatchEmbed, PatchExpand, PatchMerging
from .s4fusion import S4Fusion
from .ss2d import SS2D, VSSBlock

__all__ = [
    "S4Fusion",
    "S4FusionConfig",
    "CMSA",
    "CMSABlock",
    "PatchMark",
    "SS2D",
    "VSSBlock",
    "OverlapPatchEmbed",
    "PatchMerging",
    "PatchExpand",
    "FoldHead",
]
