"""Oct-UNet3d: a 3D U-Net for volumetric segmentation with octave convolutions throughout.

Encoder and decoder both carry octave maps (high and low branch). The first convolution takes
the plain input volume (``alpha_in = 0``), the last one (a 1x1x1 classifier) returns a plain
map (``alpha_out = 0``). Each encoder level after the first starts with a strided octave
convolution (stride 2 on every axis; an octave convolution pools first, then convolves). Each
decoder level upsamples each branch to the size of the matching skip branch (trilinear), applies
a 1x1x1 octave convolution, concatenates per branch (high with high, low with low) and applies
two 3x3x3 octave convolutions. Because the decoder resizes to the skip's exact size, any volume
size works, odd included, and the output has the input's spatial size.

``octave="spatial"`` halves only H and W in the low branch (the choice for anisotropic volumes
with thick slices along D); ``"spatiotemporal"`` halves D, H and W.

The first level has ``base_width=32`` channels by default, the width of the 3D U-Net of
Cicek et al. (2016) and of nnU-Net, and of ``configs/oct_unet3d_msd.yaml``. Narrower
networks work, but oneDNN runs narrow convolutions far below its peak (an isolated 3x3x3
convolution at 96x96x64 ran at about 100 GMAC/s with 8 channels, 145 with 16 and 205 with 32
on the development machine), and at alpha .5 the octave branches have half the channels: at
``base_width=16`` the octave network saves much less time than multiply-adds
(docs/speed.md).

On CPU the network runs in the channels_last_3d memory format (``channels_last=None``, the
default; the logits come back in the input's format). A U-Net's maps are large and narrow:
on channels-first maps oneDNN reorders every input and output to its blocked layout, and
those copies cost more than the convolutions (a full U-Net forward at 96x96x64 and width 16
ran about 5x faster in channels_last_3d on the development machine, at alpha 0 and .5 alike).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oct3d.models.blocks import init_like_vanilla
from oct3d.models.registry import register_model
from oct3d.nn import (
    OCTAVE_MODES,
    Octave,
    OctaveInput,
    OctaveOutput,
    OctBatchNorm,
    OctConv,
    OctInstanceNorm,
    OctReLU,
    map_octave,
    split_channels,
)
from oct3d.nn.conv import check_alpha, minimum_channels
from oct3d.nn.fold import conv_norm
from oct3d.nn.octave import (
    check_channels_last,
    fx_leaf_forward,
    graph_leaf,
    in_model_layout,
    is_channels_last,
    octave_axes,
    to_channels_last,
    weights_in_model_layout,
)

__all__ = ["OctUNet3d", "oct_unet3d"]


class _ConvBNReLU(nn.Sequential):
    """Octave conv -> BN -> ReLU whose output keeps a channels_last_3d input's layout.

    PyTorch's CPU im2col fallback (small batch-1 maps, e.g. a stride-2 convolution near the
    bottom of the U-Net) returns a channels_last input's result channels-first; converting
    back there keeps every later layer on the fast layout.
    """

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        out = conv_norm(self[0], self[1], x, self[2]) if len(self) == 3 else super().forward(x)
        if is_channels_last(_branches(x)[0]):
            out = map_octave(to_channels_last, out)  # no copy where the layout was kept
        return out


#: The per-branch normalisations the U-Net can use (``norm=``).
NORMS = ("batch", "instance")


def _conv_bn_relu(
    in_channels: int, out_channels: int, alpha_in: float, alpha_out: float, octave: str, stride: int = 1,
    kernel_size: int = 3, norm: str = "batch",
) -> nn.Sequential:
    norm_layer = OctBatchNorm if norm == "batch" else OctInstanceNorm
    return _ConvBNReLU(
        OctConv(3, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, octave=octave),
        norm_layer(3, out_channels, alpha_out),
        OctReLU(inplace=True),
    )


@graph_leaf
def _in_caller_layout(logits: Tensor, x: Tensor) -> Tensor:
    # Logits computed channels_last go back channels-first for a channels-first caller.
    return logits.contiguous() if x.is_contiguous() else logits


def _branches(x: OctaveInput) -> tuple[Tensor, Tensor | None]:
    return (x.high, x.low) if isinstance(x, Octave) else (x, None)


class _UpBlock(nn.Module):
    """Upsample each branch to the skip's sizes, 1x1x1 octave conv, concatenate per branch, two 3x3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, alpha: float, octave: str, norm: str = "batch") -> None:
        super().__init__()
        self.reduce = _conv_bn_relu(in_channels, out_channels, alpha, alpha, octave, kernel_size=1, norm=norm)
        # The concatenation holds twice the low channels of one map; giving the next convolution
        # exactly that ratio keeps its channel split equal to the concatenated split for any alpha.
        concat_alpha = split_channels(out_channels, alpha)[1] / out_channels
        self.conv1 = _conv_bn_relu(2 * out_channels, out_channels, concat_alpha, alpha, octave, norm=norm)
        self.conv2 = _conv_bn_relu(out_channels, out_channels, alpha, alpha, octave, norm=norm)

    @fx_leaf_forward
    def forward(self, x: OctaveInput, skip: OctaveInput) -> OctaveOutput:
        high, low = _branches(x)
        skip_high, skip_low = _branches(skip)
        high = F.interpolate(high, size=skip_high.shape[2:], mode="trilinear", align_corners=False)
        if low is not None:
            low = F.interpolate(low, size=skip_low.shape[2:], mode="trilinear", align_corners=False)
        up_high, up_low = _branches(self.reduce(Octave(high, low) if low is not None else high))
        merged_high = torch.cat([up_high, skip_high], dim=1)
        merged: OctaveInput = merged_high if up_low is None else Octave(merged_high, torch.cat([up_low, skip_low], 1))
        return self.conv2(self.conv1(merged))


