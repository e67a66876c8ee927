"""Interoperability with other libraries: pytorchvideo's builder hooks, d-li14/octconv.pytorch checkpoints.

- :mod:`oct3d.interop.pytorchvideo`: ``OctaveConv``, ``OctaveBatchNorm``, ``OctaveActivation`` and
  ``OctaveSum``, the callables pytorchvideo's ``create_res_block`` / ``create_bottleneck_block``
  accept, and ``create_octave_resnet``, an octave video ResNet built from pytorchvideo's builders.

See ``docs/interop.md``.
"""

from oct3d.interop.pytorchvideo import (
    OctaveActivation,
    OctaveBatchNorm,
    OctaveConv,
    OctaveSum,
    create_octave_resnet,
    init_octave_convs,
)

__all__ = [
    "OctaveActivation",
    "OctaveBatchNorm",
    "OctaveConv",
    "OctaveSum",
    "create_octave_resnet",
    "init_octave_convs",
]
