"""oct3d: Octave Convolution for 2D, 3D and video in PyTorch."""

__version__ = "0.1.0"

from oct3d.convert import octavize as octavize  # any traceable CNN -> octave network, with its weights
from oct3d.fuse import fuse as fuse  # inference-time BatchNorm folding