class OctUNet3d(nn.Module):
    """3D U-Net with octave convolutions in every encoder and decoder level.

    Args:
        in_channels: channels of the input volume ``(N, C, D, H, W)``.
        num_classes: output channels (per-voxel class logits).
        alpha: octave ratio of every inner map, in [0, 1); 0 gives the vanilla 3D U-Net.
        octave: ``"spatial"`` (low branch at half H, W) or ``"spatiotemporal"`` (half D, H, W).
        base_width: channels of the first level (32, as in the 3D U-Net paper and nnU-Net);
            level ``i`` has ``base_width * 2**i``. Narrower networks save less CPU time at a
            given alpha: their half-width branches run further below oneDNN's peak.
        depth: number of resolution levels (``depth - 1`` downsamplings), at least 2.
        channels_last: run in the channels_last_3d memory format (the input marked so before
            the first convolution, logits returned channels-first for a channels-first input).
            ``None`` (default): on CPU inputs only.
        norm: ``"batch"`` (default: :class:`~oct3d.nn.OctBatchNorm`) or ``"instance"``
            (:class:`~oct3d.nn.OctInstanceNorm`, affine, as nnU-Net trains at batch size 2: each
            sample's statistics, so the batch size does not matter).

    Modules: ``encoder[i]`` (level ``i``: an optional strided conv, then two 3x3x3 convs; level 0
    starts from the plain input with ``alpha_in = 0``), ``decoder[i]`` (from level ``i + 1`` up to
    level ``i``), ``head`` (1x1x1 octave conv with ``alpha_out = 0`` and a bias).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, alpha: float = 0.5, octave: str = "spatial",
        base_width: int = 32, depth: int = 4, channels_last: bool | None = None, norm: str = "batch",
    ) -> None:
        super().__init__()
        self.channels_last = check_channels_last(channels_last)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        for name, value, minimum in (
            ("in_channels", in_channels, 1), ("num_classes", num_classes, 1), ("base_width", base_width, 1),
            ("depth", depth, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if octave not in OCTAVE_MODES:
            raise ValueError(f"octave must be one of {OCTAVE_MODES}, got {octave!r}")
        alpha = check_alpha(alpha)
        if alpha > 0 and split_channels(base_width, alpha)[1] == 0:
            raise ValueError(f"base_width={base_width} leaves no low-frequency channels at alpha={alpha}; "
                             f"use base_width >= {minimum_channels(alpha)} or alpha=0")
        self.in_channels = in_channels
        self.alpha = alpha
        self.octave = octave
        widths = [base_width * 2**i for i in range(depth)]

        self.encoder = nn.ModuleList()
        for i, width in enumerate(widths):
            if i == 0:
                first = _conv_bn_relu(in_channels, width, 0.0, alpha, octave, norm=norm)
            else:
                first = _conv_bn_relu(widths[i - 1], width, alpha, alpha, octave, stride=2, norm=norm)
            self.encoder.append(nn.Sequential(first, _conv_bn_relu(width, width, alpha, alpha, octave, norm=norm)))
        self.decoder = nn.ModuleList(_UpBlock(widths[i + 1], widths[i], alpha, octave, norm)
                                     for i in range(depth - 1))
        self.head = OctConv(3, widths[0], num_classes, 1, alpha, 0.0, bias=True, octave=octave)
        init_like_vanilla(self, "fan_out")
        weights_in_model_layout(self, self.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Per-voxel logits ``(N, num_classes, D, H, W)`` of a volume batch ``(N, in_channels, D, H, W)``."""
        traced = isinstance(x, torch.fx.Proxy)  # fx symbolic tracing: no checks on a Proxy
        if not traced and (not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.in_channels):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"OctUNet3d expects a volume batch of shape (N, {self.in_channels}, D, H, W), got {shape}")
        if (self.training or self.norm == "instance") and not traced:
            # InstanceNorm needs its per-sample statistics in eval mode too (it keeps no running ones).
            self._check_depth_fits(x)
        skips = []
        out: OctaveInput = in_model_layout(x, self.channels_last)
        for level in self.encoder:
            out = level(out)
            skips.append(out)
        for i in reversed(range(len(self.decoder))):
            out = self.decoder[i](out, skips[i])
        return _in_caller_layout(self.head(out), x)


    def _check_depth_fits(self, x: Tensor) -> None:
        # BatchNorm in training needs more than one value per channel; the deepest level's low
        # branch is the smallest map (each level ceil-halves every axis, the low branch its octave axes).
        size = list(x.shape[2:])
        for _ in range(len(self.encoder) - 1):
            size = [-(-n // 2) for n in size]
        if self.alpha > 0:
            size = [-(-n // 2) if halved else n for n, halved in zip(size, octave_axes(3, self.octave))]
        # InstanceNorm's statistics are per sample, BatchNorm's over the batch.
        values = math.prod(size) * (1 if self.norm == "instance" else x.shape[0])
        if values < 2:
            raise ValueError(
                f"a batch of {x.shape[0]} volume(s) of size {tuple(x.shape[2:])} is too small for depth="
                f"{len(self.encoder)}{' in training' if self.norm == 'batch' else ''}: the deepest level's maps are "
                f"{tuple(size)}, and "
                f"{'InstanceNorm' if self.norm == 'instance' else 'BatchNorm'} needs more than one value per channel"
                f"{' and sample' if self.norm == 'instance' else ''}; use larger patches"
                f"{'' if self.norm == 'instance' else ', a larger batch'} or a smaller depth"
            )


@register_model(task="segmentation")
def oct_unet3d(
    in_channels: int = 1,
    num_classes: int = 2,
    alpha: float = 0.5,
    octave: str = "spatial",
    base_width: int = 32,
    depth: int = 4,
    channels_last: bool | None = None,
    norm: str = "batch",
) -> OctUNet3d:
    """Oct-UNet3d for volumetric segmentation; any volume size in, the same size out.

    At ``alpha=0`` it is a plain 3D U-Net (batch-normalised double convolutions, strided
    convolution downsampling, trilinear upsampling + 1x1x1 convolution, concatenated skips).
    See :class:`OctUNet3d` for the arguments.
    """
    return OctUNet3d(in_channels, num_classes, alpha, octave, base_width, depth, channels_last, norm)

