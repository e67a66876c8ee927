"""Octave convolution for 1D, 2D and 3D maps (Chen et al., "Drop an Octave", ICCV 2019).

One dimension-generic module, :class:`OctConv`, implements ``docs/semantics.md`` section 2 exactly:

    Y_high = h2h(pool(X_high, s)) + up(l2h(pool(X_low, s on non-octave axes)), size of Y_high)
    Y_low  = l2l(pool(X_low, s))  + h2l(pool(X_high, s * p))

where every path is a stride-1 "same" convolution, ``pool`` is average pooling with
kernel = stride and ``up`` is nearest upsampling cropped to size. A strided octave layer
pools first and convolves at stride 1 (the paper's Table 3); only the vanilla case
``alpha_in == alpha_out == 0`` uses a strided convolution, so that it *is* ``nn.ConvNd`` (in eval
mode on CPU it takes the same kernel choice as the octave paths: equal up to rounding).
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oct3d.nn import kernels
from oct3d.nn.kernels import conv_nd
from oct3d.nn.octave import (
    Octave,
    OctaveInput,
    OctaveOutput,
    avg_pool,
    axes_names,
    broadcast_upsampled_,
    check_low_size,
    check_matches_weight,
    check_same_dtype_device,
    fx_leaf_forward,
    global_module_hooks,
    keep_channels_last,
    module_hooks,
    octave_axes,
    split_channels,
    traced_or_compiled,
    upsample_to,
)

__all__ = [
    "OctConv", "OctConv1d", "OctConv2d", "OctConv3d", "PADDING_MODES", "check_alpha", "check_bool",
    "check_float_dtype", "check_positive_int", "to_tuple",
]

IntOrTuple = int | Sequence[int]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: Path name (``"h2h"``, ``"h2l"``, ``"l2h"``, ``"l2l"``) -> the ``(weight, bias)`` a forward uses for it.
PathParams = Mapping[str, tuple[Tensor, Tensor | None]]
#: ``nn.ConvNd``'s padding modes, which every octave path takes alike.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
def to_tuple(value: IntOrTuple, dims: int, name: str) -> tuple[int, ...]:
    """Expand an int or a length-``dims`` sequence of ints to a tuple, or raise naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}")
    if isinstance(value, numbers.Integral):  # numpy integers too, as nn.ConvNd takes them
        return (int(value),) * dims
    if isinstance(value, Sequence) and len(value) == dims and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        return tuple(int(v) for v in value)
    raise TypeError(f"{name} must be an int or a tuple of {dims} ints, got {value!r}")


