"""Octave layers for 1D, 2D and 3D maps behind one API.

>>> import torch
>>> from oct3d.nn import OctConv3d, OctBatchNorm3d, OctReLU
>>> conv = OctConv3d(16, 32, 3, alpha_in=0.0, alpha_out=0.5, octave="spatiotemporal")
>>> y = conv(torch.randn(1, 16, 7, 33, 31))     # plain tensor in, Octave out
>>> tuple(y.high.shape), tuple(y.low.shape)
((1, 16, 7, 33, 31), (1, 16, 4, 17, 16))
"""

from oct3d.nn.conv import OctConv, OctConv1d, OctConv2d, OctConv3d
from oct3d.nn.fold import conv_norm
from oct3d.nn.layers import (
    OctAvgPool,
    OctAvgPool1d,
    OctAvgPool2d,
    OctAvgPool3d,
    OctBatchNorm,
    OctBatchNorm1d,
    OctBatchNorm2d,
    OctBatchNorm3d,
    OctDropout,
    OctGlobalAvgPool,
    OctInstanceNorm,
    OctInstanceNorm1d,
    OctInstanceNorm2d,
    OctInstanceNorm3d,
    OctMap,
    OctMaxPool,
    OctMaxPool1d,
    OctMaxPool2d,
    OctMaxPool3d,
    OctReLU,
    map_octave,
    octave_add,
)
from oct3d.nn.octave import (
    OCTAVE_MODES,
    Octave,
    OctaveInput,
    OctaveOutput,
    from_octave,
    octave_factors,
    split_channels,
    to_octave,
)
from oct3d.nn.transposed import OctConvTranspose, OctConvTranspose1d, OctConvTranspose2d, OctConvTranspose3d

__all__ = [
    "OCTAVE_MODES",
    "Octave",
    "OctaveInput",
    "OctaveOutput",
    "OctConv",
    "OctConv1d",
    "OctConv2d",
    "OctConv3d",
    "OctConvTranspose",
    "OctConvTranspose1d",
    "OctConvTranspose2d",
    "OctConvTranspose3d",
    "OctBatchNorm",
    "OctBatchNorm1d",
    "OctBatchNorm2d",
    "OctBatchNorm3d",
    "OctInstanceNorm",
    "OctInstanceNorm1d",
    "OctInstanceNorm2d",
    "OctInstanceNorm3d",
    "OctMap",
    "OctReLU",
    "OctDropout",
    "OctMaxPool",
    "OctMaxPool1d",
    "OctMaxPool2d",
    "OctMaxPool3d",
    "OctAvgPool",
    "OctAvgPool1d",
    "OctAvgPool2d",
    "OctAvgPool3d",
    "OctGlobalAvgPool",
    "octave_add",
    "conv_norm",
    "map_octave",
    "to_octave",
    "from_octave",
    "octave_factors",
    "split_channels",
]
