"""CPU kernel choices for the octave paths, measured on first use.

An octave layer computes four stride-1 convolutions (``oct3d.nn.conv``); how fast each runs
on a CPU depends on the kernel that computes it, and no fixed rule is best on every machine.
PyTorch's own CPU dispatch (``use_mkldnn`` in ATen's ``Convolution.cpp``) sends batch-1
float32 convolutions on small maps to an im2col kernel, a threshold tuned on 2D maps; the
octave paths, at half width and half resolution, land there far more often than a vanilla
network. So this module chooses, per call shape, among kernels that compute the same
values:

- ``"default"``: ``F.conv{1,2,3}d``, PyTorch's own choice;
- ``"onednn"``: ``torch.mkldnn_convolution`` called directly (batch 1, where PyTorch may
  pick im2col);
- ``"onednn_channels_last"``: the same on channels_last copies of input and weight, output
  converted back (small channels-first maps, where oneDNN's blocked-layout reorders
  dominate);
- ``"frames"``: a ``1 x k x k`` 3D convolution run as one 2D convolution over the frames,
  ``(N*T, C, H, W)``;
- ``"onednn_packed"``: without autograd, oneDNN on a weight reordered once into oneDNN's
  blocked layout and cached (``torch.ops.mkldnn._convolution_pointwise``, the call inductor's
  freezing emits). ``F.convNd`` reorders the weight on every call; on small maps at batch 1
  that copy costs as much as the convolution itself.
- ``"matmul"``: a pointwise (1x1, 1x1x1) stride-1 convolution of a channels_last map as
  the matrix product it is, ``F.linear`` over the ``(N, *spatial, C)`` view (one BLAS call
  forward, two backward, no weight reorder; oneDNN's channels_last backward also copies every
  weight gradient to channels_last once more). It wins where the weight is large against the
  map (an Oct-ResNet-50's deep 1x1 layers at 7x7 and 14x14: 1.85 -> 1.15 ms for a training
  step of a 1024->256 layer at batch 4) and loses on large maps.

With :data:`autotune` on (the default; ``OCT3D_AUTOTUNE=0`` in the environment or
``oct3d.nn.kernels.autotune = False`` turns it off, and so does PyTorch's deterministic mode,
see :func:`tuning_enabled`), the first call of each distinct setting
(shapes, strides, dtype, memory format, whether a backward pass follows, thread count) times
the applicable kernels a few times each, interleaved, forward and (under autograd) backward,
and caches the fastest for the process, as ``torch.backends.cudnn.benchmark`` does. The
same mechanism chooses between equivalent formulations of a whole octave layer (see
:func:`choose`), such as one convolution over concatenated inputs against two convolutions
and an add. Different kernels round differently, so with autotuning two processes may differ
in the last bits; turn it off for bit-for-bit repeatable runs.

Average pooling (the octave layers' ``pool``) is chosen the same way when no backward pass
follows (:func:`avg_pool_nd`), among :data:`POOL_KERNELS`:

- ``"avg_pool"``: ``F.avg_pool{1,2,3}d``;
- ``"pairs"``: pairwise adds of the two halves of each pooled axis, then one scale
  (vectorised elementwise kernels; PyTorch's pooling kernels run far below memory bandwidth
  on channels-first maps and on channels_last_3d ones);
- ``"onednn_depthwise"``: a depthwise oneDNN convolution with kernel = stride = window and
  every weight ``1 / window size``: one pass over the map, vectorised over channels (in the
  U-Net at 96x96x64 on the development machine it won the full-resolution pools and the pairs
  the small ones; docs/speed.md).

With autotuning off, or wherever timing is not safe, a deterministic rule decides
(:func:`rule_kernel`): frames under autograd for ``1 x k x k`` kernels, packed weights for
channels_last maps without autograd in eval mode, oneDNN for batch-1 3D non-pointwise kernels and
batch-1 channels_last maps, else PyTorch's default.

Nothing here runs outside plain eager CPU execution: under ``torch.compile``, TorchScript,
tracing, export, autocast, ``torch.func`` transforms, forward AD or a dispatch mode (such as
``FlopCounterMode``) every convolution is ``F.convNd``, except the frames rule, which is made
of ordinary differentiable operators.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _python_dispatch

from oct3d.nn import octave as _octave
from oct3d.nn.octave import CHANNELS_LAST_FORMATS as _CHANNELS_LAST
from oct3d.nn.octave import is_channels_last as _is_channels_last
from oct3d.nn.octave import traced_or_compiled

__all__ = [
    "KERNELS",
    "LAYER_PLANS",
    "POOL_KERNELS",
    "autotune",
    "avg_pool_nd",
    "cache_info",
    "choose",
    "clear_cache",
    "conv_nd",
    "conv_add_upsampled_relu",
    "conv_kernels",
    "force",
    "forget_weights",
    "memo",
    "packed_weight",
    "pool_kernels",
    "rule_kernel",
    "run_conv",
    "run_pool",
    "tuning_enabled",
]

#: Every convolution kernel this module can route to.
KERNELS = ("default", "onednn", "onednn_channels_last", "frames", "onednn_packed", "matmul")

#: The layer-level plans :func:`force` can set, per family (see ``OctConv._sum_of_convs`` and
#: :func:`conv_add_upsampled_relu`).
LAYER_PLANS = {"low": ("cat", "split"), "high": ("cat", "split"), "conv_add_relu": ("fused", "separate")}

#: Every average-pooling kernel this module can route to (see :func:`avg_pool_nd`).
POOL_KERNELS = ("avg_pool", "pairs", "onednn_depthwise")

#: Time the applicable kernels on first use and keep the fastest (``OCT3D_AUTOTUNE=0`` turns it off).
autotune: bool = os.environ.get("OCT3D_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")

#: Timed calls per candidate (after one warm-up call); the minimum counts.
TUNE_REPS = 3
#: Candidates whose warm-up call took this many times the fastest warm-up are not timed further.
TUNE_DROP = 4.0
#: A candidate must beat the rule's choice by this factor to replace it: on a loaded machine a few
#: timed calls are noisy, and only clear wins (im2col against oneDNN is 1.4x-3x) should flip a choice.
TUNE_MARGIN = 0.9

_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available()
# oneDNN's channels_last path pays two layout copies; beyond this many input elements they cost more than they save.
_CHANNELS_LAST_MAX_NUMEL = 1 << 20

# Weight-packing ops of oneDNN builds (absent elsewhere: the packed kernel is then never offered).
_PACK_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None) if _ONEDNN_AVAILABLE else None
_PACKED_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if _ONEDNN_AVAILABLE else None


def _packed_conv_add_op() -> Callable[..., Tensor] | None:
    # In-place "conv(x) + other, then a unary op" on packed weights (the fusion inductor's freezing emits).
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):
        return None


_PACKED_CONV_ADD = _packed_conv_add_op() if _ONEDNN_AVAILABLE and _PACKED_CONV is not None else None
#: Packed copies kept per weight (one per input shape; the oldest is dropped beyond this).
PACKED_PER_WEIGHT = 4
# weight -> {(input shape, stride, padding, dilation, groups): (version, data_ptr, packed)}; entries die with
# the weight. Keyed by identity: a tensor's ``==`` is elementwise.
_packed: _WeakIdCache  # set below, once the class exists
# layer -> its cached weight copies (see layer_cache); entries die with the layer.
_layer_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_cache: dict[tuple, str] = {}
# conv_nd's memo: the kernel (and output layout) resolved for each exact call setting, so that a
# repeated call skips the applicability checks and the tuning key (a few microseconds a call,
# which add up to several percent of a batch-1 forward pass); and memo()'s, for layer plans.
_resolved_convs: dict[tuple, tuple[str, torch.memory_format]] = {}
_resolved: dict[tuple, str] = {}
# avg_pool_nd's memo, as _resolved_convs is conv_nd's.
_resolved_pools: dict[tuple, str] = {}
# (channels, window, dtype) -> the constant depthwise weight of the "onednn_depthwise" pool.
_pool_weights: dict[tuple, Tensor] = {}
_forced: dict[str, str] = {}


# ----------------------------------------------------------------------------- public API
def tuning_enabled() -> bool:
    """Whether choices are timed: :data:`autotune` is on and PyTorch's deterministic mode is off.

    ``torch.use_deterministic_algorithms(True)`` (which Lightning's ``Trainer(deterministic=True)``
    sets) asks for bit-for-bit repeatable runs; timed choices can differ between processes, and
    different kernels round differently, so there the deterministic rule decides, as
    ``cudnn.benchmark`` must be off for determinism on GPUs.
    """
    return autotune and not torch.are_deterministic_algorithms_enabled()


def conv_nd(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int, cache_weights: bool = True,
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` through the kernel
    chosen for this setting; same values (up to rounding), output in the input's memory
    format (see :func:`run_conv`). ``cache_weights=False`` keeps the packed-weight kernel out
    (a caller whose weights may change without a version bump, e.g. a module in training mode).
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if x.device.type != "cpu" or traced_or_compiled():
        return _CONV_FN[x.dim()](x, weight, bias, stride, padding, dilation, groups)
    plain = _plain_eager()
    # Every input of the choice below, in one cheap key: strides stand for the memory format.
    # A forced choice bypasses the memo (it is for tests and A/B runs).
    memo_key = None
    if not _forced and x.layout == torch.strided and weight.layout == torch.strided:
        memo_key = (
            x.shape, x.stride(), x.dtype, weight.shape, weight.stride(), weight.dtype,
            None if bias is None else bias.requires_grad, stride, padding,
            dilation, groups, plain, cache_weights, torch.is_grad_enabled(), x.requires_grad, weight.requires_grad,
            tuning_enabled(),
            torch.get_num_threads(),
        )
        hit = _resolved_convs.get(memo_key)
        if hit is not None:
            return run_conv(hit[0], x, weight, bias, stride, padding, dilation, groups, hit[1])
    kernels = conv_kernels(x, weight, stride, padding, groups, plain, cache_weights)
    final = True
    if len(kernels) == 1:
        kernel = kernels[0]
    else:
        forced = _forced.get("conv")
        if forced is not None:
            kernel = forced if forced in kernels else rule_kernel(x, weight, kernels)
        else:
            kernel, final = _choose(
                ("conv", *_signature(x), *_signature(weight), bias is None, stride, padding, dilation, groups),
                {k: (lambda *a, k=k: run_conv(k, *a, stride, padding, dilation, groups)) for k in kernels},
                (x, weight, bias),
                rule_kernel(x, weight, kernels),
                plain=plain,
            )
    if memo_key is not None and final:
        _resolved_convs[memo_key] = (kernel, conv_output_format(x, weight))
    return run_conv(kernel, x, weight, bias, stride, padding, dilation, groups)


def conv_add_upsampled_relu(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: Sequence[int], dilation: Sequence[int], groups: int,
    small: Tensor, factors: Sequence[int],
) -> Tensor:
    """``relu(conv(x) + up(small))`` without autograd: a stride-1 convolution, the nearest
    upsampling of ``small`` by ``factors`` (exactly the convolution's output size) added, then
    ReLU; the high branch of an octave layer followed by ReLU, with BatchNorm folded in
    (:func:`oct3d.nn.fold.conv_norm`).

    On channels_last float32 CPU maps, with cacheable weights, two formulations are timed once
    per setting like every choice here: ``"separate"``, the convolution (through
    :func:`conv_nd`), the broadcast add in place and ReLU in place, each a pass over the
    output; and ``"fused"``, ``small`` upsampled into the output buffer, then one oneDNN
    convolution on packed weights that adds its result to the buffer and applies ReLU before
    writing (``torch.ops.mkldnn._convolution_pointwise_.binary``), which saves two passes over
    the full-resolution map. The fused one is the rule (it measured 4-11% faster per layer on
    2D and 3D maps on the development machine); the other must beat it by :data:`TUNE_MARGIN`.
    Elsewhere (channels-first maps, other dtypes, autograd, graphs) the separate form runs.
    """
    stride = (1,) * (x.dim() - 2)
    padding, dilation, factors = tuple(padding), tuple(dilation), tuple(factors)

    def separate(x: Tensor, weight: Tensor, bias: Tensor | None, small: Tensor) -> Tensor:
        y = conv_nd(x, weight, bias, stride, padding, dilation, groups)
        if all(n == f * m for n, f, m in zip(y.shape[2:], factors, small.shape[2:])):
            _octave.broadcast_upsampled_(y, small, factors, "add")
        else:
            y = y.add_(_octave.upsample_to(small, factors, y.shape[2:]))
        return y.relu_()

    def fused(x: Tensor, weight: Tensor, bias: Tensor | None, small: Tensor) -> Tensor:
        out = F.interpolate(small, scale_factor=[float(f) for f in factors], mode="nearest")
        if not _is_channels_last(out):
            out = _octave.to_channels_last(out)
        packed = packed_weight(weight, x.shape, stride, padding, dilation, groups)
        return _PACKED_CONV_ADD(out, x, packed, bias, padding, stride, dilation, groups, "add", 1.0, "relu", [], "")

    if (
        _PACKED_CONV_ADD is None
        or _PACK_WEIGHT is None
        or x.device.type != "cpu"
        or torch.is_grad_enabled()
        or traced_or_compiled()
        or x.dim() not in (4, 5)
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or small.dtype != torch.float32
        or x.is_mkldnn
        or weight.is_mkldnn
        or not _is_channels_last(x)
        or not cacheable(weight)
        or not torch.backends.mkldnn.enabled
        or not _plain_eager()
    ):
        return separate(x, weight, bias, small)
    out_size = [n + 2 * p - d * (k - 1) for n, p, d, k in zip(x.shape[2:], padding, dilation, weight.shape[2:])]
    if any(n != f * m for n, f, m in zip(out_size, factors, small.shape[2:])):
        return separate(x, weight, bias, small)
    choice = _forced.get("conv_add_relu")
    if choice is None:
        memo_key = (
            "conv_add_relu", x.shape, x.stride(), weight.shape, weight.stride(), bias is None, small.shape,
            small.stride(), padding, dilation, groups, factors, tuning_enabled(), torch.get_num_threads(),
        )
        choice = _resolved.get(memo_key)
        if choice is None:
            choice, final = _choose(
                ("conv_add_relu", *_signature(x), *_signature(weight), *_signature(small), bias is None, padding,
                 dilation, groups, factors),
                {"fused": fused, "separate": separate},
                (x, weight, bias, small),
                "fused",
                plain=True,
            )
            if final:
                _resolved[memo_key] = choice
    return fused(x, weight, bias, small) if choice == "fused" else separate(x, weight, bias, small)


def conv_kernels(
    x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], groups: int,
    plain: bool | None = None, cache_weights: bool = True,
) -> tuple[str, ...]:
    """The kernels of :data:`KERNELS` that can compute this CPU convolution (``"default"`` first).

    ``plain`` says whether execution is plain eager (see the module docstring); by default it
    is checked here. The direct oneDNN calls need it; the frames and matmul kernels do not.
    ``cache_weights`` allows the packed-weight kernel (see :func:`conv_nd`).
    """
    if plain is None:
        plain = _plain_eager()
    kernels = ["default"]
    dims = x.dim() - 2
    onednn = (
        plain
        and dims in (2, 3)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not x.is_mkldnn
        and _ONEDNN_AVAILABLE
        and torch.backends.mkldnn.enabled
    )
    if onednn and x.shape[0] == 1:
        # Batches above 1 already get oneDNN from PyTorch; at batch 1 its rule may pick im2col.
        kernels.append("onednn")
    if onednn and not _is_channels_last(x) and x.numel() <= _CHANNELS_LAST_MAX_NUMEL:
        kernels.append("onednn_channels_last")
    if (
        onednn
        and _PACKED_CONV is not None
        and _PACK_WEIGHT is not None
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not weight.is_mkldnn
        and cache_weights
    ):
        kernels.append("onednn_packed")
    if (
        dims == 3
        and x.dtype == torch.float32
        and weight.shape[2] == 1
        and stride[0] == 1
        and padding[0] == 0
    ):
        kernels.append("frames")
    if (
        dims in (2, 3)
        and groups == 1
        and all(k == 1 for k in weight.shape[2:])
        and all(s == 1 for s in stride)
        and all(p == 0 for p in padding)
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and not x.is_mkldnn
        and not weight.is_mkldnn
        and _is_channels_last(x)
    ):
        kernels.append("matmul")
    return tuple(kernels)


def rule_kernel(x: Tensor, weight: Tensor, kernels: Sequence[str]) -> str:
    """The deterministic choice among the applicable ``kernels`` (used when not autotuning).

    - ``"frames"`` under autograd for ``1 x k x k`` kernels: oneDNN's 3D backward is slow on
      the half-width octave paths. In a ``torch.profiler`` run of an Oct-I3D-R50 training step
      a 32-channel 1x3x3 layer at 8x56x56 took about 77 ms of backward, three times the
      64-channel vanilla layer with four times the work; the same layer as a 2D convolution
      over the frames takes PyTorch's 2D kernels (the step runs about 10% faster).
    - ``"onednn_packed"`` without autograd in eval mode (where it is offered) on channels_last
      maps: the same oneDNN convolution without the per-call reorder of the weight into
      oneDNN's blocked layout, so never slower there. On an AVX2 machine (AMD EPYC, Zen 3) an
      Oct-ResNet-50 at batch 1 with autotuning off took 72 ms instead of 95 ms, with autotuning
      on 0.85-0.90x of torchvision instead of 0.92-0.94x (docs/speed.md). Channels-first maps
      are left to timing: the packed kernel's output is channels_last and converting it back can
      cost more than the reorder saves.
    - ``"onednn"`` for batch-1 3D non-pointwise kernels, which PyTorch's rule sends to its
      im2col kernel (``slow_conv3d``), 1.4x-3.3x slower there (docs/benchmarks/cpu_ops.md),
      and for batch-1 channels_last maps, where the im2col kernel also returns a
      channels-first result that must be copied back (Oct-ResNet-50 batch 1 with autotuning
      off: 38.4 -> 32.2 ms).
    - ``"default"`` otherwise.
    """
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if "frames" in kernels and grad and any(k > 1 for k in weight.shape[3:]):
        return "frames"
    if "onednn_packed" in kernels and _is_channels_last(x):
        return "onednn_packed"
    if "onednn" in kernels and (
        (x.dim() == 5 and any(k > 1 for k in weight.shape[2:])) or _is_channels_last(x)
    ):
        return "onednn"
    return "default"


def avg_pool_nd(x: Tensor, factors: tuple[int, ...]) -> Tensor:
    """Average pooling of a CPU map with kernel = stride = ``factors`` (``ceil_mode``, a partial
    border window averaging what it covers), through the kernel chosen for this setting; the
    same values up to rounding, output in the input's memory format.

    For calls that no backward pass follows (``oct3d.nn.octave.avg_pool`` routes them here).
    With autotuning on, the first call of each setting (shape, strides, dtype, window, thread
    count) times the applicable :data:`POOL_KERNELS`; otherwise, and where timing is not safe,
    the rule decides: the pairwise adds for exact power-of-two windows except on channels_last
    2D maps, else ``F.avg_poolNd`` (see ``oct3d.nn.octave._pool_by_pairs_is_faster``).
    """
    plain = _plain_eager()
    memo_key = None
    if not _forced and x.layout == torch.strided:
        memo_key = (x.shape, x.stride(), x.dtype, factors, plain, tuning_enabled(), torch.get_num_threads())
        hit = _resolved_pools.get(memo_key)
        if hit is not None:
            return run_pool(hit, x, factors)
    kernels = pool_kernels(x, factors, plain)
    rule = "pairs" if "pairs" in kernels and _octave._pool_by_pairs_is_faster(x, factors) else "avg_pool"
    final = True
    forced = _forced.get("pool")
    if forced is not None:
        kernel = forced if forced in kernels else rule
    elif len(kernels) == 1:
        kernel = kernels[0]
    else:
        kernel, final = _choose(
            ("pool", *_signature(x), factors),
            {k: (lambda t, k=k: run_pool(k, t, factors)) for k in kernels},
            (x,),
            rule,
            plain=plain,
        )
    if memo_key is not None and final:
        _resolved_pools[memo_key] = kernel
    return run_pool(kernel, x, factors)


def pool_kernels(x: Tensor, factors: tuple[int, ...], plain: bool | None = None) -> tuple[str, ...]:
    """The kernels of :data:`POOL_KERNELS` that can pool this CPU map (``"avg_pool"`` first).

    The pairwise adds and the depthwise convolution need exact windows (every size divisible
    by its factor), the pairs power-of-two factors; the depthwise convolution needs plain eager
    execution (``plain``, checked here by default), float32 and a 2D or 3D map.
    """
    exact = x.dim() == len(factors) + 2 and all(n % f == 0 for f, n in zip(factors, x.shape[2:]))
    kernels = ["avg_pool"]
    if exact and x.dtype in (torch.float32, torch.float64) and not any(f & (f - 1) for f in factors):
        kernels.append("pairs")
    if plain is None:
        plain = _plain_eager()
    if (
        exact
        and plain
        and len(factors) in (2, 3)
        and x.dtype == torch.float32
        and not x.is_mkldnn
        and x.numel() > 0
        and _ONEDNN_AVAILABLE
        and torch.backends.mkldnn.enabled
    ):
        kernels.append("onednn_depthwise")
    return tuple(kernels)


def run_pool(kernel: str, x: Tensor, factors: tuple[int, ...]) -> Tensor:
    """Pool ``x`` with ``kernel`` (one of :data:`POOL_KERNELS`, applicable to it: see
    :func:`pool_kernels`); the output has the input's memory format."""
    if kernel == "avg_pool":
        return _octave.pool_by_torch(x, factors)
    if kernel == "pairs":
        return _octave._sum_halves(x, factors)
    if kernel == "onednn_depthwise":
        channels = x.shape[1]
        key = (channels, factors, x.dtype)
        weight = _pool_weights.get(key)
        if weight is None:
            # A normal tensor even under inference_mode, so that it can serve every later call.
            with torch.inference_mode(False):
                weight = torch.full((channels, 1, *factors), 1.0 / math.prod(factors), dtype=x.dtype,
                                    device=x.device)
            _pool_weights[key] = weight
        zeros, ones = (0,) * len(factors), (1,) * len(factors)
        y = torch.mkldnn_convolution(x, weight, None, zeros, factors, ones, channels)
        layout = _CHANNELS_LAST[x.dim()] if _is_channels_last(x) else torch.contiguous_format
        return y if y.is_contiguous(memory_format=layout) else y.contiguous(memory_format=layout)
    raise ValueError(f"kernel must be one of {POOL_KERNELS}, got {kernel!r}")


def run_conv(
    kernel: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...], groups: int, layout: torch.memory_format | None = None,
) -> Tensor:
    """Run one convolution with ``kernel`` (one of :data:`KERNELS`, applicable to it: see
    :func:`conv_kernels`).

    Whatever the kernel, the output has the memory format :func:`conv_output_format` names,
    so a timing-based choice never changes a layout downstream. That is the format
    ``F.convNd`` gives, except where PyTorch's im2col fallback returns a channels_last input's
    result channels-first (batch 1, small maps); there it is converted back.
    """
    if layout is None:
        layout = conv_output_format(x, weight)
    if kernel == "default":
        y = _CONV_FN[x.dim()](x, weight, bias, stride, padding, dilation, groups)
        return y if y.is_contiguous(memory_format=layout) else y.contiguous(memory_format=layout)
    if kernel == "onednn":
        y = torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
        return y.contiguous(memory_format=layout)
    if kernel == "onednn_channels_last":
        last = _CHANNELS_LAST[x.dim()]
        y = torch.mkldnn_convolution(
            x.contiguous(memory_format=last), weight.contiguous(memory_format=last), bias, padding, stride,
            dilation, groups,
        )
        return y.contiguous(memory_format=layout)
    if kernel == "frames":
        return _conv_over_frames(x, weight, bias, padding[1:], dilation[1:], groups, stride[1:])
    if kernel == "matmul":
        # (N, *spatial, C) is a dense view of a channels_last map: one matrix product over its rows.
        y = F.linear(x.movedim(1, -1), weight.flatten(1), bias).movedim(-1, 1)
        return y if y.is_contiguous(memory_format=layout) else y.contiguous(memory_format=layout)
    if kernel == "onednn_packed":
        packed = packed_weight(weight, x.shape, stride, padding, dilation, groups)
        y = _PACKED_CONV(x, packed, bias, padding, stride, dilation, groups, "none", [], "")
        return y.contiguous(memory_format=layout)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def packed_weight(
    weight: Tensor, input_shape: Sequence[int], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...], groups: int,
) -> Tensor:
    """``weight`` reordered into oneDNN's blocked layout for inputs of ``input_shape``, cached.

    The cache entry is checked against the weight's version counter (bumped by every in-place
    update: optimizer steps, ``load_state_dict``, ``fuse``) and storage pointer, so a changed
    weight is repacked, never served stale. It holds an opaque oneDNN copy of the weight
    (as much memory again as the weight) and dies with the weight. An inference tensor (made
    under ``torch.inference_mode``) has no version counter and is packed afresh on every call.
    """
    key = (tuple(input_shape), stride, padding, dilation, groups)
    entries = _packed.get(weight)
    if entries is not None:
        # A hit first (a batch-1 forward pass makes a hundred of these calls): only a weight that was
        # cacheable has entries, and moving it into shared memory changes its storage pointer.
        hit = entries.get(key)
        if hit is not None and hit[0] == weight._version and hit[1] == weight.data_ptr():
            return hit[2]
    if not cacheable(weight):
        # No version counter to check a cached copy against, or one that misses writes: pack for this call only.
        _packed.pop(weight, None)
        with torch.no_grad():
            return _PACK_WEIGHT(weight, list(padding), list(stride), list(dilation), groups, list(input_shape))
    stamp = (weight._version, weight.data_ptr())
    if entries is None:
        entries = _packed[weight] = {}
    with torch.no_grad():
        packed = _PACK_WEIGHT(weight.detach(), list(padding), list(stride), list(dilation), groups, list(input_shape))
    entries.pop(key, None)
    entries[key] = (*stamp, packed)
    while len(entries) > PACKED_PER_WEIGHT:
        entries.pop(next(iter(entries)))
    return packed