def check_minimums(checks: Sequence[tuple[str, tuple[int, ...], int]]) -> None:
    """Raise a ``ValueError`` for the first ``(name, per-axis values, minimum)`` with a value below its minimum."""
    for name, values, minimum in checks:
        if any(v < minimum for v in values):
            raise ValueError(f"{name} must be >= {minimum} on every axis, got {values}")


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 1 (bools excluded), else raise a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_float_dtype(dtype: object) -> None:
    """Raise a ``TypeError`` unless ``dtype`` (a layer's weight dtype) is None or a real floating-point dtype.

    The octave resampling ops (average pooling, nearest upsampling) are defined for real maps only.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype (or None for the default), got {dtype!r}")


def check_bool(value: object, name: str) -> bool:
    """``value`` as a bool, or a ``TypeError`` naming ``name`` (1, 0 and numpy bools pass, as nn layers take them)."""
    if value not in (True, False):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def branch_channels(
    in_channels: int, out_channels: int, alpha_in: float, alpha_out: float
) -> tuple[int, int, int, int]:
    """``(in_high, in_low, out_high, out_low)`` of an octave layer; a ratio > 0 must leave a low channel."""
    in_high, in_low = split_channels(in_channels, alpha_in)
    out_high, out_low = split_channels(out_channels, alpha_out)
    for name, alpha, total, low in (
        ("alpha_in", alpha_in, in_channels, in_low),
        ("alpha_out", alpha_out, out_channels, out_low),
    ):
        if alpha > 0 and low == 0:
            raise ValueError(
                f"{name}={alpha} gives no low-frequency channels out of {total}; "
                f"use {name}=0 or at least {minimum_channels(alpha)} channels"
            )
        if low == total:
            raise ValueError(f"{name}={alpha} leaves no high-frequency channel out of {total}; use a smaller {name}")
    return in_high, in_low, out_high, out_low


def minimum_channels(alpha: float) -> int:
    """The fewest channels that leave ``alpha > 0`` at least one low-frequency channel."""
    channels = max(1, math.floor((1 - 1e-6) / alpha))  # split_channels floors alpha * c + 1e-6
    while split_channels(channels, alpha)[1] < 1:
        channels += 1
    return channels


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float if it lies in [0, 1), else raise a ``ValueError`` naming ``name``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {alpha!r}")
    if not 0.0 <= float(alpha) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {alpha!r}")
    return float(alpha)


class OctConv(nn.Module):
    """Octave convolution over ``dims`` (1, 2 or 3) spatial axes.

    Args:
        dims: number of spatial axes (1, 2 or 3).
        in_channels: total input channels (high + low).
        out_channels: total output channels (high + low).
        kernel_size: odd kernel size, int or per-axis tuple.
        alpha_in: fraction of input channels in the low branch, in [0, 1).
        alpha_out: fraction of output channels in the low branch, in [0, 1).
        stride: 1 or 2, int or per-axis tuple. With any octave branch the layer pools
            first and convolves at stride 1.
        dilation: dilation of every path ("same" padding follows it).
        groups: groups of every path; each branch's channel count must divide by it. With
            ``groups == in_channels == out_channels`` and ``alpha_in == alpha_out`` the layer
            is depthwise: only ``h2h`` and ``l2l`` exist, each grouped per channel.
        bias: add a learnable bias per output branch (on ``h2h`` and ``l2l``; on ``h2l``
            for a first layer, which has no ``l2l``).
        octave: 3D only: ``"spatial"`` halves H and W, ``"spatiotemporal"`` halves T, H, W.
        padding: ``"same"`` (the default and the only geometry, ``dilation * (k - 1) // 2``; the
            equal int or tuple is accepted too, as ``nn.ConvNd`` code passes it).
        padding_mode: ``"zeros"`` (default, as in the paper), ``"reflect"``, ``"replicate"`` or
            ``"circular"``, as for ``nn.ConvNd``. Every path pads its own input, at its own
            resolution, in this mode.
        device, dtype: where and in which dtype the weights are made (as for ``nn.ConvNd``).
        pool_first: how a strided *vanilla* layer (``alpha_in == alpha_out == 0``) strides.
            ``False`` (default): a strided convolution, so the layer is ``nn.ConvNd`` (exactly,
            bit for bit, in training mode; in eval mode through the CPU kernel choice, equal up
            to rounding).
            ``True``: average-pool by the stride, then convolve at stride 1, as the official
            OctConv code does for every strided convolution inside an octave network, ratio 0
            included (e.g. ``layer4.0.conv2`` of Oct-ResNet-50). Layers with a low branch
            always pool first, whatever this says.

    Input is a plain tensor when ``alpha_in == 0`` (an ``Octave`` whose ``low`` is None is
    accepted too), else an :class:`~oct3d.nn.Octave` or any ``(high, low)`` pair of tensors
    (tuple or list). Output is an ``Octave`` when
    ``alpha_out > 0``, else a plain tensor. The four weights are ordinary ``ConvNd``
    weights under the state-dict keys ``h2h.weight``, ``h2l.weight``, ``l2h.weight`` and
    ``l2l.weight``; paths that do not exist have no keys.
    """

    #: Use the launch-saving implementation (same outputs as the reference path).
    fast_path: bool = True

    def __init__(
        self,
        dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        alpha_in: float = 0.5,
        alpha_out: float = 0.5,
        stride: IntOrTuple = 1,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = False,
        octave: str = "spatial",
        *,
        pool_first: bool = False,
        padding: IntOrTuple | str = "same",
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.axes = octave_axes(dims, octave)  # validates dims and octave
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        check_float_dtype(dtype)
        self.padding_mode = padding_mode
        bias = check_bool(bias, "bias")
        in_channels, out_channels, groups = (
            check_positive_int(value, name)
            for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups))
        )
        self.dims = dims
        self.octave = octave
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.alpha_in = check_alpha(alpha_in, "alpha_in")
        self.alpha_out = check_alpha(alpha_out, "alpha_out")
        self.kernel_size = to_tuple(kernel_size, dims, "kernel_size")
        if any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be odd and positive (for 'same' padding), got {kernel_size!r}")
        self.stride = to_tuple(stride, dims, "stride")
        if any(s not in (1, 2) for s in self.stride):
            raise ValueError(f"stride must be 1 or 2 per axis, got {stride!r}")
        self.dilation = to_tuple(dilation, dims, "dilation")
        if any(d < 1 for d in self.dilation):
            raise ValueError(f"dilation must be positive, got {dilation!r}")
        self.padding = tuple(d * (k - 1) // 2 for k, d in zip(self.kernel_size, self.dilation))
        same = padding == "same" or (padding == "valid" and not any(self.padding))
        if not same and (isinstance(padding, str) or to_tuple(padding, dims, "padding") != self.padding):
            raise ValueError(
                f"padding must be 'same' ({self.padding} for kernel_size={self.kernel_size}, dilation="
                f"{self.dilation}), got {padding!r}: an octave convolution pads 'same' so that its high and "
                "low outputs stay aligned (the low branch is the high one's half)"
            )
        self.groups = groups
        self.factors = tuple(2 if a else 1 for a in self.axes)

        self.in_high, self.in_low, self.out_high, self.out_low = branch_channels(
            in_channels, out_channels, self.alpha_in, self.alpha_out
        )
        self.depthwise = groups > 1 and groups == in_channels == out_channels
        if self.depthwise and self.alpha_in != self.alpha_out:
            raise ValueError(
                "a depthwise octave convolution (groups == in_channels == out_channels) needs "
                f"alpha_in == alpha_out, got alpha_in={alpha_in}, alpha_out={alpha_out}"
            )
        if not self.depthwise:
            for name, c in (
                ("in_channels (high part)", self.in_high),
                ("in_channels (low part)", self.in_low),
                ("out_channels (high part)", self.out_high),
                ("out_channels (low part)", self.out_low),
            ):
                if c % groups:
                    raise ValueError(
                        f"groups={groups} must divide every branch: {name} has {c} channels "
                        f"(in_channels={in_channels}, alpha_in={alpha_in}, "
                        f"out_channels={out_channels}, alpha_out={alpha_out})"
                    )
        self.is_vanilla = self.in_low == 0 and self.out_low == 0
        self.pool_first = check_bool(pool_first, "pool_first")

        conv_stride = self.stride if self.is_vanilla and not pool_first else 1

        def conv(cin: int, cout: int, g: int, with_bias: bool) -> nn.Module:
            return _CONV[dims](
                cin, cout, self.kernel_size, stride=conv_stride, padding=self.padding,
                dilation=self.dilation, groups=g, bias=with_bias, padding_mode=padding_mode, device=device,
                dtype=dtype,
            )

        if self.depthwise:
            self.h2h = conv(self.in_high, self.out_high, self.in_high, bias)
            self.h2l = None
            self.l2h = None
            self.l2l = conv(self.in_low, self.out_low, self.in_low, bias) if self.in_low else None
        else:
            self.h2h = conv(self.in_high, self.out_high, groups, bias)
            low_bias_on_h2l = bias and self.in_low == 0
            self.h2l = conv(self.in_high, self.out_low, groups, low_bias_on_h2l) if self.out_low else None
            self.l2h = conv(self.in_low, self.out_high, groups, False) if self.in_low else None
            self.l2l = (
                conv(self.in_low, self.out_low, groups, bias) if self.in_low and self.out_low else None
            )

        # Pooling factors of each path's input (docs/semantics.md section 2).
        self._pool_h2h = self.stride
        self._pool_h2l = tuple(s * p for s, p in zip(self.stride, self.factors))
        self._pool_l2l = self.stride
        self._pool_l2h = tuple(1 if a else s for s, a in zip(self.stride, self.axes))
        self._up_l2h = tuple(2 if (a and s == 1) else 1 for s, a in zip(self.stride, self.axes))
        if not self.is_vanilla:  # (a vanilla layer's path already has nn.ConvNd's own initialisation)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the paths as ``nn.ConvNd`` initialises the vanilla layer they are slices of.

        ``nn.ConvNd``'s default (uniform, bound ``1 / sqrt(fan_in)``) on each path alone would use the
        path's own fan-in, a fraction of the layer's, and start an alpha-.5 layer's output with up to
        twice the vanilla variance; here every path takes the whole layer's fan-in, so the octave layer
        starts with the vanilla layer's output statistics.
        """
        fan_in = self.in_channels // (self.in_channels if self.depthwise else self.groups) * math.prod(self.kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        for path in (self.h2h, self.h2l, self.l2h, self.l2l):
            if path is not None:
                nn.init.uniform_(path.weight, -bound, bound)
                if path.bias is not None:
                    nn.init.uniform_(path.bias, -bound, bound)

    def extra_repr(self) -> str:
        # Constructor-like: OctConv2d(8, 8, kernel_size=(3, 3), ...); the generic class leads with dims.
        parts = [] if isinstance(self, (OctConv1d, OctConv2d, OctConv3d)) else [str(self.dims)]
        parts += [str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}",
                  f"alpha_in={self.alpha_in}", f"alpha_out={self.alpha_out}", f"stride={self.stride}"]
        if any(d != 1 for d in self.dilation):
            parts.append(f"dilation={self.dilation}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if any(getattr(p, "bias", None) is not None for p in self._modules.values()):
            parts.append("bias=True")
        if self.dims == 3:
            parts.append(f"octave={self.octave!r}")
        if self.pool_first:
            parts.append("pool_first=True")
        if self.padding_mode != "zeros":
            parts.append(f"padding_mode={self.padding_mode!r}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ input checks
    def _split_input(self, x: OctaveInput) -> tuple[Tensor, Tensor | None]:
        if isinstance(x, Octave):
            high, low = x.high, x.low
        elif isinstance(x, Tensor):
            high, low = x, None
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            high, low = x
        else:
            raise TypeError(
                f"{self._name()} expects a torch.Tensor, an Octave or a (high, low) pair of tensors, "
                f"got {type(x).__name__}" + (f" of length {len(x)}" if isinstance(x, (tuple, list)) else "")
            )
        if not isinstance(high, Tensor) or high.dim() != self.dims + 2:
            raise ValueError(
                f"{self._name()} expects a high tensor of shape (N, C, {self._axes_desc()}), "
                f"got {_shape(high)}"
            )
        if low is None and self.in_low:
            raise TypeError(
                f"{self._name()} has alpha_in={self.alpha_in} and needs an Octave(high, low) input "
                f"with a low tensor; got a plain tensor of shape {tuple(high.shape)}. Use "
                "oct3d.nn.to_octave(x, alpha) at the boundary, or alpha_in=0 for a first layer"
            )
        if self.in_low == 0 and low is not None:  # before the channel check: the cause, not its symptom
            raise ValueError(
                f"{self._name()} has alpha_in=0 and takes no low branch, but got an Octave with a "
                f"low tensor of shape {tuple(low.shape) if isinstance(low, Tensor) else type(low).__name__}; "
                "set alpha_in to match the previous layer's alpha_out"
            )
        check_matches_weight(self._name(), high, self.h2h)
        if high.shape[1] != self.in_high:
            raise ValueError(
                f"{self._name()} expects {self.in_high} high-frequency input channels "
                f"(in_channels={self.in_channels}, alpha_in={self.alpha_in}), got {high.shape[1]}"
            )
        if self.in_low == 0:
            if self.padding_mode == "reflect":
                self._check_reflect_fits(high, None)
            return high, None
        if not isinstance(low, Tensor) or low.dim() != self.dims + 2:
            raise ValueError(f"{self._name()} expects a low tensor with {self.dims + 2} dims, got {_shape(low)}")
        check_same_dtype_device(self._name(), high, low)
        if low.shape[1] != self.in_low:
            raise ValueError(
                f"{self._name()} expects {self.in_low} low-frequency input channels "
                f"(in_channels={self.in_channels}, alpha_in={self.alpha_in}), got {low.shape[1]}"
            )
        check_low_size(self._name(), high, low, self.factors, self.octave)  # (the channels were checked above)
        if self.padding_mode == "reflect":
            self._check_reflect_fits(high, low)
        return high, low

    def _check_reflect_fits(self, high: Tensor, low: Tensor | None) -> None:
        """Reflect padding needs every path's input larger than the padding: say so before torch's pad fails."""
        if isinstance(high, torch.fx.Proxy):
            return

        def pooled(x: Tensor, factors: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(-(-n // f) for n, f in zip(x.shape[2:], factors))

        # The map each existing path pads: a strided vanilla layer that does not pool first pads the full map.
        strided = self.is_vanilla and not self.pool_first
        inputs = [tuple(high.shape[2:]) if strided else pooled(high, self._pool_h2h)]
        if self.h2l is not None:
            inputs.append(pooled(high, self._pool_h2l))
        if low is not None and self.l2h is not None:
            inputs.append(pooled(low, self._pool_l2h))
        if low is not None and self.l2l is not None:
            inputs.append(pooled(low, self._pool_l2l))
        for size in inputs:
            if any(n <= p for n, p in zip(size, self.padding)):
                raise ValueError(
                    f"{self._name()} with padding_mode='reflect' pads {self.padding}, and reflect padding needs "
                    f"every map it pads to be larger than that; an input of size {tuple(high.shape[2:])} gives a "
                    f"path a map of size {size} (the low branch is half the high one). Use larger inputs or "
                    "padding_mode='replicate'"
                )

    def _name(self) -> str:
        return f"OctConv{self.dims}d"

    def _axes_desc(self) -> str:
        return axes_names(self.dims)

    # ------------------------------------------------------------------ forward
    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """``Y_high`` (and ``Y_low`` as an :class:`~oct3d.nn.Octave` when ``alpha_out > 0``) of the
        module docstring's formula, through the fast path where it applies."""
        high, low = self._split_input(x)
        if self.is_vanilla:
            return self._forward_vanilla(high)
        if self.fast_path and self._paths_are_plain():
            y_high, y_low = self._forward_fast(high, low)
        else:
            y_high, y_low = self._forward_reference(high, low)
        if self.out_low == 0:
            return y_high
        return Octave(y_high, y_low)

    def forward_reference(self, x: OctaveInput) -> OctaveOutput:
        """The literal four-convolution formula of ``docs/semantics.md``; the fast path must equal it."""
        high, low = self._split_input(x)
        if self.is_vanilla:
            return self._forward_vanilla(high)
        y_high, y_low = self._forward_reference(high, low)
        return y_high if self.out_low == 0 else Octave(y_high, y_low)

    def _forward_vanilla(self, high: Tensor, params: PathParams | None = None) -> Tensor:
        """``alpha_in == alpha_out == 0``: ``nn.ConvNd``, or with ``pool_first`` (inside an octave
        network) pool-then-convolve. In training mode the plain convolution is exactly
        ``nn.ConvNd``, bit for bit (its output in the input's memory format); in eval mode, and
        for the pool-first convolution always, it takes the CPU kernel chosen for its shape like
        an octave path (the same values up to rounding)."""
        if not self.pool_first:
            if params is not None or (not self.training and self.fast_path and self._paths_are_plain()):
                # Inference: the kernel choice, packed weights included (oneDNN otherwise reorders
                # the weight on every call, as costly as a batch-1 convolution on a small map).
                return self._path("h2h", high, params, self.stride)
            return keep_channels_last(self.h2h(high), high)
        x = avg_pool(high, self._pool_h2h)
        if params is None and not (self.fast_path and self._paths_are_plain()):
            return self.h2h(x)
        return self._path("h2h", x, params)

    def _forward_reference(self, high: Tensor, low: Tensor | None) -> tuple[Tensor, Tensor | None]:
        y_high = self.h2h(avg_pool(high, self._pool_h2h))
        if self.l2h is not None:
            out_size = y_high.shape[2:]
            y_high = y_high + upsample_to(self.l2h(avg_pool(low, self._pool_l2h)), self._up_l2h, out_size)
        y_low = None
        if self.out_low:
            if self.l2l is not None:
                y_low = self.l2l(avg_pool(low, self._pool_l2l))
            if self.h2l is not None:
                from_high = self.h2l(avg_pool(high, self._pool_h2l))
                y_low = from_high if y_low is None else y_low + from_high
        return y_high, y_low

    def _paths_are_plain(self) -> bool:
        """Whether every path is a stock ``ConvNd`` that no hook watches.

        The fast path reads the path weights directly, with this layer's padding and dilation,
        and adds into path outputs in place. A path whose padding, padding mode or dilation was
        changed after construction, a hook (forward, pre-forward or backward, module or global), a pruning or old-style
        weight-norm pre-hook, or a swapped-in module (QAT) expects the module to be called
        and its output left alone, so such layers take the reference formula.
        """
        if global_module_hooks():
            return False
        conv_type = _CONV[self.dims]
        for path in self._modules.values():  # the paths are the only submodules
            if path is not None and (
                type(path) is not conv_type
                or path.padding_mode != self.padding_mode
                or path.padding != self.padding
                or path.dilation != self.dilation
                or module_hooks(path)
            ):
                return False
        return True

    def _conv(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int, stride: tuple[int, ...] | None = None,
    ) -> Tensor:
        # Packed copies of the weights only in eval mode (see :meth:`train`).
        stride = (1,) * self.dims if stride is None else stride
        padding = self.padding
        if self.padding_mode != "zeros" and any(padding):
            # As nn.ConvNd pads for these modes: F.pad, then an unpadded convolution.
            padded = F.pad(x, [p for p in reversed(padding) for _ in range(2)], mode=self.padding_mode)
            # (circular padding returns a channels_last map channels-first)
            x = keep_channels_last(padded, x)
            padding = (0,) * self.dims
        return conv_nd(x, weight, bias, stride, padding, self.dilation, groups, not self.training)

    def train(self, mode: bool = True) -> OctConv:
        """``nn.Module.train``, which also drops this layer's cached weight copies.

        The concatenated and oneDNN-packed weights are cached while autograd is off in eval
        mode, checked against the weights' version counters. An in-place update through
        ``.data`` (old-style optimizers, some EMA teachers) does not bump that counter, so
        every switch between training and evaluation starts afresh; a model kept in eval
        mode whose weights are changed through ``.data`` needs ``oct3d.nn.kernels.clear_cache()``.
        """
        kernels.forget_layer(self)
        kernels.forget_weights(self.parameters())
        return super().train(mode)

    def _weights(self, name: str, params: PathParams | None) -> tuple[Tensor, Tensor | None]:
        """Path ``name``'s ``(weight, bias)``: its own, or those of ``params`` (BatchNorm folded in)."""
        if params is not None:
            return params[name]
        own = self._modules[name]._parameters  # plain ConvNd here (see _paths_are_plain): no parametrisation
        return own["weight"], own["bias"]

    def _path(
        self, name: str, x: Tensor, params: PathParams | None = None, stride: tuple[int, ...] | None = None,
    ) -> Tensor:
        """Path ``name``'s convolution (stride 1 unless given), through :meth:`_conv`'s kernel choice."""
        weight, bias = self._weights(name, params)
        return self._conv(x, weight, bias, self._modules[name].groups, stride)

    def forward_folded(self, x: OctaveInput, params: PathParams, relu: bool = False) -> OctaveOutput:
        """:meth:`forward` through the fast path with every path's ``(weight, bias)`` taken from
        ``params`` (a mapping from path name to the pair) instead of the layer's own, and with
        ``relu`` ReLU applied to every output branch (fused into the high branch's convolution
        where that measures faster: :func:`oct3d.nn.kernels.conv_add_upsampled_relu`).

        :func:`oct3d.nn.fold.conv_norm` passes the weights with an eval-mode BatchNorm folded
        in; the caller checks that the fast path applies (:meth:`_paths_are_plain`).
        """
        high, low = self._split_input(x)
        if self.is_vanilla:
            out = self._forward_vanilla(high, params)
            return out.relu_() if relu else out  # a fresh convolution output: in place is safe
        y_high, y_low = self._forward_fast(high, low, params, relu)
        return y_high if self.out_low == 0 else Octave(y_high, y_low)

    def _forward_fast(
        self, high: Tensor, low: Tensor | None, params: PathParams | None = None, relu: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The reference formula with fewer kernels and copies (same outputs, see tests/test_fast_path.py).

        - Without autograd the L->H result is added *in place* into the H->H output through
          a broadcast view (no materialised upsample, no new tensor); with autograd it goes
          through the upsample, whose backward is one kernel (see :func:`_add_upsampled_`).
        - Each path's convolution takes the CPU kernel chosen for its shape
          (:func:`oct3d.nn.kernels.conv_nd`).
        - The two convolutions that feed one output at one resolution, H->L and L->L, and with
          stride 2 also H->H and L->H (the L->H input then needs no upsampling), run either as
          one convolution over the concatenated inputs or as two convolutions and an add,
          whichever measures faster (:meth:`_sum_of_convs`).
        - With stride 2 the H->L input is pooled from the already stride-pooled H->H input
          (2x2 of 2x2 instead of 4x4 of the full map) when that is exact (even sizes).

        ``params``, when given, replaces every path's ``(weight, bias)`` (:meth:`forward_folded`);
        ``relu`` (without autograd, from :meth:`forward_folded`) applies ReLU to both outputs.
        """
        folded = params is not None
        pooled_high = avg_pool(high, self._pool_h2h)
        high_has_relu = False
        if self.l2h is None:
            y_high = self._path("h2h", pooled_high, params)
        else:
            low_for_high = avg_pool(low, self._pool_l2h)
            if self.groups == 1 and pooled_high.shape[2:] == low_for_high.shape[2:]:
                (w_hh, b_hh), (w_lh, _) = self._weights("h2h", params), self._weights("l2h", params)
                y_high = self._sum_of_convs("high", pooled_high, w_hh, low_for_high, w_lh, b_hh, folded)
            elif relu and self.padding_mode == "zeros" and not self.training:
                w_hh, b_hh = self._weights("h2h", params)
                y_high = kernels.conv_add_upsampled_relu(
                    pooled_high, w_hh, b_hh, self.padding, self.dilation, self._modules["h2h"].groups,
                    self._path("l2h", low_for_high, params), self._up_l2h,
                )
                high_has_relu = True
            else:
                y_high = self._path("h2h", pooled_high, params)
                y_high = _add_upsampled_(y_high, self._path("l2h", low_for_high, params), self._up_l2h)
        if relu and not high_has_relu:
            y_high = y_high.relu_()  # fresh convolution outputs: in place is safe
        if not self.out_low:
            return y_high, None
        y_low = self._fast_low(high, low, pooled_high, params)
        return y_high, (y_low.relu_() if relu else y_low)

    def _fast_low(
        self, high: Tensor, low: Tensor | None, pooled_high: Tensor, params: PathParams | None,
    ) -> Tensor | None:
        """The fast path's low output (see :meth:`_forward_fast`)."""
        folded = params is not None
        high_for_low = self._pool_high_for_low(high, pooled_high) if self.h2l is not None else None
        if self.h2l is not None and self.l2l is not None and self.groups == 1:
            low_for_low = avg_pool(low, self._pool_l2l)
            (w_hl, _), (w_ll, b_ll) = self._weights("h2l", params), self._weights("l2l", params)
            return self._sum_of_convs("low", high_for_low, w_hl, low_for_low, w_ll, b_ll, folded)
        y_low = None
        if self.l2l is not None:
            y_low = self._path("l2l", avg_pool(low, self._pool_l2l), params)
        if self.h2l is not None:
            from_high = self._path("h2l", high_for_low, params)
            y_low = from_high if y_low is None else y_low.add_(from_high)
        return y_low

    def _sum_of_convs(
        self, family: str, a: Tensor, w_a: Tensor, b: Tensor, w_b: Tensor, bias: Tensor | None, folded: bool = False,
    ) -> Tensor:
        """``conv(a, w_a) + conv(b, w_b) + bias`` for two same-size inputs, in the formulation that measures faster.

        ``"cat"``: one convolution of ``cat([a, b])`` with ``cat([w_a, w_b])`` (fewer, larger
        kernels; costs the copies of the concatenation); ``"split"``: two convolutions and an
        in-place add. Timed once per shape by :func:`oct3d.nn.kernels.choose` (family
        ``"high"`` or ``"low"``); ``"cat"`` without autotuning. ``folded``: the weights carry a
        folded BatchNorm, and their concatenation is cached apart from the layer's own.
        """
        args = (a, b, w_a, w_b, bias)
        cat_cache = family + "/folded" if folded else family
        choice = kernels.forced(family)
        if choice is None and (a.device.type != "cpu" or traced_or_compiled() or not kernels._plain_eager()):
            choice = "cat"  # graphs, GPUs and torch.func transforms keep the one larger convolution
        elif choice is None:
            memo_key = (
                family, a.shape, a.stride(), b.shape, b.stride(), w_a.shape, w_b.shape, a.dtype, bias is None,
                self.padding, self.padding_mode, self.dilation, torch.is_grad_enabled(), a.requires_grad,
                b.requires_grad, w_a.requires_grad, w_b.requires_grad, bias is not None and bias.requires_grad,
                kernels.tuning_enabled(), torch.get_num_threads(),
            )
            choice = kernels.memo(memo_key)
            if choice is None:
                key = (family, *(kernels._signature(t) for t in args[:4]), bias is None, self.padding,
                       self.padding_mode, self.dilation)
                options = {"cat": partial(self._sum_by_cat, cat_cache), "split": self._sum_by_split}
                choice, final = kernels._choose(key, options, args, "cat")
                if final:
                    kernels.memo(memo_key, choice)
        if choice == "split":
            return self._sum_by_split(*args)
        return self._sum_by_cat(cat_cache, *args)

    def _sum_by_cat(self, cache: str, a: Tensor, b: Tensor, w_a: Tensor, w_b: Tensor, bias: Tensor | None) -> Tensor:
        """The ``"cat"`` plan: one convolution over the concatenated inputs and weights (cached under ``cache``)."""
        return self._conv(torch.cat([a, b], dim=1), self._cat_weight(cache, w_a, w_b), bias, 1)

    def _sum_by_split(self, a: Tensor, b: Tensor, w_a: Tensor, w_b: Tensor, bias: Tensor | None) -> Tensor:
        """The ``"split"`` plan: two convolutions and an in-place add."""
        return self._conv(b, w_b, bias, 1).add_(self._conv(a, w_a, None, 1))

    def _pool_high_for_low(self, high: Tensor, pooled_high: Tensor) -> Tensor:
        """``avg_pool(high, stride * p)``, reusing ``pooled_high = avg_pool(high, stride)`` when exact.

        Pooling 2x2 then 2x2 equals pooling 4x4 when every first-level window is full, i.e. the
        axes pooled twice have even sizes; an odd size has a partial border window whose
        average would be mis-weighted, so it takes the direct path.
        """
        twice = [s > 1 and p > 1 for s, p in zip(self.stride, self.factors)]
        if any(twice) and not traced_or_compiled() and all(
            n % 2 == 0 for n, t in zip(high.shape[2:], twice) if t
        ):
            return avg_pool(pooled_high, self.factors)
        return avg_pool(high, self._pool_h2l)

    def _cat_weight(self, family: str, w_a: Tensor, w_b: Tensor) -> Tensor:
        """``cat([w_a, w_b], dim=1)``, cached per ``family`` while autograd is off in eval mode.

        The cache entry holds weak references to both weights and is used only for those very
        tensors, at the version counters, storage pointers, dtype and device it was built from
        (the counters are bumped by every in-place update: optimizer steps, ``load_state_dict``,
        ``fuse``). A weight swapped in by ``torch.func.functional_call``, or a new tensor that
        happens to reuse a freed one's memory, is therefore never served a stale copy. With
        autograd on, while tracing for ``torch.compile`` (which folds the concatenation itself)
        or ``torch.jit.trace``, and for weights without a trustworthy version counter (inference
        tensors, shared memory: :func:`oct3d.nn.kernels.cacheable`), it is rebuilt every call.
        """
        if (torch.is_grad_enabled() or self.training or traced_or_compiled() or not kernels._plain_eager()
                or w_a.is_inference() or w_b.is_inference()):
            return torch.cat([w_a, w_b], dim=1)  # (torch.func: batched weights have no storage to key on)
        key = (w_a._version, w_b._version, w_a.data_ptr(), w_b.data_ptr(), w_a.dtype, w_a.device)
        # Kept beside the layer, not in it: never in the state dict or a copy, and clear_cache() drops it.
        caches = kernels.layer_cache(self)
        cached = caches.get(family)
        if cached is not None and cached[0] == key and cached[1]() is w_a and cached[2]() is w_b:
            return cached[3]  # built from cacheable weights; shared memory would have moved their storage
        if not kernels.cacheable(w_a) or not kernels.cacheable(w_b):
            caches.pop(family, None)
            return torch.cat([w_a, w_b], dim=1)
        # Built as a normal tensor even under inference_mode: an inference tensor has no
        # version counter, which the packed-weight cache checks.
        # (inference_mode(False) turns grad mode back on, hence the no_grad inside it.)
        with torch.inference_mode(False), torch.no_grad():
            cached = (key, weakref.ref(w_a), weakref.ref(w_b), torch.cat([w_a, w_b], dim=1))
        caches[family] = cached
        return cached[3]


def _add_upsampled_(y: Tensor, small: Tensor, factors: tuple[int, ...]) -> Tensor:
    """``y + upsample_to(small, factors, y.shape[2:])``, in place into ``y`` when autograd is off.

    When every upsampled axis of ``y`` is exactly ``factor`` times ``small``'s, ``y`` is viewed
    as ``(N, C, m0, f0, m1, f1, ...)`` and ``small`` broadcast over the ``f`` axes, so the
    upsample is never materialised (on a channels-first CPU map only its innermost axis
    is). Splitting an axis is a view for any memory format, so this holds for
    channels_last too. Odd sizes materialise the cropped upsample.
    """
    size = y.shape[2:]
    if traced_or_compiled():
        # One graph whatever the grad mode: torch.jit.trace's check re-traces under other flags.
        return y + upsample_to(small, factors, size)
    exact = all(n == f * m for n, f, m in zip(size, factors, small.shape[2:]))
    if torch.is_grad_enabled() and (y.requires_grad or small.requires_grad):
        if (exact and y.device.type == "cpu" and not traced_or_compiled() and kernels._plain_eager()
                and not (y.is_leaf and y.requires_grad)):
            return _AddUpsampledFunction.apply(y, small, factors)
        # An in-place add into a view would record CopySlices, whose backward clones the
        # whole gradient and reduces it over the broadcast axes; the upsample's own backward
        # is one kernel (about 10% of an Oct-I3D-R50 CPU training step).
        return y + upsample_to(small, factors, size)
    if all(f == 1 for f in factors):
        return y.add_(small)
    if exact:
        return broadcast_upsampled_(y, small, factors, "add")
    return y.add_(upsample_to(small, factors, size))


class _AddUpsampledFunction(torch.autograd.Function):
    """``y + up(small)`` for exact sizes under autograd, added in place into ``y`` (a fresh
    convolution output that nothing saved for its backward).

    Forward is one broadcast add (no upsampled map); backward passes the gradient through
    to ``y`` and sums it over each upsampling window for ``small``, both in the gradient's
    memory format. Autograd's own upsample-and-add materialises the upsampled map and
    returns a channels_last map's gradient channels-first.
    """

    @staticmethod
    def forward(ctx, y: Tensor, small: Tensor, factors: tuple[int, ...]) -> Tensor:
        ctx.factors = factors
        ctx.mark_dirty(y)
        return broadcast_upsampled_(y, small.detach(), factors, "add")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        window_sum = avg_pool(grad, ctx.factors) * math.prod(ctx.factors)  # differentiable (double backward)
        return grad, window_sum, None


def _shape(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


class OctConv1d(OctConv):
    """1D octave convolution (input ``(N, C, L)``, low branch at half length). See :class:`OctConv`."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, dilation: IntOrTuple = 1, groups: int = 1,
        bias: bool = False, *, pool_first: bool = False, padding: IntOrTuple | str = "same",
        padding_mode: str = "zeros", device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            1, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, dilation, groups, bias,
            pool_first=pool_first, padding=padding, padding_mode=padding_mode, device=device, dtype=dtype,
        )


class OctConv2d(OctConv):
    """2D octave convolution (input ``(N, C, H, W)``, low branch at half H and W). See :class:`OctConv`."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, dilation: IntOrTuple = 1, groups: int = 1,
        bias: bool = False, *, pool_first: bool = False, padding: IntOrTuple | str = "same",
        padding_mode: str = "zeros", device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            2, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, dilation, groups, bias,
            pool_first=pool_first, padding=padding, padding_mode=padding_mode, device=device, dtype=dtype,
        )


class OctConv3d(OctConv):
    """3D octave convolution (input ``(N, C, T, H, W)``). See :class:`OctConv`.

    ``octave="spatial"`` halves H and W in the low branch (the paper's video setting, and
    the in-plane choice for anisotropic medical volumes); ``"spatiotemporal"`` halves T too.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, dilation: IntOrTuple = 1, groups: int = 1,
        bias: bool = False, octave: str = "spatial", *, pool_first: bool = False,
        padding: IntOrTuple | str = "same", padding_mode: str = "zeros", device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            3, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, dilation, groups, bias, octave,
            pool_first=pool_first, padding=padding, padding_mode=padding_mode, device=device, dtype=dtype,
        )
