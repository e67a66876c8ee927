"""Octave transposed convolution, the upsampling layer of octave decoders.

:class:`OctConvTranspose` mirrors :class:`~oct3d.nn.OctConv` for ``nn.ConvTransposeNd``. With the
vanilla layer's geometry ``T`` (kernel, stride, padding, output padding) on every path:

    Y_high = T_h2h(X_high) + up(T_l2h(X_low), size of Y_high)
    Y_low  = T_l2l(X_low)  + T_h2l(pool(X_high))          (cropped to the low size of Y_high)

``pool`` and ``up`` are the octave resampling ops of ``docs/semantics.md`` section 2 (average pooling by 2
on the octave axes, nearest upsampling then crop). H->L pools *before* its transposed convolution,
as a strided octave convolution pools first, so every low-resolution path costs a quarter of its
high-resolution counterpart in 2D (FLOPs ``(1-a)^2 + a(1-a)/2 + a^2/4`` of the vanilla layer, as for
``OctConv``). At ``alpha_in == alpha_out == 0`` the layer is exactly the vanilla ``ConvTransposeNd``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from oct3d.nn.conv import (
    IntOrTuple,
    branch_channels,
    check_alpha,
    check_bool,
    check_float_dtype,
    check_minimums,
    check_positive_int,
    to_tuple,
)
from oct3d.nn.octave import (
    CHANNELS_LAST_FORMATS,
    Octave,
    OctaveInput,
    OctaveOutput,
    avg_pool,
    axes_names,
    check_low_size,
    check_matches_weight,
    check_same_dtype_device,
    fx_leaf_forward,
    is_channels_last,
    low_size,
    octave_axes,
    pair_as_octave,
    upsample_to,
)

__all__ = [
    "OctConvTranspose",
    "OctConvTranspose1d",
    "OctConvTranspose2d",
    "OctConvTranspose3d",
    "transposed_low_size_ok",
]

_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _out_size(n: int, kernel: int, stride: int, padding: int, output_padding: int) -> int:
    return (n - 1) * stride - 2 * padding + kernel + output_padding


def transposed_low_size_ok(
    kernel_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
    output_padding: tuple[int, ...], factors: tuple[int, ...], sizes: range = range(1, 65),
) -> bool:
    """Whether the geometry's low output always covers the octave low size of its high output.

    The low paths see maps of ``ceil(n / 2)`` on the octave axes; their transposed convolution must
    give at least ``ceil(out(n) / 2)`` so that cropping (never padding) aligns the branches. True for
    the usual decoder layers (kernel 2 stride 2; kernel 3 stride 2 padding 1 output padding 1; any
    stride-1 "same" layer), false e.g. for kernel 3 stride 2 padding 1 without output padding.
    """
    for k, s, p, op, f in zip(kernel_size, stride, padding, output_padding, factors):
        if f == 1:
            continue
        for n in sizes:
            out_high = _out_size(n, k, s, p, op)
            if out_high < 1:
                continue
            if _out_size(-(-n // f), k, s, p, op) < -(-out_high // f):
                return False
    return True


class OctConvTranspose(nn.Module):
    """Octave transposed convolution over ``dims`` (1, 2 or 3) spatial axes.

    Args:
        dims: number of spatial axes.
        in_channels, out_channels: total channels (high + low) of the input and output.
        kernel_size, stride, padding, output_padding: the vanilla ``ConvTransposeNd`` geometry, shared by
            every path (int or per-axis tuple); :func:`transposed_low_size_ok` must hold for it.
        alpha_in, alpha_out: fractions of low-frequency channels of the input and the output, in [0, 1).
        bias: a learnable bias per output branch (on ``h2h`` and ``l2l``, or ``h2l`` without ``l2l``).
        octave: 3D only, ``"spatial"`` (halve H, W) or ``"spatiotemporal"`` (halve T, H, W).
        device, dtype: where and in which dtype the weights are made (as for ``nn.ConvTransposeNd``).

    Paths are ordinary ``ConvTransposeNd`` modules named ``h2h``, ``h2l``, ``l2h`` and ``l2l`` (absent
    paths are None). Input and output follow :class:`~oct3d.nn.OctConv`: a plain tensor at ratio 0,
    an :class:`~oct3d.nn.Octave` otherwise.
    """

    def __init__(
        self, dims: int, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, padding: IntOrTuple = 0, output_padding: IntOrTuple = 0,
        bias: bool = False, octave: str = "spatial", *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        bias = check_bool(bias, "bias")
        check_float_dtype(dtype)
        if dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3 (the spatial axes of the maps), got {dims!r}")
        self.axes = octave_axes(dims, octave)
        check_positive_int(in_channels, "in_channels")
        check_positive_int(out_channels, "out_channels")
        self.dims, self.octave = dims, octave
        self.in_channels, self.out_channels = in_channels, out_channels
        self.alpha_in = check_alpha(alpha_in, "alpha_in")
        self.alpha_out = check_alpha(alpha_out, "alpha_out")
        self.kernel_size = to_tuple(kernel_size, dims, "kernel_size")
        self.stride = to_tuple(stride, dims, "stride")
        self.padding = to_tuple(padding, dims, "padding")
        self.output_padding = to_tuple(output_padding, dims, "output_padding")
        check_minimums((("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1), ("padding", self.padding, 0),
                        ("output_padding", self.output_padding, 0)))
        if any(op >= st for op, st in zip(self.output_padding, self.stride)):
            raise ValueError(f"output_padding must be smaller than stride on every axis (as in nn.ConvTranspose), got "
                             f"output_padding={self.output_padding} for stride={self.stride}")
        self.factors = tuple(2 if a else 1 for a in self.axes)
        self.in_high, self.in_low, self.out_high, self.out_low = branch_channels(
            in_channels, out_channels, self.alpha_in, self.alpha_out
        )
        if (self.in_low or self.out_low) and not transposed_low_size_ok(
            self.kernel_size, self.stride, self.padding, self.output_padding, self.factors
        ):
            raise ValueError(
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"output_padding={self.output_padding}: the low branch would come out smaller than half the "
                "high branch; use kernel - 2 * padding + output_padding >= stride"
            )

        def path(cin: int, cout: int, with_bias: bool) -> nn.Module:
            return _CONV_T[dims](
                cin, cout, self.kernel_size, self.stride, self.padding, self.output_padding, bias=with_bias,
                device=device, dtype=dtype,
            )

        self.h2h = path(self.in_high, self.out_high, bias)
        self.h2l = path(self.in_high, self.out_low, bias and self.in_low == 0) if self.out_low else None
        self.l2h = path(self.in_low, self.out_high, False) if self.in_low else None
        self.l2l = path(self.in_low, self.out_low, bias) if self.in_low and self.out_low else None
        self.is_vanilla = self.in_low == 0 and self.out_low == 0
        if not self.is_vanilla:  # (a vanilla layer's path already has nn.ConvTransposeNd's own initialisation)
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the paths as ``nn.ConvTransposeNd`` initialises the vanilla layer they are slices of.

        PyTorch draws a transposed convolution's weights uniformly within ``1 / sqrt(fan)``, where
        ``fan`` is its ``out_channels * prod(kernel_size)`` (dimension 1 of its weight). Each path
        alone would use its own, smaller share of the channels and start an alpha-.5 layer's output
        with up to twice the vanilla variance; every path takes the whole layer's bound instead.
        """
        bound = 1.0 / math.sqrt(self.out_channels * math.prod(self.kernel_size))
        for path in (self.h2h, self.h2l, self.l2h, self.l2l):
            if path is not None:
                nn.init.uniform_(path.weight, -bound, bound)
                if path.bias is not None:
                    nn.init.uniform_(path.bias, -bound, bound)

    def extra_repr(self) -> str:
        # Constructor-like: OctConvTranspose2d(8, 8, kernel_size=(2, 2), ...); the generic class leads with dims.
        dimensional = (OctConvTranspose1d, OctConvTranspose2d, OctConvTranspose3d)
        parts = [] if isinstance(self, dimensional) else [str(self.dims)]
        parts += [str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}",
                  f"alpha_in={self.alpha_in}", f"alpha_out={self.alpha_out}", f"stride={self.stride}",
                  f"padding={self.padding}", f"output_padding={self.output_padding}"]
        if any(getattr(p, "bias", None) is not None for p in self._modules.values()):
            parts.append("bias=True")
        if self.dims == 3:
            parts.append(f"octave={self.octave!r}")
        return ", ".join(parts)

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """``Y_high`` (and ``Y_low`` as an :class:`~oct3d.nn.Octave`) of the module docstring's formula."""
        high, low = self._split_input(x)
        y_high = self.h2h(high)
        if self.l2h is not None:
            y_high = y_high + upsample_to(self.l2h(low), self.factors, y_high.shape[2:])
        if not self.out_low:
            return y_high
        size = low_size(y_high.shape[2:], self.factors)
        y_low = self.h2l(avg_pool(high, self.factors))
        if self.l2l is not None:
            y_low = y_low + self.l2l(low)
        if tuple(y_low.shape[2:]) != size:
            crop = (slice(None), slice(None), *(slice(0, n) for n in size))
            # A crop is a strided view; later layers get a dense map in the input's layout.
            layout = CHANNELS_LAST_FORMATS[high.dim()] if is_channels_last(high) else torch.contiguous_format
            y_low = y_low[crop].contiguous(memory_format=layout)
        return Octave(y_high, y_low)

    def _split_input(self, x: OctaveInput) -> tuple[Tensor, Tensor | None]:
        name = f"OctConvTranspose{self.dims}d"
        x = pair_as_octave(x)
        high = x.high if isinstance(x, Octave) else x
        low = x.low if isinstance(x, Octave) else None
        if not isinstance(high, Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, an Octave or a (high, low) pair, got {type(x).__name__}")
        if low is None and self.in_low:
            raise TypeError(
                f"{name} has alpha_in={self.alpha_in} and needs an Octave(high, low) input with a low tensor; "
                f"got a plain tensor of shape {tuple(high.shape)}. Use oct3d.nn.to_octave(x, alpha) at the "
                "boundary, or alpha_in=0"
            )
        if low is not None and not self.in_low:
            raise TypeError(
                f"{name} has alpha_in=0 and takes no low branch, but got an Octave with a low tensor of shape "
                f"{tuple(low.shape) if isinstance(low, Tensor) else type(low).__name__}; set alpha_in to match "
                "the previous layer's alpha_out"
            )
        axes = axes_names(self.dims)
        for branch, t, channels in (("high", high, self.in_high), ("low", low, self.in_low)):
            if t is None:
                continue
            if t.dim() != self.dims + 2 or t.shape[1] != channels:
                raise ValueError(f"{name} expects a {branch} tensor of shape (N, {channels}, {axes}) (in_channels="
                                 f"{self.in_channels}, alpha_in={self.alpha_in}), got {tuple(t.shape)}")
        check_matches_weight(name, high, self.h2h)
        if low is not None:
            check_same_dtype_device(name, high, low)
            check_low_size(name, high, low, self.factors, self.octave)
        return high, low


class OctConvTranspose1d(OctConvTranspose):
    """:class:`OctConvTranspose` on 1D maps ``(N, C, L)``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, padding: IntOrTuple = 0, output_padding: IntOrTuple = 0,
        bias: bool = False, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(1, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, padding,
                         output_padding, bias, device=device, dtype=dtype)


class OctConvTranspose2d(OctConvTranspose):
    """:class:`OctConvTranspose` on 2D maps ``(N, C, H, W)``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, padding: IntOrTuple = 0, output_padding: IntOrTuple = 0,
        bias: bool = False, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(2, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, padding,
                         output_padding, bias, device=device, dtype=dtype)


class OctConvTranspose3d(OctConvTranspose):
    """:class:`OctConvTranspose` on 3D maps ``(N, C, T, H, W)``, the low branch at half H, W (``"spatial"``)
    or half T, H, W (``"spatiotemporal"``)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntOrTuple, alpha_in: float = 0.5,
        alpha_out: float = 0.5, stride: IntOrTuple = 1, padding: IntOrTuple = 0, output_padding: IntOrTuple = 0,
        bias: bool = False, octave: str = "spatial", *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, alpha_in, alpha_out, stride, padding,
                         output_padding, bias, octave, device=device, dtype=dtype)