class _WeakIdCache:
    """A mapping from tensors (by identity) to values that dies with each tensor.

    ``torch.utils.weak.WeakIdKeyDictionary`` builds a key object on every lookup; this looks up
    ``id(tensor)`` and checks a weak reference, which a batch-1 forward pass's hundred lookups
    notice.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, object]] = {}

    def _item(self, key: Tensor) -> tuple[weakref.ref, object] | None:
        # The entry of this very tensor: an id reused by another tensor after the first died holds none.
        item = self._items.get(id(key))
        return item if item is not None and item[0]() is key else None

    def get(self, key: Tensor, default: object = None) -> object:
        item = self._item(key)
        return default if item is None else item[1]

    def __getitem__(self, key: Tensor) -> object:
        item = self._item(key)
        if item is None:
            raise KeyError(key)
        return item[1]

    def __setitem__(self, key: Tensor, value: object) -> None:
        items, ident = self._items, id(key)

        def drop(ref: weakref.ref) -> None:  # the tensor died: forget its entry, unless the id was reused
            item = items.get(ident)
            if item is not None and item[0] is ref:
                del items[ident]

        items[ident] = (weakref.ref(key, drop), value)

    def pop(self, key: Tensor, default: object = None) -> object:
        item = self._item(key)
        if item is None:
            return default
        del self._items[id(key)]
        return item[1]

    def items(self) -> list[tuple[Tensor, object]]:
        return [(ref(), value) for ref, value in list(self._items.values()) if ref() is not None]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self.items())


_packed = _WeakIdCache()


def cacheable(weight: Tensor) -> bool:
    """Whether a copy derived from ``weight`` may be cached and checked against its version counter.

    Not for an inference tensor (it has no version counter) nor for a tensor in shared memory
    (``share_memory_()``, Hogwild training, ``ddp_spawn``): another process writes it without
    bumping this process's counter.
    """
    # (Tensor.is_shared() is True for every CUDA tensor: only CPU shared memory is written by other processes.)
    return not weight.is_inference() and not (weight.device.type == "cpu" and weight.is_shared())


def choose(
    key: tuple, options: dict[str, Callable[..., object]], args: Sequence[Tensor | None], fallback: str,
    plain: bool | None = None,
) -> str:
    """Name of the fastest of ``options`` (equivalent callables of ``*args``) for ``key``.

    With :data:`autotune` off this is ``fallback`` (cached choices are not consulted). The
    answer is cached per process under ``key`` extended by the grad mode, whether the
    tensors in ``args`` need gradients and the thread count. On a cache miss, when
    :data:`autotune` is on and timing is safe (plain eager, no saved-tensor hooks such as
    activation checkpointing's), every option runs once untimed, then :data:`TUNE_REPS` times,
    interleaved, on detached copies of ``args``; under autograd each timed call includes the
    backward pass to the tensors that need gradients. The fastest wins if it beats
    ``fallback`` by :data:`TUNE_MARGIN`; an option that raises is dropped. Otherwise
    ``fallback`` is returned (and not cached, so a later call may still tune).
    """
    return _choose(key, options, args, fallback, plain)[0]


def _choose(
    key: tuple, options: dict[str, Callable[..., object]], args: Sequence[Tensor | None], fallback: str,
    plain: bool | None = None,
) -> tuple[str, bool]:
    """:func:`choose`, and whether the answer is final for this setting (tuned and cached, or
    autotuning off) rather than a fallback that a later call may still replace by tuning."""
    if not tuning_enabled():
        return fallback, True
    if traced_or_compiled():
        return fallback, False
    grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args)
    full_key = (*key, grad, tuple(a is not None and a.requires_grad for a in args), torch.get_num_threads())
    cached = _cache.get(full_key)
    if cached is not None and cached in options:
        # (An option tuned in plain eager mode may not be offered here: under forward AD, vmap or
        # autocast the direct oneDNN calls are left out.)
        return cached, True
    if plain is None:
        plain = _plain_eager()
    if len(options) < 2:
        return fallback, True
    if not plain or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return fallback, False
    choice = _time_options(options, args, grad, fallback)
    _cache[full_key] = choice
    return choice, True


@contextlib.contextmanager
def force(conv: str | None = None, pool: str | None = None, **plans: str) -> Iterator[None]:
    """Force kernel choices inside the block, bypassing timing and the cache (for tests and A/B runs).

    ``conv`` names a kernel of :data:`KERNELS`: every convolution that it can compute uses it,
    the others take the rule's choice; ``pool`` likewise names one of :data:`POOL_KERNELS` for
    the pools without autograd. ``plans`` force the option of a layer-level choice by its
    family, e.g. ``force(low="split")`` (see ``OctConv._sum_of_convs``).
    """
    if conv is not None and conv not in KERNELS:
        raise ValueError(f"conv must be one of {KERNELS}, got {conv!r}")
    if pool is not None and pool not in POOL_KERNELS:
        raise ValueError(f"pool must be one of {POOL_KERNELS}, got {pool!r}")
    for family, option in plans.items():
        if family not in LAYER_PLANS or option not in LAYER_PLANS[family]:
            raise ValueError(f"force takes layer plans {LAYER_PLANS}, got {family}={option!r}")
    saved = dict(_forced)
    if conv is not None:
        _forced["conv"] = conv
    if pool is not None:
        _forced["pool"] = pool
    _forced.update(plans)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def forced(family: str) -> str | None:
    """The option :func:`force` set for ``family`` in the current block, if any."""
    return _forced.get(family)


def memo(key: tuple, choice: str | None = None) -> str | None:
    """The choice memoised under ``key`` (``None`` if none), or, with ``choice``, memoise it.

    For callers that resolve a choice through :func:`choose` and want to skip rebuilding its
    key on later identical calls. ``key`` must hold everything the choice depends on (shapes,
    strides, dtype, grad mode, ``requires_grad`` flags, :data:`autotune`, thread count);
    memoise only final answers (see ``_choose``). :func:`clear_cache` forgets them.
    """
    if choice is None:
        return _resolved.get(key)
    _resolved[key] = choice
    return choice


def forget_weights(weights: Iterator[Tensor] | Sequence[Tensor]) -> None:
    """Drop the packed copies of ``weights`` (an in-place update through ``.data`` does not bump
    the version counter the cache checks; ``OctConv`` calls this when its mode switches)."""
    for weight in weights:
        _packed.pop(weight, None)


def layer_cache(layer: torch.nn.Module) -> dict:
    """The weight copies a layer keeps for inference (``OctConv``'s concatenated weights), dropped by
    :func:`clear_cache` and :func:`forget_layer`; the entry dies with the layer."""
    cache = _layer_caches.get(layer)
    if cache is None:
        cache = _layer_caches[layer] = {}
    return cache


def forget_layer(layer: torch.nn.Module) -> None:
    """Drop ``layer``'s :func:`layer_cache` (``OctConv`` calls this when its mode switches)."""
    _layer_caches.pop(layer, None)


def clear_cache() -> None:
    """Forget every tuned choice (the next call of each setting times its options again) and drop
    every cached weight copy: the packed weights and the layers' concatenated weights. Call it after
    changing the weights of a model kept in eval mode through ``.data``, which bumps no version counter."""
    _layer_caches.clear()
    _cache.clear()
    _resolved.clear()
    _resolved_convs.clear()
    _resolved_pools.clear()
    _packed.clear()


def cache_info() -> dict[str, dict[str, int]]:
    """How many tuned settings chose each option, per family (``"conv"``, ``"low"``, ...)."""
    info: dict[str, dict[str, int]] = {}
    for key, choice in _cache.items():
        family = info.setdefault(str(key[0]), {})
        family[choice] = family.get(choice, 0) + 1
    return info


# ----------------------------------------------------------------------------- timing
def _time_options(
    options: dict[str, Callable[..., object]], args: Sequence[Tensor | None], grad: bool, fallback: str,
) -> str:
    detached = [None if a is None else a.detach().requires_grad_(a.requires_grad) for a in args]
    wrt = [a for a in detached if a is not None and a.requires_grad]

    def call(fn: Callable[..., object]) -> None:
        if not grad:
            fn(*detached)
            return
        with torch.enable_grad():
            out = fn(*detached)
            outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, Tensor)]
            torch.autograd.grad(outs, wrt, [torch.ones_like(t) for t in outs], allow_unused=True)

    alive: dict[str, Callable[..., object]] = {}
    warm: dict[str, float] = {}
    for name, fn in options.items():
        start = time.perf_counter()
        try:
            call(fn)  # warm-up (also tunes nested choices)
        except RuntimeError:
            continue
        warm[name] = time.perf_counter() - start
        alive[name] = fn
    if fallback not in alive or len(alive) < 2:
        return fallback
    # Far slower candidates (on large maps a call can take 100 ms) are not worth more calls.
    fastest = min(warm.values())
    alive = {name: fn for name, fn in alive.items() if name == fallback or warm[name] <= TUNE_DROP * fastest}
    best = {name: float("inf") for name in alive}
    names = list(alive)
    with torch.no_grad() if not grad else contextlib.nullcontext():
        for rep in range(TUNE_REPS):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                start = time.perf_counter()
                call(alive[name])
                best[name] = min(best[name], time.perf_counter() - start)
    winner = min(best, key=best.__getitem__)
    return winner if best[winner] < TUNE_MARGIN * best[fallback] else fallback


