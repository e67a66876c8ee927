"""The octave representation: a ``(high, low)`` pair and the rules that relate its two tensors.

A feature map with ``c`` channels is held as ``high`` (``c - c_low`` channels at full
resolution) and ``low`` (``c_low = floor(alpha * c)`` channels at half resolution on the
*octave axes*). See ``docs/semantics.md`` section 1.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as _torch_module

#: The channels_last memory format of 4D and 5D maps.
CHANNELS_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}

__all__ = [
    "Octave",
    "OctaveInput",
    "OCTAVE_MODES",
    "low_channels",
    "pair_as_octave",
    "split_channels",
    "octave_axes",
    "octave_factors",
    "low_size",
    "avg_pool",
    "upsample_to",
    "to_octave",
    "from_octave",
    "broadcast_upsampled_",
    "is_channels_last",
    "to_channels_last",
    "in_model_layout",
    "check_channels_last",
    "weights_in_model_layout",
    "keep_channels_last",
    "CHANNELS_LAST_FORMATS",
    "fx_leaf_forward",
    "graph_leaf",
]

OCTAVE_MODES = ("spatial", "spatiotemporal")


class Octave(NamedTuple):
    """A feature map split into a full-resolution ``high`` and a half-resolution ``low`` tensor.

    ``low`` is ``None`` for a representation that has no low-frequency channels. Being a
    NamedTuple, an ``Octave`` passes through ``torch.compile``, ``torch.export`` and
    ``nn.Sequential`` unchanged; it deliberately defines no arithmetic, so ``a + b`` on two
    octaves is tuple concatenation; use :func:`oct3d.nn.octave_add` for a per-branch sum.
    """

    high: Tensor
    low: Tensor | None = None


# An Octave saved with torch.save (a feature cache, a traced example input) loads under
# torch.load(weights_only=True) like a plain tuple of tensors: it holds nothing but tensors.
torch.serialization.add_safe_globals([Octave])

#: What an octave layer takes: a plain tensor, an :class:`Octave`, or a ``(high, low)`` pair of
#: tensors (tuple or list).
OctaveInput = Tensor | Octave | tuple[Tensor, Tensor] | list[Tensor]
#: What an octave layer returns: a plain tensor (no low branch) or an :class:`Octave`.
OctaveOutput = Tensor | Octave


def pair_as_octave(x: object) -> object:
    """``Octave(high, low)`` for a plain ``(high, low)`` tuple or list of two tensors (``low`` may be
    None), as ``torch.jit.trace`` and user code pass them; anything else unchanged."""
    if isinstance(x, (tuple, list)) and not isinstance(x, Octave) and len(x) == 2 and isinstance(x[0], Tensor) \
            and (x[1] is None or isinstance(x[1], Tensor)):
        return Octave(x[0], x[1])
    return x


def low_channels(channels: int, alpha: float) -> int:
    """Number of low-frequency channels of a ``channels``-wide map at ratio ``alpha``.

    ``floor(alpha * channels)``, with a small epsilon so that e.g. ``0.3 * 10`` gives 3.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) < 1.0:
        raise ValueError(f"alpha must be a float in [0, 1), got {alpha!r}")
    if isinstance(channels, Tensor) and channels.dim() == 0 and not channels.is_floating_point():
        channels = int(channels)  # torch.jit.trace hands out sizes as 0-d tensors; a channel count is static
    if not isinstance(channels, torch.SymInt) and (
        isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 0
    ):  # (a symbolic size under torch.export is checked by its own guards)
        raise ValueError(f"channels must be an int >= 0, got {channels!r}")
    return math.floor(float(alpha) * channels + 1e-6)


def split_channels(channels: int, alpha: float) -> tuple[int, int]:
    """Return ``(high_channels, low_channels)`` of a ``channels``-wide map at ratio ``alpha``."""
    c_low = low_channels(channels, alpha)
    return channels - c_low, c_low


def octave_axes(dims: int, octave: str = "spatial") -> tuple[bool, ...]:
    """Which of the ``dims`` trailing axes are halved in the low branch.

    1D and 2D maps halve every axis. A 3D map ``(T, H, W)`` halves ``H, W`` with
    ``octave="spatial"`` and ``T, H, W`` with ``octave="spatiotemporal"``.
    """
    if isinstance(dims, bool) or dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    if octave not in OCTAVE_MODES:
        raise ValueError(f"octave must be one of {OCTAVE_MODES}, got {octave!r}")
    if dims == 3:
        return (octave == "spatiotemporal", True, True)
    if octave != "spatial":
        raise ValueError(
            f"octave={octave!r} only applies to 3D maps; {dims}D maps halve every axis, "
            "use octave='spatial'"
        )
    return (True,) * dims


