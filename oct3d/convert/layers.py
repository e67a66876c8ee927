"""Run-time pieces of converted networks: per-branch norms and the low branch's resampling.

A converted graph holds each octave map as two tensors (``high``, ``low``) and calls the
original operation on each. Where the low branch needs more than that (its size must stay the
octave low size of the high branch after pooling or resizing; a norm needs its own channel
slice), the graph calls the functions and modules below. They are ordinary traceable code, so
converted networks compile (torch.compile), export (torch.export, ONNX) and trace (torch.jit.trace) like any
other; torch.jit.script, deprecated, is not supported (the Octave NamedTuple's annotations defeat it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from oct3d.convert.core import graph_leaf
from oct3d.nn import kernels
from oct3d.nn.octave import (
    Octave,
    avg_pool,
    fx_leaf_forward,
    keep_channels_last,
    low_size,
    module_hooks,
    traced_or_compiled,
)

__all__ = [
    "KernelConv2d",
    "KernelConv3d",
    "OctBranchNorm",
    "kernel_conv",
    "OctStochasticDepth",
    "octave_shape",
    "octave_size",
    "octave_split",
    "pad_low",
    "pool_low",
    "resize_low",
]

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class _KernelConv:
    """The forward of :class:`KernelConv2d` and :class:`KernelConv3d`."""

    @fx_leaf_forward
    def forward(self, x: Tensor) -> Tensor:
        """``nn.ConvNd``'s output; in eval mode on CPU through oct3d's kernel choice (equal up to rounding)."""
        if self.training or x.device.type != "cpu" or traced_or_compiled():
            return super().forward(x)
        # As an alpha-0 OctConv in eval mode: the autotuned kernel, packed weights without autograd
        # (F.convNd reorders the weight into oneDNN's layout on every call).
        out = kernels.conv_nd(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups, True)
        return keep_channels_last(out, x)


class KernelConv2d(_KernelConv, nn.Conv2d):
    """An ``nn.Conv2d`` that ``octavize`` keeps vanilla (the stem, the coarsest level): the same module and
    state dict, training exactly ``nn.Conv2d``; in eval mode on CPU it takes oct3d's kernel choice, as the
    builders' vanilla layers do."""


class KernelConv3d(_KernelConv, nn.Conv3d):
    """:class:`KernelConv2d` for ``nn.Conv3d``."""


def kernel_conv(module: nn.Module) -> nn.Module | None:
    """``module`` (a stock ``nn.Conv2d``/``nn.Conv3d``) as a :class:`KernelConv2d`/:class:`KernelConv3d`
    holding the same parameters and attributes; None where it should stay as it is: another type, a
    padding mode or string padding that ``conv_nd`` does not take, a parametrisation, or hooks."""
    kind = {nn.Conv2d: KernelConv2d, nn.Conv3d: KernelConv3d}.get(type(module))
    if (kind is None or module.padding_mode != "zeros" or isinstance(module.padding, str)
            or parametrize.is_parametrized(module) or module_hooks(module)):
        return None
    routed = kind.__new__(kind)
    # The same tensors and attributes, in dicts (parameters, buffers, hooks) of its own.
    routed.__dict__.update({k: type(v)(v) if isinstance(v, dict) else v for k, v in module.__dict__.items()})
    return routed


@graph_leaf
def octave_shape(high: Tensor, low: Tensor) -> torch.Size:
    """The shape of the vanilla map an octave pair stands for: ``high``'s, with both branches' channels."""
    return torch.Size((high.shape[0], high.shape[1] + low.shape[1], *high.shape[2:]))


@graph_leaf
def octave_size(high: Tensor, low: Tensor, dim: int | None = None) -> torch.Size | int:
    """``x.size(dim)`` of the vanilla map an octave pair stands for (see :func:`octave_shape`)."""
    shape = octave_shape(high, low)
    return shape if dim is None else shape[dim]


@graph_leaf
def octave_split(x: Tensor, low_channels: int, factors: Sequence[int]) -> Octave:
    """A plain map as an octave with its last ``low_channels`` channels pooled (``oct3d.nn.to_octave``).

    The converter splits the plain operand of a residual sum this way when the other operand is an octave.
    """
    high_channels = x.shape[1] - low_channels
    return Octave(x[:, :high_channels], avg_pool(x[:, high_channels:], factors))


def _crop_low(low: Tensor, high: Tensor, factors: Sequence[int], what: str) -> Tensor:
    expected = low_size(high.shape[2:], factors)
    if any(m < n for m, n in zip(low.shape[2:], expected)):
        raise ValueError(
            f"{what}: the low branch came out {tuple(low.shape[2:])} for a high branch of {tuple(high.shape[2:])}, "
            f"smaller than its octave size {expected}"
        )
    if tuple(low.shape[2:]) != expected:
        low = low[(slice(None), slice(None), *(slice(0, n) for n in expected))]
    return low


@graph_leaf
def pool_low(
    low: Tensor, high_out: Tensor, factors: Sequence[int], kind: str, kernel_size: Sequence[int],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int] = (1,), count_include_pad: bool = True,
) -> Tensor:
    """The low branch of a max or average pooling whose high branch gave ``high_out``.

    The low map pools with the same window in ceil mode and is cropped to the octave low size of
    ``high_out``: on odd sizes floor mode can drop a partial window that belongs to a kept high one
    (high 6 -> 3 but its low 3 -> 1, not 2).
    """
    dims = low.dim() - 2
    if kind == "max":
        dil = tuple(dilation) if len(dilation) == dims else tuple(dilation) * dims
        pooled = _MAX_POOL[dims](low, kernel_size, stride, padding, dil, ceil_mode=True)
    else:
        pooled = _AVG_POOL[dims](low, kernel_size, stride, padding, ceil_mode=True, count_include_pad=count_include_pad)
    return _crop_low(pooled, high_out, factors, f"{kind} pooling")