# ----------------------------------------------------------------------------- helpers
def _signature(t: Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, _is_channels_last(t))


def conv_output_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format ``F.convNd`` gives its output: channels_last(_3d) when the input or the
    weight is laid out that way (a one-channel map counts when its channel stride is 1, as in
    PyTorch's ``suggest_memory_format``), else contiguous."""
    if x.dim() in _CHANNELS_LAST and (_is_channels_last(x) or _is_channels_last(weight)):
        return _CHANNELS_LAST[x.dim()]
    return torch.contiguous_format


def _conv_over_frames(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, ...], dilation: tuple[int, ...], groups: int,
    stride: tuple[int, ...] = (1, 1),
) -> Tensor:
    """A 3D convolution with temporal kernel and stride 1, computed frame by frame as one 2D
    convolution over ``(N*T, C, H, W)`` (``padding``, ``dilation`` and ``stride`` are the
    spatial ones); the output has the memory format ``F.conv3d`` would give it."""
    n, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, w)  # a view for channels_last_3d input
    y = F.conv2d(frames, weight.squeeze(2), bias, stride, padding, dilation, groups)
    y = y.view(n, t, y.shape[1], y.shape[2], y.shape[3]).transpose(1, 2)
    return y.contiguous(memory_format=conv_output_format(x, weight))


# The queries behind _plain_eager live in private modules: resolved once here, and where one
# is missing the answer is "not plain", which only costs the faster kernel.
_FUNCTORCH_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)
_IN_DISPATCH_MODE = getattr(_python_dispatch, "is_in_torch_dispatch_mode", None)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def _plain_eager() -> bool:
    """No CPU autocast, functorch transform, forward-AD level or Python dispatch mode is active.

    ``torch.mkldnn_convolution`` has no autocast rule, forward-mode derivative, functorch
    batching rule, FLOP formula or meta kernel, so only plain eager execution may call it.
    """
    return (
        _FUNCTORCH_TRANSFORMS_ACTIVE is not None
        and _IN_DISPATCH_MODE is not None
        and not _cpu_autocast()
        and not _FUNCTORCH_TRANSFORMS_ACTIVE()
        and getattr(torch.autograd.forward_ad, "_current_level", 0) < 0
        and not _IN_DISPATCH_MODE()
    )