def octave_factors(dims: int, octave: str = "spatial") -> tuple[int, ...]:
    """Resolution ratio high/low per axis: 2 on octave axes, 1 elsewhere."""
    return tuple(2 if a else 1 for a in octave_axes(dims, octave))


def low_size(high_size: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """Size of the low branch for a high branch of ``high_size`` (ceil of half on octave axes)."""
    return tuple(-(-_size(n) // f) for n, f in zip(high_size, factors))


def axes_names(dims: int) -> str:
    """The spatial axes of a ``dims``-D map as error messages name them: ``"L"``, ``"H, W"``, ``"T, H, W"``."""
    return ", ".join(("T", "H", "W")[3 - dims:]) if dims > 1 else "L"


def check_low_size(layer: str, high: Tensor, low: Tensor, factors: Sequence[int], octave: str) -> None:
    """Raise a ``ValueError`` naming ``layer`` unless ``low`` is the octave of ``high`` (same batch, the
    ceiling of half on the octave axes)."""
    expected = low_size(high.shape[2:], factors)
    if tuple(low.shape[2:]) != expected or low.shape[0] != high.shape[0]:
        raise ValueError(
            f"{layer} expects the low tensor of a high tensor shaped {tuple(high.shape)} to be shaped "
            f"{(high.shape[0], low.shape[1], *expected)} (ceil of half on the octave axes, octave={octave!r}), "
            f"got {tuple(low.shape)}"
        )


def check_same_dtype_device(layer: str, high: Tensor, low: Tensor) -> None:
    """Raise a ``ValueError`` naming ``layer`` unless ``high`` and ``low`` share one dtype and device."""
    if low.dtype != high.dtype or low.device != high.device:
        raise ValueError(
            f"{layer} expects the high and low tensors on one device with one dtype, got high "
            f"{high.dtype} on {high.device} and low {low.dtype} on {low.device}"
        )


def check_matches_weight(layer: str, x: Tensor, path: torch.nn.Module) -> None:
    """Raise a ``TypeError`` naming ``layer`` when ``x`` has another dtype or device than ``path``'s weight.

    Reads the raw parameter (a parametrized weight such as ``weight_norm`` is not recomputed for the
    check) and lets autocast (the paths cast their inputs) and meta inputs (shape inference) through.
    """
    weight = path._parameters.get("weight")
    if weight is not None and (x.dtype != weight.dtype or x.device != weight.device) \
            and x.device.type != "meta" and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{layer} has {weight.dtype} weights on {weight.device} and got a {x.dtype} input on "
            f"{x.device}; convert the input (x.to(dtype=..., device=...)) or the model (model.to(...))"
        )


def _size(n: int | torch.SymInt) -> int | torch.SymInt:
    """An axis size as an int; a symbolic size (``torch.export`` with dynamic shapes) stays symbolic."""
    return n if isinstance(n, torch.SymInt) else int(n)


def avg_pool(x: Tensor, factors: Sequence[int]) -> Tensor:
    """Average pooling with kernel = stride = ``factors`` per axis (``ceil_mode``, no padding).

    Identity where every factor is 1. A partial window at an odd border averages only the
    elements it covers, so odd sizes pool to the ceiling of half.
    """
    if all(f == 1 for f in factors):  # first: most calls (every stride-1 path) pool nothing
        return x
    # torch rejects a window larger than the axis; a single partial window (the mean of the
    # whole axis) is the same as a window of the axis's own length.
    # A symbolic size (dynamic shapes under torch.export) is taken to hold at least one window.
    factors = tuple(f if isinstance(n, torch.SymInt) else min(f, int(n)) for f, n in zip(factors, x.shape[2:]))
    if all(f == 1 for f in factors):
        return x
    if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) and not traced_or_compiled():
        # Without autograd the CPU kernel is chosen per shape, by timing (kernels imports this module).
        from oct3d.nn.kernels import avg_pool_nd

        return avg_pool_nd(x, factors)
    if _pool_by_pairs_is_faster(x, factors):
        return _pool_by_pairs(x, factors)
    if (
        x.dim() == 4 and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and is_channels_last(x)
        and torch.is_grad_enabled() and x.requires_grad and not traced_or_compiled()
        and all(n % f == 0 for f, n in zip(factors, x.shape[2:])) and _plain_eager()
    ):
        # avg_pool2d's own backward zero-fills the input gradient, then adds each window's share.
        return _ExactPoolFunction.apply(x, factors, pool_by_torch)
    return pool_by_torch(x, factors)


def pool_by_torch(x: Tensor, factors: tuple[int, ...]) -> Tensor:
    """PyTorch's ``avg_pool{1,2,3}d`` with kernel = stride = ``factors`` (``ceil_mode``, partial
    border windows averaging what they cover), output in the input's memory format."""
    dims = len(factors)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    if dims == 3 and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # avg_pool3d has no reduced-precision CPU kernel.
        y = pool(x.float(), factors, factors, 0, ceil_mode=True, count_include_pad=False).to(x.dtype)
    else:
        y = pool(x, factors, factors, 0, ceil_mode=True, count_include_pad=False)
    if dims > 1 and is_channels_last(x) and not is_channels_last(y):
        # CPU avg_pool3d returns channels_last_3d input channels-first, and a one-channel map comes
        # back unmarked (channel stride not 1) from both poolings; the maps around it keep their layout.
        y = to_channels_last(y)
    return y


_F = TypeVar("_F", bound=Callable[..., Any])
_Forward = TypeVar("_Forward", bound=Callable[..., Any])


def graph_leaf(fn: _F) -> _F:
    """Mark a function that graphs call as one node: called on an fx ``Proxy`` (a GraphModule's
    unpickling re-traces its generated code, and so does a user's ``fx.symbolic_trace``), it records
    the call instead of running its body, which would iterate shapes or branch on them.
    :func:`fx_leaf_forward` does the same for a module's ``forward``."""

    @functools.wraps(fn)
    def leaf(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.fx.Proxy):
            return args[0].tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf  # type: ignore[return-value]
# fx's "inside Tracer.trace" flag, a private query; without it every call is scanned for proxies.
_fx_tracing: Callable[[], bool] = getattr(torch.fx._symbolic_trace, "_get_is_fx_tracing", lambda: True)


def fx_leaf_forward(forward: _Forward) -> _Forward:
    """Make a module's ``forward`` record the module as one ``call_module`` node under fx tracing.

    fx's default tracer treats only ``torch.nn`` modules as leaves and runs every other module's
    ``forward`` on ``Proxy`` values, on which an octave layer's input checks and branch logic
    cannot run. A decorated module called on a ``Proxy`` (alone, or inside an ``Octave`` or a
    tuple) by any tracer that did not already make it a leaf (``fx.symbolic_trace``,
    torchvision's ``create_feature_extractor``, a user's ``fx.Tracer``) appends one
    ``call_module`` node instead, so converted networks re-trace like any ``GraphModule``.
    """

    @functools.wraps(forward)
    def traceable_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _fx_tracing():
            proxy = _first_proxy((*args, *kwargs.values()))
            if proxy is not None:
                tracer = proxy.tracer
                path = tracer.path_of_module(self)
                if not path:
                    raise TypeError(
                        f"torch.fx cannot trace {type(self).__name__} on its own: it is recorded as one node "
                        "inside the module that calls it; trace a module that contains it, e.g. nn.Sequential(layer)"
                    )
                return tracer.create_proxy("call_module", path, args, kwargs)
        return forward(self, *args, **kwargs)

    return traceable_forward  # type: ignore[return-value]


def _first_proxy(values: tuple) -> torch.fx.Proxy | None:
    for value in values:
        if isinstance(value, torch.fx.Proxy):
            return value
        if isinstance(value, (tuple, list)):  # an Octave, a (high, low) pair, a pathway list
            inner = _first_proxy(tuple(value))
            if inner is not None:
                return inner
    return None


def traced_or_compiled() -> bool:
    """Whether this call is being traced or compiled (Dynamo, TorchScript scripting or tracing).

    The CPU-only kernel choices of the fast path switch off there: a graph keeps the plain
    operator, which exports and fuses. Check it first, before anything Dynamo cannot trace.
    """
    # Dynamo answers the first test, so it never sees the private tracer query; a batch-1
    # forward pass asks this a few hundred times.
    return torch.compiler.is_compiling() or _jit_tracing() or torch.jit.is_scripting()


_jit_tracing: Callable[[], bool] = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)

