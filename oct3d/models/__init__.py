"""Octave backbones (2D ImageNet, video, 3D segmentation) and weight transfer from vanilla models.

Every builder is also registered by name: ``get_model("oct_i3d_r50", alpha=0.5)``.
"""

from oct3d.models.blocks import OctBasicBlock, OctBottleneck, OctSqueezeExcite, make_stage
from oct3d.models.registry import builder_arguments, get_model, list_models, model_task, register_model
from oct3d.models.transfer import VanillaMismatchError, load_vanilla, partition_conv_weight

__all__ = [
    "OctBasicBlock",
    "OctBottleneck",
    "OctSqueezeExcite",
    "make_stage",
    "load_vanilla",
    "partition_conv_weight",
    "VanillaMismatchError",
    "builder_arguments",
    "get_model",
    "list_models",
    "model_task",
    "register_model",
]

# --- 2D image models (resnet.py, mobilenet.py, densenet.py) ---
from oct3d.models.densenet import OctDenseNet, oct_densenet121
from oct3d.models.mobilenet import OctMobileNetV1, OctMobileNetV2, oct_mobilenet_v1, oct_mobilenet_v2
from oct3d.models.resnet import (
    OctResNet,
    oct_resnet26,
    oct_resnet50,
    oct_resnet101,
    oct_resnet152,
    oct_resnet200,
    oct_resnext50_32x4d,
    oct_resnext101_32x4d,
    oct_se_resnet50,
)

__all__ += [
    "OctResNet",
    "OctMobileNetV1",
    "OctMobileNetV2",
    "OctDenseNet",
    "oct_resnet26",
    "oct_resnet50",
    "oct_resnet101",
    "oct_resnet152",
    "oct_resnet200",
    "oct_resnext50_32x4d",
    "oct_resnext101_32x4d",
    "oct_se_resnet50",
    "oct_mobilenet_v1",
    "oct_mobilenet_v2",
    "oct_densenet121",
]
# --- end 2D image models ---

# --- video and 3D models (video_resnet.py, unet3d.py, inflate) ---
from oct3d.models.transfer import InflationReport, inflate  # noqa: E402
from oct3d.models.unet3d import OctUNet3d, oct_unet3d  # noqa: E402
from oct3d.models.video_resnet import (  # noqa: E402
    OctaveResplit,
    OctTemporalMaxPool,
    OctVideoResNet,
    oct_c2d_r50,
    oct_i3d_r50,
    oct_r3d_18,
    oct_r3d_34,
    oct_r3d_50,
    oct_slow_r50,
)

__all__ += [
    "InflationReport",
    "inflate",
    "OctaveResplit",
    "OctTemporalMaxPool",
    "OctVideoResNet",
    "oct_c2d_r50",
    "oct_i3d_r50",
    "oct_r3d_18",
    "oct_r3d_34",
    "oct_r3d_50",
    "oct_slow_r50",
    "OctUNet3d",
    "oct_unet3d",
]
# --- end video and 3D models ---
