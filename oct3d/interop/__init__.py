"""Interoperability with other libraries: pytorchvideo's builder hooks, d-li14/octconv.pytorch checkpoints.

- :mod:`oct3d.interop.pytorchvideo`: ``OctaveConv``, ``OctaveBatchNorm``, ``OctaveActivation`` and
  ``OctaveSum``, the callables pytorchvideo's ``create_res_block`` / ``create_bottleneck_block``
  accept, and ``create_octave_resnet``, an octave video ResNet built from pytorchvideo's builders.
- :mod:`oct3d.interop.octconv_pytorch`: ``from_octconv_pytorch`` / ``load_octconv_pytorch`` read the
  Oct-ResNet ImageNet checkpoints of d-li14/octconv.pytorch into oct3d's ``OctResNet``.

See ``docs/interop.md``.
"""

from oct3d.interop.octconv_pytorch import (
    OctconvPytorchMismatchError,
    from_octconv_pytorch,
    load_octconv_pytorch,
    read_octconv_pytorch,
    translate_octconv_pytorch,
)
from oct3d.interop.pytorchvideo import (
    OctaveActivation,
    OctaveBatchNorm,
    OctaveConv,
    OctaveSum,
    create_octave_resnet,
    init_octave_convs,
)

__all__ = [
    "OctconvPytorchMismatchError",
    "from_octconv_pytorch",
    "load_octconv_pytorch",
    "read_octconv_pytorch",
    "translate_octconv_pytorch",
    "OctaveActivation",
    "OctaveBatchNorm",
    "OctaveConv",
    "OctaveSum",
    "create_octave_resnet",
    "init_octave_convs",
]
