"""Octave companions of the convolution: BatchNorm, per-branch wrappers, pooling, heads.

Each accepts an :class:`~oct3d.nn.Octave` or a plain tensor (a representation with no low
branch), so octave and vanilla parts of a network compose freely.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oct3d.nn.conv import IntOrTuple, check_alpha, check_bool, check_minimums, check_positive_int, to_tuple
from oct3d.nn.norm import batch_norm
from oct3d.nn.octave import (
    CHANNELS_LAST_FORMATS,
    OCTAVE_MODES,
    Octave,
    OctaveInput,
    OctaveOutput,
    axes_names,
    check_low_size,
    check_same_dtype_device,
    fx_leaf_forward,
    is_channels_last,
    low_size,
    octave_factors,
    pair_as_octave,
    split_channels,
)

__all__ = [
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
    "map_octave",
]

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def map_octave(fn: Callable[[Tensor], Tensor], x: OctaveInput) -> OctaveOutput:
    """Apply ``fn`` to each branch of ``x`` (a plain tensor is one branch; a ``(high, low)`` pair is an Octave)."""
    x = pair_as_octave(x)
    if isinstance(x, Octave):
        return Octave(fn(x.high), None if x.low is None else fn(x.low))
    if isinstance(x, Tensor):
        return fn(x)
    raise TypeError(f"expected a torch.Tensor or an Octave, got {type(x).__name__}")


def octave_add(a: OctaveInput, b: OctaveInput) -> OctaveOutput:
    """Per-branch sum of two octave maps (``high + high``, ``low + low``), e.g. a residual.

    Both must have the same branches of the same shapes: a residual of two octave maps adds, it
    does not broadcast.
    """
    a, b = pair_as_octave(a), pair_as_octave(b)
    branches = [t for x in (a, b) for t in ((x.high, x.low) if isinstance(x, Octave) else (x,))]
    traced = any(isinstance(t, torch.fx.Proxy) for t in branches)
    if not traced:  # (torch.fx symbolic tracing passes Proxies, whose shapes are unknown)
        for name, value in (("a", a), ("b", b)):
            if not isinstance(value, (Tensor, Octave)):
                raise TypeError(f"octave_add's {name} must be a torch.Tensor, an Octave or a (high, low) pair, "
                                f"got {type(value).__name__}")
        _check_same_branch_shapes(a, b)
    if isinstance(a, Octave) != isinstance(b, Octave):
        a_low = a.low if isinstance(a, Octave) else None
        b_low = b.low if isinstance(b, Octave) else None
        if a_low is not None or b_low is not None:
            raise TypeError("octave_add needs both inputs to have a low branch, or neither")
        a = a.high if isinstance(a, Octave) else a
        b = b.high if isinstance(b, Octave) else b
    if isinstance(a, Tensor):
        return a + b
    if (a.low is None) != (b.low is None):
        raise TypeError("octave_add needs both inputs to have a low branch, or neither")
    return Octave(a.high + b.high, None if a.low is None else a.low + b.low)


def _check_octave_pair(layer: str, high: Tensor, low: Tensor) -> None:
    """Raise unless ``low`` can be ``high``'s octave (same batch; the ceiling of half on the octave axes of
    some octave mode: a layer without an ``octave`` setting accepts either 3D mode)."""
    check_same_dtype_device(layer, high, low)
    dims = high.dim() - 2
    modes = OCTAVE_MODES if dims == 3 else ("spatial",)
    sizes = [low_size(high.shape[2:], octave_factors(max(dims, 1), mode)) for mode in modes]
    if low.shape[0] != high.shape[0] or tuple(low.shape[2:]) not in sizes:
        raise ValueError(
            f"{layer} expects the low tensor of a high tensor shaped {tuple(high.shape)} to have its batch size "
            f"and spatial size {' or '.join(map(str, sizes))} (ceil of half on the octave axes), got {tuple(low.shape)}"
        )


def _looks_paired(high: Tensor, low: Tensor) -> bool:
    """A cheap test that ``low`` can be ``high``'s octave (per-layer hot path); False sends the pair to
    :func:`_check_octave_pair` for the full check and its message. A 3D map's first axis may be either
    halved (spatiotemporal) or kept (spatial)."""
    high_shape, low_shape = high.shape, low.shape
    if len(high_shape) != len(low_shape) or high_shape[0] != low_shape[0] or high.dtype != low.dtype \
            or high.device != low.device:
        return False
    sizes = list(zip(high_shape[2:], low_shape[2:]))
    if len(sizes) == 3 and sizes[0][0] == sizes[0][1]:
        sizes = sizes[1:]
    return all(m == (n + 1) // 2 for n, m in sizes)


def _check_same_branch_shapes(a: Tensor | Octave, b: Tensor | Octave) -> None:
    def shapes(x: Tensor | Octave) -> tuple:
        if isinstance(x, Tensor):
            return (tuple(x.shape), None)
        return (tuple(x.high.shape), None if x.low is None else tuple(x.low.shape))

    (a_high, a_low), (b_high, b_low) = shapes(a), shapes(b)
    if (a_low is None) != (b_low is None):
        with_low = "a" if a_low is not None else "b"
        raise TypeError(f"octave_add needs both inputs to have a low branch, or neither; only {with_low} has one "
                        f"(a: {a_high} + low {a_low}, b: {b_high} + low {b_low})")
    if a_high != b_high or a_low != b_low:
        raise ValueError(
            f"octave_add needs equal branch shapes, got high {a_high} and {b_high}, low {a_low} and {b_low}"
        )


class _OctNorm(nn.Module):
    """What the per-branch norms share: ``dims``, ``num_features`` split by ``alpha`` into
    ``high_channels`` and ``low_channels`` (checked), and their ``extra_repr``."""

    def __init__(self, dims: int, num_features: int, alpha: float) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
        check_positive_int(num_features, "num_features")
        self.dims = dims
        self.num_features = num_features
        self.alpha = check_alpha(alpha)
        self.high_channels, self.low_channels = split_channels(num_features, self.alpha)
        if self.alpha > 0 and self.low_channels == 0:
            raise ValueError(f"alpha={alpha} gives no low-frequency channels out of num_features={num_features}")

    def extra_repr(self) -> str:
        # Constructor-like: OctBatchNorm3d(64, alpha=0.5); the generic classes lead with dims.
        generic = not isinstance(self, (OctBatchNorm1d, OctBatchNorm2d, OctBatchNorm3d, OctInstanceNorm1d,
                                        OctInstanceNorm2d, OctInstanceNorm3d))
        return f"{f'{self.dims}, ' if generic else ''}{self.num_features}, alpha={self.alpha}"


class OctBatchNorm(_OctNorm):
    """BatchNorm with separate statistics for the high (``bn_h``) and low (``bn_l``) branch.

    ``num_features`` is the total channel count; ``alpha`` splits it as in :class:`OctConv`.
    At ``alpha == 0`` there is no ``bn_l`` and the module is one ``BatchNormNd``. ``eps``,
    ``momentum``, ``affine``, ``track_running_stats`` and ``bias`` (a learnable shift with
    ``affine``; ``bias=False`` needs a torch whose ``BatchNormNd`` takes it) are
    ``nn.BatchNormNd``'s, for both branches, and so are ``device`` and ``dtype``.
    """

    def __init__(
        self, dims: int, num_features: int, alpha: float = 0.5, eps: float = 1e-5,
        momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True, *, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dims, num_features, alpha)
        kwargs: dict = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
                            device=device, dtype=dtype)
        if not bias:
            kwargs["bias"] = False  # only passed when asked: older torch versions do not take the argument
        self.bn_h = _BN[dims](self.high_channels, **kwargs)
        self.bn_l = _BN[dims](self.low_channels, **kwargs) if self.low_channels else None

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """Each branch normalised by its own BatchNorm; the input's form (tensor or Octave) is kept."""
        x, high, low = _norm_input(self, "OctBatchNorm", x, self.bn_l is not None)
        if self.bn_l is None:
            out = batch_norm(self.bn_h, high)
            return Octave(out, None) if isinstance(x, Octave) else out
        return Octave(batch_norm(self.bn_h, high), batch_norm(self.bn_l, low))


