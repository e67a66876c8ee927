"""A plain-PyTorch network for the converter's examples: the README's 3D encoder/decoder, without octaves.

:class:`TinySegNet` is the README's ``TinyOctSegNet`` written as a user would write it with ``nn.Conv3d``
(in-plane downsampling, resize back to the skip's size, residual sum, 1x1 head). ``octavize`` turns it into
the octave network; the README, the tests and ``python -m oct3d.convert.table`` use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinySegNet"]


def _conv_bn_relu(cin: int, cout: int, stride: int | tuple[int, int, int] = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(True))


class TinySegNet(nn.Module):
    """Volumetric segmentation: two full-resolution layers, two in-plane strided ones, a decoder and a 1x1 head.

    Args:
        in_channels: channels of the input volume ``(N, C, D, H, W)``.
        num_classes: output channels (logits per voxel).
        width: channels of the full-resolution layers (the strided ones have twice as many).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 16) -> None:
        super().__init__()
        self.enc1 = _conv_bn_relu(in_channels, width)
        self.enc2 = _conv_bn_relu(width, width)
        self.down = _conv_bn_relu(width, 2 * width, stride=(1, 2, 2))  # in-plane only (anisotropic voxels)
        self.bottom = _conv_bn_relu(2 * width, 2 * width, stride=(1, 2, 2))
        self.up = _conv_bn_relu(2 * width, width)
        self.dec = _conv_bn_relu(width, width)
        self.head = nn.Conv3d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes, D, H, W)``, same size as the input (odd sizes too)."""
        skip = self.enc2(self.enc1(x))
        y = self.bottom(self.down(skip))
        # Back to the skip's size: `size=` handles odd volumes.
        y = self.up(F.interpolate(y, size=skip.shape[2:], mode="trilinear"))
        return self.head(self.dec(y + skip))
