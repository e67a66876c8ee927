"""Octave backbones (2D ImageNet, video, 3D segmentation) and weight transfer from vanilla models.

Every builder is also registered by name: ``get_model("oct_i3d_r50", alpha=0.5)``.
"""

from oct3d.models.blocks import OctBasicBlock, OctBottleneck, OctSqueezeExcite, make_stage
from oct3d.models.registry import get_model, list_models, model_task, register_model
from oct3d.models.transfer import VanillaMismatchError, load_vanilla, partition_conv_weight

__all__ = [
    "OctBasicBlock",
    "OctBottleneck",
    "OctSqueezeExcite",
    "make_stage",
    "load_vanilla",
    "partition_conv_weight",
    "VanillaMismatchError",
    "get_model",
    "list_models",
    "model_task",
    "register_model",
]

# --- 2D image models (resnet.py, mobilenet.py, densenet.py) ---
# --- end 2D image models ---

# --- video and 3D models (video_resnet.py, unet3d.py, inflate) ---
# --- end video and 3D models ---
