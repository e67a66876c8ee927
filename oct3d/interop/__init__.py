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

# The pytorchvideo hooks load on first use: importing pytorchvideo takes about two seconds,
# which users of the checkpoint loader alone should not pay.
_PYTORCHVIDEO_NAMES = (
    "OctaveActivation",
    "OctaveBatchNorm",
    "OctaveConv",
    "OctaveSum",
    "create_octave_resnet",
    "init_octave_convs",
)


def __getattr__(name: str) -> object:
    """Load the pytorchvideo hooks when one of them is first asked for."""
    if name in _PYTORCHVIDEO_NAMES:
        from oct3d.interop import pytorchvideo

        return getattr(pytorchvideo, name)
    raise AttributeError(f"module 'oct3d.interop' has no attribute {name!r}")


__all__ = [
    "OctconvPytorchMismatchError",
    "from_octconv_pytorch",
    "load_octconv_pytorch",
    "read_octconv_pytorch",
    "translate_octconv_pytorch",
    *_PYTORCHVIDEO_NAMES,
]