_GLOBAL_HOOK_NAMES = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                      "_global_backward_pre_hooks")


def module_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` has its own forward, pre-forward or backward hooks (see :func:`global_module_hooks`)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_module_hooks() -> bool:
    """Whether any global ``nn.Module`` hook is registered: a layer that would skip calling a
    submodule (to read its weights directly) must call it then, so that the hooks see the call."""
    return any(getattr(_torch_module, name, None) for name in _GLOBAL_HOOK_NAMES)


def _pool_by_pairs_is_faster(x: Tensor, factors: tuple[int, ...]) -> bool:
    """Whether :func:`_pool_by_pairs` should replace ``avg_pool{1,2,3}d`` for this call.

    PyTorch's CPU average-pooling kernels run far below memory bandwidth on
    channels-first maps: ``tools/benchmark.py --ops`` times both side by side (about 3-5x
    for exact 2x2 and 2x2x2 windows; docs/benchmarks/cpu_ops.md). Pairwise adds of
    contiguous slabs are plain vectorised elementwise kernels. They need exact windows
    (every size divisible by its factor, factors powers of two). Under autograd in plain
    eager mode they get a one-kernel backward (:class:`_ExactPoolFunction`); elsewhere under
    autograd, windows wider than 2 take the pooling kernel, whose single backward beats the
    chain of slice backwards. GPUs, reduced precision, and traced or compiled graphs (where
    one pooling op exports and fuses better) keep ``avg_pool``, and so do channels_last 2D
    maps: ``avg_pool2d``'s channels_last kernel is vectorised over channels and beats the
    pairwise adds 1.5-4x, forward and backward (``avg_pool3d`` has no such kernel).
    """
    if traced_or_compiled():
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.dim() == 4 and is_channels_last(x):
        return False
    if any(f & (f - 1) or n % f for f, n in zip(factors, x.shape[2:])):
        return False
    return max(factors) <= 2 or not (torch.is_grad_enabled() and x.requires_grad) or _plain_eager()


def _plain_eager() -> bool:
    """``oct3d.nn.kernels._plain_eager``, bound on first use (kernels imports this module)."""
    global _plain_eager
    from oct3d.nn.kernels import _plain_eager as plain_eager

    _plain_eager = plain_eager
    return plain_eager()


def _pool_by_pairs(x: Tensor, factors: tuple[int, ...]) -> Tensor:
    """Exact-window average pooling as a sum of halves (see :func:`_sum_halves`).

    Under autograd in plain eager mode the backward is one upsampling kernel in the input's
    memory format (:class:`_ExactPoolFunction`); autograd's own backward of the slices and
    adds would fill a zero gradient per slice, add them up, and hand a channels_last map a
    channels-first gradient, which makes every elementwise backward after it (ReLU,
    BatchNorm) run on mismatched layouts, many times slower.
    """
    if torch.is_grad_enabled() and x.requires_grad and _plain_eager():
        return _ExactPoolFunction.apply(x, factors, _sum_halves)
    return _sum_halves(x, factors)


class _ExactPoolFunction(torch.autograd.Function):
    """Exact-window average pooling (computed by ``pool``) whose backward writes the input
    gradient once: each window's share of the output gradient, spread over the window.

    On channels_last maps that is nearest upsampling (``F.interpolate``, vectorised over
    channels: 0.22 ms against 0.28 for ``avg_pool2d``'s backward and 0.39 for the broadcast copy
    at 4x128x56x56 on the development machine; 0.43 against 2.0 for ``avg_pool3d``'s, which also
    returns a channels-first gradient, at 2x16x48x48x32); on channels-first maps the broadcast
    copy of :func:`broadcast_upsampled_` (0.52 against 1.9 ms for the upsampling).
    """

    @staticmethod
    def forward(ctx, x: Tensor, factors: tuple[int, ...], pool: Callable[[Tensor, tuple[int, ...]], Tensor]) -> Tensor:
        ctx.factors = factors
        ctx.input_shape = x.shape
        ctx.input_strides = x.stride()
        ctx.channels_last = x.dim() > 3 and is_channels_last(x)
        return pool(x, factors)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        scale = 1.0 / math.prod(ctx.factors)
        if ctx.channels_last or torch.is_grad_enabled():  # (double backward, create_graph=True: differentiable ops)
            up = F.interpolate(grad * scale, scale_factor=[float(f) for f in ctx.factors], mode="nearest")
            return (to_channels_last(up) if ctx.channels_last and not is_channels_last(up) else up), None, None
        out = torch.empty_strided(ctx.input_shape, ctx.input_strides, dtype=grad.dtype, device=grad.device)
        return broadcast_upsampled_(out, grad * scale, ctx.factors, "copy"), None, None


def broadcast_upsampled_(y: Tensor, small: Tensor, factors: Sequence[int], mode: str = "add") -> Tensor:
    """``y += up(small)`` (``mode="add"``) or ``y[:] = up(small)`` (``"copy"``) in place, where
    ``up`` is nearest upsampling by ``factors`` and every axis of ``y`` is exactly ``factor``
    times ``small``'s; returns ``y``. No autograd.

    ``y`` is viewed as ``(N, C, m0, f0, m1, f1, ...)`` and ``small`` broadcast over the ``f``
    axes, so the upsampled map is never materialised, except along the innermost axis in
    memory: a broadcast there would leave the kernel a 2-element (channels-first) or
    ``C``-element (channels_last) inner loop, so ``small`` is materialised along that one axis
    (half of ``y`` at most), which keeps the kernel vectorised over whole rows.
    """
    factors = tuple(factors)
    op = {"add": Tensor.add_, "copy": Tensor.copy_}[mode]
    channels_last = y.dim() > 3 and is_channels_last(y)
    if channels_last:
        target, source = y.movedim(1, -1), small.movedim(1, -1)  # (N, *spatial, C): dense views
        spatial = range(1, y.dim() - 1)
    else:
        target, source = y, small
        spatial = range(2, y.dim())
    last = spatial[-1]
    if factors[-1] > 1 and (channels_last or y.stride(-1) == 1) and y.device.type == "cpu":
        source = source.repeat_interleave(factors[-1], dim=last)
        factors = (*factors[:-1], 1)
    view_shape: list[int] = []
    index: list[object] = []
    for axis, m in enumerate(source.shape):
        view_shape.append(m)
        index.append(slice(None))
        if axis in spatial and factors[axis - spatial[0]] != 1:
            view_shape.append(factors[axis - spatial[0]])
            index.append(None)
    op(target.view(view_shape), source[tuple(index)])
    return y


def is_channels_last(t: Tensor) -> bool:
    """Whether PyTorch treats ``t`` as channels_last(_3d), as its ``suggest_memory_format`` does.

    A map that is both contiguous and channels_last counts as contiguous, except a
    one-channel map whose channel stride is 1: that is how a one-channel volume is marked
    channels_last (``.contiguous(memory_format=...)`` leaves it unchanged), and convolutions
    then return their output channels_last.
    """
    layout = CHANNELS_LAST_FORMATS.get(t.dim())
    if layout is None:
        return False
    if t.is_contiguous():  # asked first: torch.func's vmap only answers this one
        return t.shape[1] == 1 and t.stride(1) == 1 and math.prod(t.shape[2:]) > 1
    try:
        return t.is_contiguous(memory_format=layout)
    except RuntimeError:  # a non-contiguous map under vmap: its layout cannot be queried, none is kept
        return False


def to_channels_last(t: Tensor) -> Tensor:
    """``t`` in the channels_last(_3d) memory format (a 4D or 5D map), copied only where needed.

    A one-channel map is contiguous in both layouts, and ``.contiguous(memory_format=...)``
    leaves it alone; a channel stride of 1 is what marks it channels_last for the
    convolutions, so it gets that stride on the same memory (a view, no copy).
    """
    layout = CHANNELS_LAST_FORMATS.get(t.dim())
    if layout is None:
        raise ValueError(f"t must be a 4D or 5D map (N, C, *spatial), got shape {tuple(t.shape)}")
    if t.shape[1] == 1 and t.is_contiguous():
        # View ops rather than as_strided, so that a trace (jit, ONNX) keeps the strides symbolic.
        return t.squeeze(1).unsqueeze(-1).movedim(-1, 1)
    return t.contiguous(memory_format=layout)


@graph_leaf
def in_model_layout(x: object, channels_last: bool | None) -> object:
    """``x`` in the memory format a network with this ``channels_last`` setting runs in.

    ``None`` (the models' default) means channels_last(_3d) for CPU inputs and the input's own
    layout elsewhere; anything but a 4D or 5D tensor passes through unchanged. oneDNN computes
    CPU convolutions in channels_last: given a channels-first map it reorders every input and
    output of every convolution to its blocked layout and back, copies that cost more than the
    half-width octave convolutions save (docs/speed.md). Once the input is channels_last, the
    convolutions, norms and pools after it keep that layout, so a network converts once, at
    its input.
    """
    if not isinstance(x, Tensor) or x.dim() not in CHANNELS_LAST_FORMATS:
        return x
    if channels_last is None:
        channels_last = x.device.type == "cpu"
    return to_channels_last(x) if channels_last else x


def weights_in_model_layout(module: torch.nn.Module, channels_last: bool | None) -> torch.nn.Module:
    """Store the weights of ``module``'s convolutions (every ``nn.Conv*d`` and ``nn.ConvTranspose*d``
    in it, the octave layers' paths included) channels_last(_3d) unless ``channels_last`` is False;
    in place, returning ``module``. Other parameters keep their layout.

    The weights of a network that runs channels_last should be laid out that way too: oneDNN
    otherwise copies every channels-first weight to channels_last in each training step's
    forward and backward pass and its gradient back (for a 3x3 weight a strided transposition;
    the builders' models and ``octavize``'s networks store them so since this cost 2.5% of an
    Oct-ResNet-50 training step on CPU). A model moved to CUDA keeps them so, and cuDNN then
    computes in channels_last too, the layout its tensor-core kernels prefer under autocast.
    Values, state dicts and checkpoints do not depend on the layout.
    """
    if channels_last is False:
        return module
    for layer in module.modules():
        if not isinstance(layer, torch.nn.modules.conv._ConvNd):
            continue
        weight = layer._parameters.get("weight")  # (a parametrised weight is computed, not stored: left alone)
        layout = None if weight is None else CHANNELS_LAST_FORMATS.get(weight.dim())
        if layout is not None and not weight.is_contiguous(memory_format=layout):
            weight.data = weight.data.contiguous(memory_format=layout)
    return module


def check_channels_last(channels_last: object) -> bool | None:
    """Validate a ``channels_last`` argument of a model or of ``octavize``: ``None`` (on CPU inputs
    only, see :func:`in_model_layout`) or a bool."""
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool or None, got {channels_last!r}")
    return channels_last


def keep_channels_last(out: object, like: object) -> object:
    """A convolution's ``out``, channels_last(_3d) again where its input ``like`` was.

    PyTorch's im2col fallback (batch 1 or one thread, small maps) returns a channels_last
    input's result channels-first; every layer after it would then run on the slow layout.
    """
    if isinstance(out, torch.fx.Proxy):  # a GraphModule's unpickling re-traces its code: keep the node
        return out.tracer.create_proxy("call_function", keep_channels_last, (out, like), {})
    if (
        isinstance(out, Tensor) and isinstance(like, Tensor) and out.dim() in CHANNELS_LAST_FORMATS
        and is_channels_last(like) and not is_channels_last(out)
    ):
        return to_channels_last(out)
    return out

def _sum_halves(x: Tensor, factors: tuple[int, ...]) -> Tensor:
    """Exact-window average pooling as a sum of halves, axis by axis (outermost first, so the
    later strided adds touch the already reduced map), then one scale. The output keeps the
    input's memory format (CPU ``avg_pool3d`` turns channels_last_3d into contiguous)."""
    if x.dim() > 3 and x.shape[1] == 1 and is_channels_last(x):
        # A one-channel map is channels_last by its channel stride alone, which the adds drop; mark
        # the result too, or the convolution after it returns a channels-first map (one copy more).
        return to_channels_last(_sum_halves(x.squeeze(1).unsqueeze(1), factors))
    # At batch 1 the adds run without the batch axis: with it they may give that size-1 axis a
    # stride between the others, and torch.cat and the convolutions then no longer see a
    # channels_last result as channels_last (and copy it).
    batch1 = x.shape[0] == 1
    if batch1:
        x = x[0]
    for axis, factor in enumerate(factors, start=1 if batch1 else 2):
        while factor > 1:
            pairs = x.unflatten(axis, (x.shape[axis] // 2, 2))
            x = pairs.select(axis + 1, 0) + pairs.select(axis + 1, 1)
            factor //= 2
    x = x.mul_(1.0 / math.prod(factors))
    if not batch1:
        return x
    # unsqueeze would give the new axis the stride of the innermost axis; the outermost's is what
    # a channels_last tensor has (the map is dense, so this is a view of all of it).
    return x.as_strided((1, *x.shape), (x.numel(), *x.stride()))


def upsample_to(x: Tensor, factors: Sequence[int], size: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling by ``factors`` per axis, cropped to ``size``.

    Equal to repeating each element ``factor`` times along its axis, then cropping.
    """
    factors = tuple(factors)
    if any(f != 1 for f in factors):
        x = F.interpolate(x, scale_factor=[float(f) for f in factors], mode="nearest")
    if torch.compiler.is_compiling() or tuple(x.shape[2:]) != tuple(size):
        # Under Dynamo and torch.export the crop is always recorded (a no-op view on even sizes), so that
        # a dynamic size needs no parity guard. (torch.jit.trace would record the example's size instead.)
        index = (slice(None), slice(None)) + tuple(slice(0, _size(n)) for n in size)
        x = x[index]
    return x


def to_octave(x: Tensor, alpha: float, octave: str = "spatial") -> Octave:
    """Split a plain ``(N, C, *spatial)`` tensor into an :class:`Octave` at ratio ``alpha``.

    The first ``C - floor(alpha * C)`` channels stay at full resolution; the others are
    average-pooled by 2 on the octave axes. Use it to feed an octave layer whose
    ``alpha_in > 0`` from a vanilla tensor.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"x must have shape (N, C, *spatial) with 1-3 spatial axes, got {tuple(x.shape)}")
    c_high, c_low = split_channels(x.shape[1], alpha)  # checks alpha
    if c_low == 0:
        if alpha > 0:
            raise ValueError(f"alpha={alpha} leaves no low-frequency channels out of {x.shape[1]}; "
                             "use alpha=0 or a tensor with more channels")
        return Octave(x, None)
    factors = octave_factors(x.dim() - 2, octave)
    return Octave(x[:, :c_high], avg_pool(x[:, c_high:], factors))


def from_octave(x: Octave | Tensor, octave: str = "spatial") -> Tensor:
    """Merge an :class:`Octave` (or a ``(high, low)`` pair) into one full-resolution tensor (low
    upsampled, then concatenated).

    A plain tensor is returned unchanged.
    """
    x = pair_as_octave(x)
    if isinstance(x, Tensor):
        return x
    if not isinstance(x, Octave):
        raise TypeError(f"x must be an Octave, a (high, low) pair or a torch.Tensor, got {type(x).__name__}")
    if x.low is None:
        return x.high
    if x.high.dim() not in (3, 4, 5) or x.low.dim() != x.high.dim():
        raise ValueError(f"from_octave expects high and low maps (N, C, *spatial) with 1-3 spatial axes, got "
                         f"{tuple(x.high.shape)} and {tuple(x.low.shape)}")
    if x.low.shape[0] != x.high.shape[0] or x.low.dtype != x.high.dtype or x.low.device != x.high.device:
        raise ValueError(
            f"from_octave expects the low tensor in the high tensor's batch size, dtype and device "
            f"({x.high.shape[0]}, {x.high.dtype}, {x.high.device}), got "
            f"({x.low.shape[0]}, {x.low.dtype}, {x.low.device})"
        )
    factors = octave_factors(x.high.dim() - 2, octave)
    expected = low_size(x.high.shape[2:], factors)
    if tuple(x.low.shape[2:]) != expected:
        fits = [m for m in OCTAVE_MODES if x.high.dim() == 5 and m != octave
                and low_size(x.high.shape[2:], octave_factors(3, m)) == tuple(x.low.shape[2:])]
        raise ValueError(
            f"from_octave(octave={octave!r}) expects the low tensor of a high tensor shaped {tuple(x.high.shape)} "
            f"to have spatial size {expected}, got {tuple(x.low.shape[2:])}"
            + (f"; this pair fits octave={fits[0]!r}" if fits else "")
        )
    low = upsample_to(x.low, factors, x.high.shape[2:])
    return torch.cat([x.high, low], dim=1)