@graph_leaf
def resize_low(
    low: Tensor, high_out: Tensor, factors: Sequence[int], mode: str = "nearest", align_corners: bool | None = None
) -> Tensor:
    """The low branch of an interpolation (``F.interpolate``, ``nn.Upsample``) whose high branch gave ``high_out``.

    The low map is resized to the octave low size of ``high_out`` with the same mode, so both
    branches stay aligned whatever scale factor or target size the original asked for.
    """
    return F.interpolate(low, size=low_size(high_out.shape[2:], factors), mode=mode, align_corners=align_corners)


@graph_leaf
def pad_low(
    low: Tensor, high_out: Tensor, pad: Sequence[int], factors: Sequence[int], mode: str = "constant",
    value: float | None = None,
) -> Tensor:
    """The low branch of ``F.pad(high, pad, mode, value)`` whose high branch gave ``high_out``.

    Each padded axis of the low map gets ``left // factor`` before and whatever is left to reach the
    octave low size of ``high_out`` after, so the branches stay aligned on odd sizes.
    """
    target = low_size(high_out.shape[2:], factors)
    dims = low.dim() - 2
    low_pad: list[int] = []
    for i in range(len(pad) // 2):
        axis = dims - 1 - i  # F.pad lists the last axis first
        left = pad[2 * i] // factors[axis]
        low_pad += [left, target[axis] - low.shape[2 + axis] - left]
    if not any(low_pad):
        return low
    if mode == "constant":
        return F.pad(low, low_pad, mode, value)
    return F.pad(low, low_pad, mode)


def spatial_slices(index: object, ndim: int) -> list[slice] | None:
    """``index`` (of ``x[index]`` on an ``ndim``-D map) as one slice per axis, when it only slices spatial
    axes with step 1 (batch and channel axes whole, no integers, ``None`` or tensors); else ``None``."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(item is Ellipsis for item in items) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1:]
    items += [slice(None)] * (ndim - len(items))
    if len(items) != ndim or any(i.step not in (None, 1) for i in items):
        return None
    if any(i.start is not None or i.stop is not None for i in items[:2]):
        return None
    return items


@graph_leaf
def crop_low(low: Tensor, high: Tensor, high_out: Tensor, index: object, factors: Sequence[int]) -> Tensor:
    """The low branch of ``high[index]`` (a crop of spatial axes, see :func:`spatial_slices`) whose high
    branch gave ``high_out``: the matching region, starting at half the high start on each octave axis
    and as long as the octave low size of ``high_out``, so the branches stay aligned on odd sizes."""
    slices = spatial_slices(index, high.dim())
    if slices is None:
        raise ValueError(f"crop_low takes slices of spatial axes with step 1, got {index!r}")
    target = low_size(high_out.shape[2:], factors)
    for axis, (item, factor) in enumerate(zip(slices[2:], factors)):
        start = item.indices(high.shape[2 + axis])[0]
        low_start = min(start // factor, low.shape[2 + axis])
        length = min(target[axis], low.shape[2 + axis] - low_start)
        if (low_start, length) != (0, low.shape[2 + axis]):
            low = low.narrow(2 + axis, low_start, length)
    return low


class OctBranchNorm(nn.Module):
    """A normalisation per branch: ``norm_h`` on the high map, ``norm_l`` on the low map.

    Built by the converter from a vanilla ``InstanceNorm`` or ``GroupNorm`` by splitting its
    channels (and groups); each branch is normalised with its own statistics, as
    :class:`~oct3d.nn.OctBatchNorm` does for BatchNorm.
    """

    def __init__(self, norm_h: nn.Module, norm_l: nn.Module) -> None:
        super().__init__()
        self.norm_h = norm_h
        self.norm_l = norm_l

    @fx_leaf_forward
    def forward(self, x: Octave) -> Octave:
        if not isinstance(x, Octave) or x.low is None:
            raise TypeError(f"OctBranchNorm expects an Octave with a low tensor, got {type(x).__name__}")
        return Octave(self.norm_h(x.high), self.norm_l(x.low))


class OctStochasticDepth(nn.Module):
    """Stochastic depth (torchvision's ``StochasticDepth``) on an octave pair: one mask for both branches.

    ``mode="row"`` drops a whole sample's residual branch, ``"batch"`` the whole batch's, in the high and
    the low branch alike, so a residual is never half dropped. Identity in eval mode or with ``p == 0``.
    """

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        if mode not in ("row", "batch"):
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        self.p = p
        self.mode = mode

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"

    @fx_leaf_forward
    def forward(self, high: Tensor, low: Tensor) -> tuple[Tensor, Tensor]:
        if not self.training or self.p == 0.0:
            return high, low
        survival = 1.0 - self.p
        shape = [high.shape[0]] + [1] * (high.dim() - 1) if self.mode == "row" else [1] * high.dim()
        noise = torch.empty(shape, dtype=high.dtype, device=high.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return high * noise, low * noise
