"""Octave backbones (2D ImageNet, video, 3D segmentation) and weight transfer from vanilla models."""

from oct3d.models.blocks import OctBasicBlock, OctBottleneck, OctSqueezeExcite, make_stage
from oct3d.models.transfer import VanillaMismatchError, load_vanilla, partition_conv_weight

__all__ = [
    "OctBasicBlock",
    "OctBottleneck",
    "OctSqueezeExcite",
    "make_stage",
    "load_vanilla",
    "partition_conv_weight",
    "VanillaMismatchError",
]
