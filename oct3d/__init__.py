"""oct3d: Octave Convolution for 2D, 3D and video in PyTorch."""

__version__ = "0.1.0"

from oct3d.fuse import fuse as fuse  # inference-time BatchNorm folding


def __getattr__(name: str) -> object:
    # `from oct3d import octavize` without importing the converter (and torchvision) with every `import oct3d`.
    if name == "octavize":
        from oct3d.convert import octavize

        return octavize
    raise AttributeError(f"module 'oct3d' has no attribute {name!r}")