def _norm_input(norm: nn.Module, name: str, x: OctaveInput, has_low: bool) -> tuple[OctaveInput, Tensor, Tensor | None]:
    """``(x, high, low)`` of a per-branch norm's input, checked against the norm's ``dims`` and channel split."""
    x = pair_as_octave(x)
    high = x.high if isinstance(x, Octave) else x
    low = x.low if isinstance(x, Octave) else None
    if not isinstance(high, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor or an Octave, got {type(x).__name__}")
    for branch, t in (("high", high), ("low", low)):
        if t is not None and t.dim() != norm.dims + 2 and not (norm.dims == 1 and t.dim() == 2):
            raise ValueError(f"{name}{norm.dims}d expects {norm.dims + 2}D {branch} maps (N, C, ...), got "
                             f"shape {tuple(t.shape)}")
    if high.shape[1] != norm.high_channels or (low is None) == has_low or (
        low is not None and low.shape[1] != norm.low_channels
    ):
        got = f"high {high.shape[1]}" + ("" if low is None else f", low {low.shape[1]}")
        want = f"high {norm.high_channels}" + ("" if not has_low else f", low {norm.low_channels}")
        raise ValueError(
            f"{name}(num_features={norm.num_features}, alpha={norm.alpha}) expects channels ({want}), got ({got})"
        )
    if not high.is_floating_point():
        raise TypeError(f"{name}{norm.dims}d expects floating-point maps, got {high.dtype}")
    if low is not None:
        _check_octave_pair(f"{name}{norm.dims}d", high, low)
    return x, high, low


_IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class OctInstanceNorm(_OctNorm):
    """InstanceNorm per branch: ``in_h`` normalises the high map, ``in_l`` the low map, each sample and
    channel with its own statistics (the norm nnU-Net trains 3D networks with at batch size 2).

    ``num_features`` and ``alpha`` split the channels as in :class:`OctBatchNorm`; ``eps``,
    ``momentum``, ``affine`` (default True here, as nnU-Net uses it) and ``track_running_stats``
    are ``nn.InstanceNormNd``'s, for both branches.
    """

    def __init__(
        self, dims: int, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = False, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dims, num_features, alpha)
        kwargs: dict = dict(eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats,
                            device=device, dtype=dtype)
        self.in_h = _IN[dims](self.high_channels, **kwargs)
        self.in_l = _IN[dims](self.low_channels, **kwargs) if self.low_channels else None

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """Each branch normalised by its own InstanceNorm; the input's form (tensor or Octave) is kept."""
        x, high, low = _norm_input(self, "OctInstanceNorm", x, self.in_l is not None)
        if self.training or not self.in_h.track_running_stats:
            # Per-sample statistics need more than one value per channel, in the (smaller) low map too.
            for branch, t in (("high", high), ("low", low)):
                if t is not None and t.shape[2:].numel() < 2:
                    raise ValueError(
                        f"OctInstanceNorm{self.dims}d normalises each sample's channels over their voxels and needs "
                        f"more than one per map; the {branch} map has size {tuple(t.shape[2:])} (input high "
                        f"{tuple(high.shape)}{'' if low is None else f', low {tuple(low.shape)}'}). Use larger inputs"
                    )
        if self.in_l is None:
            out = self.in_h(high)
            return Octave(out, None) if isinstance(x, Octave) else out
        return Octave(self.in_h(high), self.in_l(low))


class OctBatchNorm1d(OctBatchNorm):
    """:class:`OctBatchNorm` for 1D maps."""

    def __init__(
        self, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, *, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, num_features, alpha, eps, momentum, affine, track_running_stats, bias=bias,
                         device=device, dtype=dtype)


class OctBatchNorm2d(OctBatchNorm):
    """:class:`OctBatchNorm` for 2D maps."""

    def __init__(
        self, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, *, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(2, num_features, alpha, eps, momentum, affine, track_running_stats, bias=bias,
                         device=device, dtype=dtype)


class OctBatchNorm3d(OctBatchNorm):
    """:class:`OctBatchNorm` for 3D maps."""

    def __init__(
        self, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = True, *, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(3, num_features, alpha, eps, momentum, affine, track_running_stats, bias=bias,
                         device=device, dtype=dtype)


class OctInstanceNorm1d(OctInstanceNorm):
    """:class:`OctInstanceNorm` for 1D maps (``affine=True`` by default, unlike ``nn.InstanceNorm1d``)."""

    def __init__(
        self, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = False, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, num_features, alpha, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)


class OctInstanceNorm2d(OctInstanceNorm):
    """:class:`OctInstanceNorm` for 2D maps (``affine=True`` by default, unlike ``nn.InstanceNorm2d``)."""

    def __init__(
        self, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = False, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(2, num_features, alpha, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)


class OctInstanceNorm3d(OctInstanceNorm):
    """:class:`OctInstanceNorm` for 3D maps (``affine=True`` by default, unlike ``nn.InstanceNorm3d``)."""

    def __init__(
        self, num_features: int, alpha: float = 0.5, eps: float = 1e-5, momentum: float | None = 0.1,
        affine: bool = True, track_running_stats: bool = False, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(3, num_features, alpha, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)


class OctMap(nn.Module):
    """Apply a module to each branch of an octave map (activation, dropout, any elementwise op).

    With ``share=True`` (the default) one instance serves both branches, right for stateless
    modules such as ``nn.ReLU`` or ``nn.Dropout``. With ``share=False`` the low branch gets a
    deep copy (``module_l``), for modules with parameters or state.
    """

    def __init__(self, module: nn.Module, share: bool = True) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        self.module = module
        self.module_l = None if share else copy.deepcopy(module)

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """The module applied to each branch (or to a plain tensor)."""
        x = pair_as_octave(x)
        if isinstance(x, Octave):
            if x.low is not None and isinstance(x.high, Tensor) and isinstance(x.low, Tensor) and not _looks_paired(
                    x.high, x.low):
                name = f"OctMap({type(self.module).__name__})" if type(self) is OctMap else type(self).__name__
                _check_octave_pair(name, x.high, x.low)  # raises, naming what does not match
            low_fn = self.module if self.module_l is None else self.module_l
            return Octave(self.module(x.high), None if x.low is None else low_fn(x.low))
        if isinstance(x, Tensor):
            return self.module(x)
        raise TypeError(f"OctMap expects a torch.Tensor or an Octave, got {type(x).__name__}")


class OctReLU(OctMap):
    """ReLU on each branch."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__(nn.ReLU(inplace=inplace))


class OctDropout(OctMap):
    """Dropout on each branch (same probability)."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(nn.Dropout(p, inplace=inplace))


class _OctPool(nn.Module):
    """Pooling of both branches with one kernel, stride and padding (see :class:`OctMaxPool`)."""

    def __init__(
        self, dims: int, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        octave: str = "spatial", *, ceil_mode: bool = False,
    ) -> None:
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3 (the spatial axes of the maps), got {dims!r}")
        self.factors = octave_factors(dims, octave)
        self.dims = dims
        self.octave = octave
        self.kernel_size = to_tuple(kernel_size, dims, "kernel_size")
        self.stride = self.kernel_size if stride is None else to_tuple(stride, dims, "stride")
        self.padding = to_tuple(padding, dims, "padding")
        check_minimums((("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1), ("padding", self.padding, 0)))
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"padding must be at most half of kernel_size, got {padding!r} for {kernel_size!r}")
        self.ceil_mode = check_bool(ceil_mode, "ceil_mode")

    def extra_repr(self) -> str:
        # Constructor-like: OctMaxPool2d(kernel_size=(3, 3), ...); the generic classes lead with dims.
        dimensional = (OctMaxPool1d, OctMaxPool2d, OctMaxPool3d, OctAvgPool1d, OctAvgPool2d, OctAvgPool3d)
        parts = [] if isinstance(self, dimensional) else [str(self.dims)]
        parts += [f"kernel_size={self.kernel_size}", f"stride={self.stride}", f"padding={self.padding}"]
        parts += [f"{name}={value!r}" for name, value in self._options().items()]
        if self.dims == 3:
            parts.append(f"octave={self.octave!r}")
        return ", ".join(parts)

    def _options(self) -> dict[str, object]:
        """The non-default pooling options, for the repr."""
        return {"ceil_mode": True} if self.ceil_mode else {}

    def _pool(self, x: Tensor, ceil_mode: bool = False) -> Tensor:
        raise NotImplementedError

    def _check(self, name: str, t: object) -> Tensor:
        # Batched maps only: an unbatched (C, ...) map has the rank of a batched map of one dimension less,
        # so OctMaxPool(3, ...) called like nn.MaxPool2d(3, ...) would pool the wrong axes without a word.
        if not isinstance(t, Tensor) or t.dim() != self.dims + 2:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{type(self).__name__}(dims={self.dims}) expects {name} maps of shape "
                             f"(N, C, {axes_names(self.dims)}), got {shape}")
        return t

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """Pool the high branch like the vanilla layer, and the low branch so that it stays the
        high branch's octave (``ceil(n / 2)`` on the octave axes)."""
        x = pair_as_octave(x)
        if not isinstance(x, Octave) or x.low is None:
            high = self._check("input", x.high if isinstance(x, Octave) else x)
            pooled = _same_layout(self._pool(high, self.ceil_mode), high)
            return Octave(pooled, None) if isinstance(x, Octave) else pooled
        high, low = self._check("high", x.high), self._check("low", x.low)
        check_same_dtype_device(type(self).__name__, high, low)
        check_low_size(type(self).__name__, high, low, self.factors, self.octave)
        # The high map pools like the vanilla layer (floor mode unless ceil_mode). On odd sizes floor
        # mode can drop the low map's last partial window (high 6 -> 3 but its low 3 -> 1, not 2), so
        # the low map pools in ceil mode and keeps the windows that belong to the kept high ones.
        try:
            pooled_high, pooled_low = self._pool(high, self.ceil_mode), self._pool(low, ceil_mode=True)
        except RuntimeError as error:  # a window larger than a (low) map: name both maps and the layer
            raise ValueError(
                f"{type(self).__name__}({self.extra_repr()}) cannot pool the high map {tuple(high.shape)} and its "
                f"low map {tuple(low.shape)}: {str(error).splitlines()[0]}"
            ) from error
        expected = low_size(pooled_high.shape[2:], self.factors)
        if all(m >= n for m, n in zip(pooled_low.shape[2:], expected)):
            pooled_low = pooled_low[(slice(None), slice(None), *(slice(0, n) for n in expected))]
        if tuple(pooled_low.shape[2:]) != expected:
            raise ValueError(
                f"{type(self).__name__}({self.extra_repr()}) pools the high map to {tuple(pooled_high.shape[2:])} "
                f"but the low map to {tuple(pooled_low.shape[2:])}, not the expected {expected}; this window "
                "cannot keep the low branch at half the high one on this size (oct3d.nn.layers.pool_misaligns "
                "finds such sizes); use one that can, e.g. kernel 2 stride 2, or kernel 3 stride 2 padding 1"
            )
        return Octave(_same_layout(pooled_high, high), _same_layout(pooled_low, low))


def _pooled_size(n: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """``nn.MaxPoolNd``'s output size on one axis (the last window must start inside the input or its left padding)."""
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= n + padding:
        out -= 1
    return out


def pool_misaligns(
    kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    ceil_mode: bool, factors: Sequence[int], sizes: range = range(1, 257),
) -> int | None:
    """The smallest size of an octave axis on which an octave pool cannot keep the low branch the high
    one's octave, or None when it always can.

    The high branch pools as the vanilla layer; the low branch (``ceil(n / f)`` on octave axes) pools
    in ceil mode and must cover ``ceil(high output / f)``. Kernel 2 stride 2 and kernel 3 stride 2
    padding 1 always can; kernel 3 stride 2 padding 0 in ceil mode cannot on sizes of 2 modulo 4.
    Sizes whose low map is smaller than the window are not counted: there the pool raises an error
    that names both maps (a map that small ends most networks anyway).
    """
    for n in sizes:
        for k, s, p, d, f in zip(kernel_size, stride, padding, dilation, factors):
            low = -(-n // f)
            if f == 1 or low + 2 * p < d * (k - 1) + 1:
                continue
            high = _pooled_size(n, k, s, p, d, ceil_mode)
            if high >= 1 and _pooled_size(low, k, s, p, d, True) < -(-high // f):
                return n
    return None


def _same_layout(y: Tensor, like: Tensor) -> Tensor:
    # avg_pool3d returns a channels_last_3d map channels-first, and the low map's crop is a strided view:
    # later layers should get the caller's channels_last layout, dense.
    if like.dim() in (4, 5) and is_channels_last(like) and not is_channels_last(y):
        return y.contiguous(memory_format=CHANNELS_LAST_FORMATS[like.dim()])
    return y


_POOL_ARGS = """
    Args:
        dims: spatial axes of the maps (1, 2 or 3); the 1d/2d/3d classes fix it.
        kernel_size: the window, an int or one per axis.
        stride: the window's step (default: ``kernel_size``).
        padding: implicit padding on each side, at most half the kernel.
        octave: which axes the low branch halves (``"spatial"`` or ``"spatiotemporal"``, 3D only).
        ceil_mode: ceil instead of floor for the high map's output size, as in the vanilla pools.
    {extra}
    Maps are batched, ``(N, C, *spatial)`` with ``dims`` spatial axes (an unbatched map is refused:
    it could not be told apart from a batched map of one dimension less). The high map pools exactly
    as the vanilla layer would; the low map pools with the same window in
    ceil mode and keeps the windows that match the pooled high map, so it stays its octave
    (``ceil(n / 2)`` of the high map on the octave axes). The output keeps the input's memory format.
"""


_MAX_POOL_ARGS = "    dilation: the window's dilation, as in ``nn.MaxPoolNd``.\n"
_AVG_POOL_ARGS = (
    "    count_include_pad: count the zero padding in the averages, as in ``nn.AvgPoolNd``.\n"
    "        divisor_override: divide each window's sum by this instead (2D and 3D), as in ``nn.AvgPoolNd``.\n"
)


class OctMaxPool(_OctPool):
    __doc__ = ("Max pooling applied to both branches with the same kernel, stride and padding.\n"
               + _POOL_ARGS.format(extra=_MAX_POOL_ARGS))

    def __init__(
        self, dims: int, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        octave: str = "spatial", *, dilation: IntOrTuple = 1, ceil_mode: bool = False,
    ) -> None:
        super().__init__(dims, kernel_size, stride, padding, octave, ceil_mode=ceil_mode)
        self.dilation = to_tuple(dilation, dims, "dilation")
        check_minimums((("dilation", self.dilation, 1),))

    def _options(self) -> dict[str, object]:
        return {**({"dilation": self.dilation} if any(d != 1 for d in self.dilation) else {}), **super()._options()}

    def _pool(self, x: Tensor, ceil_mode: bool = False) -> Tensor:
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.dims - 1]
        return fn(x, self.kernel_size, self.stride, self.padding, self.dilation, ceil_mode=ceil_mode)


class OctAvgPool(_OctPool):
    __doc__ = ("Average pooling applied to both branches with the same kernel, stride and padding.\n"
               + _POOL_ARGS.format(extra=_AVG_POOL_ARGS))

    def __init__(
        self, dims: int, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        octave: str = "spatial", *, ceil_mode: bool = False, count_include_pad: bool = True,
        divisor_override: int | None = None,
    ) -> None:
        super().__init__(dims, kernel_size, stride, padding, octave, ceil_mode=ceil_mode)
        self.count_include_pad = check_bool(count_include_pad, "count_include_pad")
        if divisor_override is not None:
            if dims == 1:
                raise ValueError("divisor_override is not available for 1D average pooling (nor in nn.AvgPool1d)")
            check_positive_int(divisor_override, "divisor_override")
        self.divisor_override = divisor_override

    def _options(self) -> dict[str, object]:
        options = super()._options()
        if not self.count_include_pad:
            options["count_include_pad"] = False
        if self.divisor_override is not None:
            options["divisor_override"] = self.divisor_override
        return options

    def _pool(self, x: Tensor, ceil_mode: bool = False) -> Tensor:
        if self.dims == 1:
            return F.avg_pool1d(x, self.kernel_size, self.stride, self.padding, ceil_mode, self.count_include_pad)
        fn = F.avg_pool2d if self.dims == 2 else F.avg_pool3d
        return fn(x, self.kernel_size, self.stride, self.padding, ceil_mode, self.count_include_pad,
                  self.divisor_override)


def _no_indices(return_indices: bool) -> None:
    if return_indices:
        raise ValueError("return_indices=True is not supported: an octave pool returns an Octave of two maps")


class OctMaxPool1d(OctMaxPool):
    """:class:`OctMaxPool` on 1D maps, argument for argument like ``nn.MaxPool1d``
    (``return_indices`` must be False)."""

    def __init__(
        self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1, return_indices: bool = False, ceil_mode: bool = False,
    ) -> None:
        _no_indices(return_indices)
        super().__init__(1, kernel_size, stride, padding, "spatial", dilation=dilation, ceil_mode=ceil_mode)


class OctMaxPool2d(OctMaxPool):
    """:class:`OctMaxPool` on 2D maps, argument for argument like ``nn.MaxPool2d``
    (``return_indices`` must be False)."""

    def __init__(
        self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1, return_indices: bool = False, ceil_mode: bool = False,
    ) -> None:
        _no_indices(return_indices)
        super().__init__(2, kernel_size, stride, padding, "spatial", dilation=dilation, ceil_mode=ceil_mode)


class OctMaxPool3d(OctMaxPool):
    """:class:`OctMaxPool` on 3D maps, argument for argument like ``nn.MaxPool3d`` (``return_indices``
    must be False), plus the keyword ``octave``."""

    def __init__(
        self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1, return_indices: bool = False, ceil_mode: bool = False, *,
        octave: str = "spatial",
    ) -> None:
        _no_indices(return_indices)
        super().__init__(3, kernel_size, stride, padding, octave, dilation=dilation, ceil_mode=ceil_mode)


class OctAvgPool1d(OctAvgPool):
    """:class:`OctAvgPool` on 1D maps, argument for argument like ``nn.AvgPool1d``."""

    def __init__(
        self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        ceil_mode: bool = False, count_include_pad: bool = True,
    ) -> None:
        super().__init__(1, kernel_size, stride, padding, "spatial", ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad)


class OctAvgPool2d(OctAvgPool):
    """:class:`OctAvgPool` on 2D maps, argument for argument like ``nn.AvgPool2d``."""

    def __init__(
        self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None,
    ) -> None:
        super().__init__(2, kernel_size, stride, padding, "spatial", ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad, divisor_override=divisor_override)


class OctAvgPool3d(OctAvgPool):
    """:class:`OctAvgPool` on 3D maps, argument for argument like ``nn.AvgPool3d``, plus the keyword ``octave``."""

    def __init__(
        self, kernel_size: IntOrTuple, stride: IntOrTuple | None = None, padding: IntOrTuple = 0,
        ceil_mode: bool = False, count_include_pad: bool = True, divisor_override: int | None = None, *,
        octave: str = "spatial",
    ) -> None:
        super().__init__(3, kernel_size, stride, padding, octave, ceil_mode=ceil_mode,
                         count_include_pad=count_include_pad, divisor_override=divisor_override)


class OctGlobalAvgPool(nn.Module):
    """Global-pool head helper: average each branch to one value per channel, concatenate.

    Returns ``(N, C_high + C_low)`` with ``flatten=True`` (the default), else
    ``(N, C, 1, ...)``. A plain tensor input is simply pooled.
    """

    def __init__(self, flatten: bool = True) -> None:
        super().__init__()
        self.flatten = check_bool(flatten, "flatten")

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> Tensor:
        """``(N, C_high + C_low)`` (or ``(N, C, 1, ...)`` without ``flatten``): each branch's channel means."""
        x = pair_as_octave(x)
        parts: Sequence[Tensor]
        if isinstance(x, Octave):
            parts = [x.high] if x.low is None else [x.high, x.low]
        elif isinstance(x, Tensor):
            parts = [x]
        else:
            raise TypeError(f"OctGlobalAvgPool expects a torch.Tensor or an Octave, got {type(x).__name__}")
        for branch, part in zip(("high", "low"), parts):
            if part.dim() < 3:
                raise ValueError(f"OctGlobalAvgPool expects {branch} maps (N, C, *spatial) with at least one "
                                 f"spatial axis, got shape {tuple(part.shape)}")
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"OctGlobalAvgPool expects the low map in the high map's batch size, got "
                             f"{tuple(parts[0].shape)} and {tuple(parts[1].shape)}")
        if len(parts) == 2:
            check_same_dtype_device("OctGlobalAvgPool", *parts)
        pooled = [p.mean(dim=tuple(range(2, p.dim())), keepdim=not self.flatten) for p in parts]
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
