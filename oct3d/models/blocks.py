"""Dimension-generic octave residual blocks, shared by the 2D ResNets and the video ResNets.

Names follow torchvision's ``resnet`` (``conv1``, ``bn1``, ..., ``downsample``), so a 2D
Oct-ResNet at ``alpha=0`` has the same module tree as torchvision's. A block carries three
ratios: ``alpha_in`` (its input), ``alpha`` (its inner convolutions) and ``alpha_out`` (its
output and shortcut). The transitions of docs/semantics.md section 4 are blocks with
``alpha_in=0`` (first octave block) or ``alpha=alpha_out=0`` (first vanilla block).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from oct3d.nn import (
    Octave,
    OctaveInput,
    OctaveOutput,
    OctBatchNorm,
    OctConv,
    OctReLU,
    from_octave,
    octave_add,
    split_channels,
    to_octave,
)
from oct3d.nn.conv import IntOrTuple, check_alpha, to_tuple
from oct3d.nn.fold import conv_norm
from oct3d.nn.octave import fx_leaf_forward, traced_or_compiled

__all__ = [
    "OctBasicBlock",
    "OctBottleneck",
    "OctSqueezeExcite",
    "OctaveResplit",
    "conv_bn",
    "init_like_vanilla",
    "make_stage",
]


def init_like_vanilla(model: nn.Module, conv_mode: str = "fan_out") -> None:
    """Kaiming-normal initialisation of every convolution as if it were the vanilla layer.

    The four paths of an :class:`~oct3d.nn.OctConv` are slices of one vanilla weight, so each
    gets the vanilla layer's standard deviation ``sqrt(2 / fan)`` (fan of the whole layer, not
    of the slice); initialising each path on its own would inflate the variance by up to
    ``1 / alpha``. BatchNorms start at weight 1, bias 0 (``bn_h`` and ``bn_l`` alike).

    Args:
        model: the network to initialise in place.
        conv_mode: ``"fan_out"`` (torchvision ResNet, MobileNetV2) or ``"fan_in"`` (DenseNet).
    """
    if conv_mode not in ("fan_in", "fan_out"):
        raise ValueError(f"conv_mode must be 'fan_in' or 'fan_out', got {conv_mode!r}")
    # OctConv paths are initialised through their parent, with the whole layer's fan.
    octave_paths = {id(c) for m in model.modules() if isinstance(m, OctConv) for c in m.children()}
    for module in model.modules():
        if isinstance(module, OctConv):
            receptive = math.prod(module.kernel_size)
            if conv_mode == "fan_out":
                fan = module.out_channels * receptive
            else:
                fan = module.in_channels // (module.in_channels if module.depthwise else module.groups) * receptive
            std = math.sqrt(2.0 / fan)
            for path in (module.h2h, module.h2l, module.l2h, module.l2l):
                if path is not None:
                    nn.init.normal_(path.weight, 0.0, std)
                    if path.bias is not None:
                        nn.init.zeros_(path.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(module) not in octave_paths:
            nn.init.kaiming_normal_(module.weight, mode=conv_mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def conv_bn(
    dims: int, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float, alpha_out: float,
    stride: IntOrTuple = 1, groups: int = 1, octave: str = "spatial", pool_first: bool = False,
) -> nn.Sequential:
    """An octave convolution followed by its octave BatchNorm, as ``Sequential(conv, bn)``.

    ``pool_first`` is :class:`~oct3d.nn.OctConv`'s: a strided ratio-0 layer pools, then convolves at stride 1.
    """
    return ConvBN(
        OctConv(
            dims, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, groups=groups, octave=octave,
            pool_first=pool_first,
        ),
        OctBatchNorm(dims, out_channels, alpha_out),
    )


class ConvBN(nn.Sequential):
    """``Sequential(conv, bn)`` whose forward folds the BatchNorm into the convolution in eval-mode
    CPU inference (:func:`oct3d.nn.fold.conv_norm`); the same modules and state-dict keys."""

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """``bn(conv(x))``."""
        if len(self) != 2:  # edited after construction: run what it holds
            return super().forward(x)
        return conv_norm(self[0], self[1], x)


def resolve_pool_first(pool_first: bool | None, alphas: Sequence[float]) -> bool:
    """How the strided ratio-0 convolutions of a network with stage ratios ``alphas`` stride.

    ``None`` (the builders' default) follows the official OctConv code: inside an octave
    network (any ratio > 0) *every* strided convolution average-pools by its stride and
    convolves at stride 1, ratio 0 included (e.g. Oct-ResNet-50's ``layer4.0.conv2``), so the
    official and d-li14 checkpoints compute the same function here. At alpha 0 the network stays
    exactly the vanilla one (strided convolutions). ``True``/``False`` force either rule.
    """
    if pool_first is None:
        return any(a > 0 for a in alphas)
    if not isinstance(pool_first, bool):
        raise TypeError(f"pool_first must be None or a bool, got {pool_first!r}")
    return pool_first


class OctSqueezeExcite(nn.Module):
    """Squeeze-and-excitation for octave maps (docs/semantics.md section 3).

    Each branch is average-pooled, the results are concatenated and squeezed by one shared
    FC (``fc1``); each branch is excited by its own FC (``fc_h``, ``fc_l``) and a sigmoid.
    At ``alpha == 0`` it is the ordinary SE block.
    """

    def __init__(self, channels: int, alpha: float, reduction: int = 16) -> None:
        super().__init__()
        self.high_channels, self.low_channels = split_channels(channels, alpha)
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc_h = nn.Linear(hidden, self.high_channels)
        self.fc_l = nn.Linear(hidden, self.low_channels) if self.low_channels else None

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        high = x.high if isinstance(x, Octave) else x
        low = x.low if isinstance(x, Octave) else None
        pooled = [high.mean(dim=tuple(range(2, high.dim())))]
        if low is not None:
            pooled.append(low.mean(dim=tuple(range(2, low.dim()))))
        squeezed = self.relu(self.fc1(torch.cat(pooled, dim=1)))
        extra = (1,) * (high.dim() - 2)
        scale_h = torch.sigmoid(self.fc_h(squeezed)).view(*squeezed.shape[:1], -1, *extra)
        out_high = high * scale_h
        if low is None:
            return Octave(out_high, None) if isinstance(x, Octave) else out_high
        scale_l = torch.sigmoid(self.fc_l(squeezed)).view(*squeezed.shape[:1], -1, *extra)
        return Octave(out_high, low * scale_l)


class OctaveResplit(nn.Module):
    """Parameter-free shortcut that re-splits a map from ratio ``alpha_in`` to ``alpha_out``.

    The identity of a residual block whose convolutions change only the octave ratio: the map is
    merged to full resolution (:func:`~oct3d.nn.from_octave`, nearest upsampling of the low
    branch) and split again (:func:`~oct3d.nn.to_octave`, average pooling of the last channels).
    From a plain tensor (``alpha_in = 0``) that is exactly ``to_octave``.
    """

    def __init__(self, alpha_in: float, alpha_out: float, octave: str = "spatial") -> None:
        super().__init__()
        self.alpha_in = check_alpha(alpha_in, "alpha_in")
        self.alpha_out = check_alpha(alpha_out, "alpha_out")
        self.octave = octave

    def extra_repr(self) -> str:
        return f"alpha_in={self.alpha_in}, alpha_out={self.alpha_out}, octave={self.octave!r}"

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        full = from_octave(x, self.octave)
        return to_octave(full, self.alpha_out, self.octave) if self.alpha_out > 0 else full


class _OctResidual(nn.Module):
    """Shared residual plumbing: ``relu(branch(x) + shortcut(x))`` per octave branch."""

    downsample: nn.Module | None

    def _shortcut(
        self, dims: int, in_channels: int, out_channels: int, stride: tuple[int, ...], alpha_in: float,
        alpha_out: float, octave: str, pool_first: bool,
    ) -> nn.Module | None:
        if in_channels == out_channels and all(s == 1 for s in stride):
            # Only the octave ratio may change (e.g. R3D's layer1.0): re-split the identity rather
            # than add a projection the vanilla network lacks, so parameters stay independent of alpha.
            return None if alpha_in == alpha_out else OctaveResplit(alpha_in, alpha_out, octave)
        return conv_bn(
            dims, in_channels, out_channels, 1, alpha_in, alpha_out, stride, octave=octave, pool_first=pool_first
        )

    def _finish(self, out: OctaveInput, x: OctaveInput) -> OctaveOutput:
        identity = x if self.downsample is None else self.downsample(x)
        pairs = _branch_pairs(out, identity)
        if pairs is not None and not traced_or_compiled():
            # Into the last BatchNorm's (or SE's) fresh output, which its backward does not need, as
            # torchvision's blocks do (out += identity): no new maps in every block.
            for a, b in pairs:
                a.add_(b)
            return self.relu(out)
        return self.relu(octave_add(out, identity))


def _branch_pairs(a: object, b: object) -> list[tuple[Tensor, Tensor]] | None:
    """The ``(a, b)`` tensor pairs of two maps with the same branches and shapes, else None."""
    if isinstance(a, Octave) and isinstance(b, Octave):
        pairs = [(a.high, b.high)] + ([] if a.low is None and b.low is None else [(a.low, b.low)])
    elif isinstance(a, Tensor) and isinstance(b, Tensor):
        pairs = [(a, b)]
    else:
        return None
    if all(isinstance(p, Tensor) and isinstance(q, Tensor) and p.shape == q.shape for p, q in pairs):
        return pairs
    return None


class OctBottleneck(_OctResidual):
    """Bottleneck residual block (1x1 -> kxk -> 1x1, stride on the kxk conv, ResNet v1.5) for any dims.

    Args:
        dims: 2 for images, 3 for video/volumes.
        in_channels, width, out_channels: input, inner and output channel counts.
        stride: stride of the middle convolution and of the shortcut (int or per-axis tuple).
        groups: groups of the middle convolution (ResNeXt cardinality).
        alpha_in, alpha, alpha_out: octave ratios of the input, the inner maps and the output.
        kernel_a: kernel of ``conv1`` (1 in 2D; ``(3, 1, 1)`` for I3D's temporal conv).
        kernel_b: kernel of ``conv2`` (3 in 2D; ``(1, 3, 3)`` in the video ResNets).
        octave: ``"spatial"`` or ``"spatiotemporal"`` (3D).
        se_reduction: add an :class:`OctSqueezeExcite` with this reduction (SE-ResNet).
        pool_first: a strided ratio-0 ``conv2`` and shortcut pool by the stride and convolve at
            stride 1 (see :func:`resolve_pool_first`); octave layers always do.
    """

    def __init__(
        self, dims: int, in_channels: int, width: int, out_channels: int, stride: IntOrTuple = 1, groups: int = 1,
        alpha_in: float = 0.5, alpha: float = 0.5, alpha_out: float = 0.5, kernel_a: IntOrTuple = 1,
        kernel_b: IntOrTuple = 3, octave: str = "spatial", se_reduction: int | None = None, pool_first: bool = False,
    ) -> None:
        super().__init__()
        stride_t = to_tuple(stride, dims, "stride")
        self.conv1 = OctConv(dims, in_channels, width, kernel_a, alpha_in, alpha, octave=octave)
        self.bn1 = OctBatchNorm(dims, width, alpha)
        self.conv2 = OctConv(
            dims, width, width, kernel_b, alpha, alpha, stride_t, groups=groups, octave=octave, pool_first=pool_first
        )
        self.bn2 = OctBatchNorm(dims, width, alpha)
        self.conv3 = OctConv(dims, width, out_channels, 1, alpha, alpha_out, octave=octave)
        self.bn3 = OctBatchNorm(dims, out_channels, alpha_out)
        self.se = OctSqueezeExcite(out_channels, alpha_out, se_reduction) if se_reduction else None
        self.relu = OctReLU(inplace=True)
        self.downsample = self._shortcut(
            dims, in_channels, out_channels, stride_t, alpha_in, alpha_out, octave, pool_first
        )

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        out = conv_norm(self.conv1, self.bn1, x, self.relu)
        out = conv_norm(self.conv2, self.bn2, out, self.relu)
        out = conv_norm(self.conv3, self.bn3, out)
        if self.se is not None:
            out = self.se(out)
        return self._finish(out, x)


class OctBasicBlock(_OctResidual):
    """Basic residual block (two kxk convolutions, stride on the first) for any dims.

    ``kernel_size`` is 3 in 2D and ``3`` (3x3x3) in R3D. ``width`` is accepted for a common
    signature with :class:`OctBottleneck` and must equal ``out_channels``. ``pool_first`` is as
    for :class:`OctBottleneck`, on ``conv1`` and the shortcut.
    """

    def __init__(
        self, dims: int, in_channels: int, width: int, out_channels: int, stride: IntOrTuple = 1, groups: int = 1,
        alpha_in: float = 0.5, alpha: float = 0.5, alpha_out: float = 0.5, kernel_size: IntOrTuple = 3,
        octave: str = "spatial", pool_first: bool = False,
    ) -> None:
        super().__init__()
        if groups != 1 or width != out_channels:
            raise ValueError(f"OctBasicBlock needs groups=1 and width == out_channels, got {groups=}, {width=}")
        stride_t = to_tuple(stride, dims, "stride")
        self.conv1 = OctConv(
            dims, in_channels, out_channels, kernel_size, alpha_in, alpha, stride_t, octave=octave,
            pool_first=pool_first,
        )
        self.bn1 = OctBatchNorm(dims, out_channels, alpha)
        self.conv2 = OctConv(dims, out_channels, out_channels, kernel_size, alpha, alpha_out, octave=octave)
        self.bn2 = OctBatchNorm(dims, out_channels, alpha_out)
        self.relu = OctReLU(inplace=True)
        self.downsample = self._shortcut(
            dims, in_channels, out_channels, stride_t, alpha_in, alpha_out, octave, pool_first
        )

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        out = conv_norm(self.conv1, self.bn1, x, self.relu)
        out = conv_norm(self.conv2, self.bn2, out)
        return self._finish(out, x)


def make_stage(
    block: type[OctBottleneck] | type[OctBasicBlock],
    dims: int,
    in_channels: int,
    width: int,
    out_channels: int,
    depth: int,
    stride: IntOrTuple,
    alpha_in: float,
    alpha: float,
    octave: str = "spatial",
    block_kwargs: Sequence[dict] | dict | None = None,
    **kwargs,
) -> nn.Sequential:
    """A stage of ``depth`` blocks: the first changes stride/width/ratio, the rest keep them.

    The first block maps ``alpha_in -> alpha``; when ``alpha == 0`` (a vanilla stage after
    an octave one) its inner convolutions are vanilla too (docs/semantics.md section 4). ``block_kwargs``
    gives extra per-block keyword arguments (one dict for all, or a list of ``depth`` dicts),
    e.g. I3D's alternating temporal kernels.
    """
    if isinstance(block_kwargs, dict) or block_kwargs is None:
        per_block = [dict(block_kwargs or {}) for _ in range(depth)]
    else:
        per_block = [dict(k) for k in block_kwargs]
        if len(per_block) != depth:
            raise ValueError(f"block_kwargs has {len(per_block)} entries for a stage of depth {depth}")
    blocks = []
    for i in range(depth):
        blocks.append(
            block(
                dims,
                in_channels if i == 0 else out_channels,
                width,
                out_channels,
                stride=stride if i == 0 else 1,
                alpha_in=alpha_in if i == 0 else alpha,
                alpha=alpha,
                alpha_out=alpha,
                octave=octave,
                **kwargs,
                **per_block[i],
            )
        )
    return nn.Sequential(*blocks)
