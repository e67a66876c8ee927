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
  ``(N*T, C, H, W)``.

With :data:`autotune` on (the default; ``OCT3D_AUTOTUNE=0`` in the environment or
``oct3d.nn.kernels.autotune = False`` turns it off), the first call of each distinct setting
(shapes, strides, dtype, memory format, whether a backward pass follows, thread count) times
the applicable kernels a few times each, interleaved, forward and (under autograd) backward,
and caches the fastest for the process, as ``torch.backends.cudnn.benchmark`` does. The
same mechanism chooses between equivalent formulations of a whole octave layer (see
:func:`choose`), such as one convolution over concatenated inputs against two convolutions
and an add. Different kernels round differently, so with autotuning two processes may differ
in the last bits; turn it off for bit-for-bit repeatable runs.

With autotuning off, or wherever timing is not safe, a deterministic rule decides
(:func:`rule_kernel`): frames under autograd for ``1 x k x k`` kernels, oneDNN for batch-1 3D
non-pointwise kernels, else PyTorch's default.

Nothing here runs outside plain eager CPU execution: under ``torch.compile``, TorchScript,
tracing, export, autocast, ``torch.func`` transforms, forward AD or a dispatch mode (such as
``FlopCounterMode``) every convolution is ``F.convNd``, except the frames rule, which is made
of ordinary differentiable operators.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils import _python_dispatch

from oct3d.nn.octave import traced_or_compiled

__all__ = [
    "KERNELS",
    "autotune",
    "cache_info",
    "choose",
    "clear_cache",
    "conv_nd",
    "conv_kernels",
    "force",
    "rule_kernel",
    "run_conv",
]

#: Every convolution kernel this module can route to.
KERNELS = ("default", "onednn", "onednn_channels_last", "frames")

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
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# oneDNN's channels_last path pays two layout copies; beyond this many input elements they cost more than they save.
_CHANNELS_LAST_MAX_NUMEL = 1 << 20

_cache: dict[tuple, str] = {}
_forced: dict[str, str] = {}


# ----------------------------------------------------------------------------- public API
def conv_nd(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` through the kernel
    chosen for this setting; same values (up to rounding), output in the input's memory
    format (see :func:`run_conv`)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if x.device.type != "cpu" or traced_or_compiled():
        return _CONV_FN[x.dim()](x, weight, bias, stride, padding, dilation, groups)
    plain = _plain_eager()
    kernels = conv_kernels(x, weight, stride, padding, groups, plain)
    if len(kernels) == 1:
        kernel = kernels[0]
    else:
        forced = _forced.get("conv")
        if forced is not None:
            kernel = forced if forced in kernels else rule_kernel(x, weight, kernels)
        else:
            kernel = choose(
                ("conv", *_signature(x), *_signature(weight), bias is None, stride, padding, dilation, groups),
                {k: (lambda *a, k=k: run_conv(k, *a, stride, padding, dilation, groups)) for k in kernels},
                (x, weight, bias),
                rule_kernel(x, weight, kernels),
                plain=plain,
            )
    return run_conv(kernel, x, weight, bias, stride, padding, dilation, groups)


def conv_kernels(
    x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...], groups: int,
    plain: bool | None = None,
) -> tuple[str, ...]:
    """The kernels of :data:`KERNELS` that can compute this CPU convolution (``"default"`` first).

    ``plain`` says whether execution is plain eager (see the module docstring); by default it
    is checked here. The direct oneDNN calls need it; the frames kernel does not.
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
        dims == 3
        and x.dtype == torch.float32
        and weight.shape[2] == 1
        and stride[0] == 1
        and padding[0] == 0
    ):
        kernels.append("frames")
    return tuple(kernels)


def rule_kernel(x: Tensor, weight: Tensor, kernels: Sequence[str]) -> str:
    """The deterministic choice among the applicable ``kernels`` (used when not autotuning).

    - ``"frames"`` under autograd for ``1 x k x k`` kernels: oneDNN's 3D backward is slow on
      the half-width octave paths. In a ``torch.profiler`` run of an Oct-I3D-R50 training step
      a 32-channel 1x3x3 layer at 8x56x56 took about 77 ms of backward, three times the
      64-channel vanilla layer with four times the work; the same layer as a 2D convolution
      over the frames takes PyTorch's 2D kernels (the step runs about 10% faster).
    - ``"onednn"`` for batch-1 3D non-pointwise kernels, which PyTorch's rule sends to its
      im2col kernel (``slow_conv3d``), 1.4x-3.3x slower there (docs/benchmarks/cpu_ops.md).
    - ``"default"`` otherwise.
    """
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if "frames" in kernels and grad and any(k > 1 for k in weight.shape[3:]):
        return "frames"
    if "onednn" in kernels and x.dim() == 5 and any(k > 1 for k in weight.shape[2:]):
        return "onednn"
    return "default"


def run_conv(
    kernel: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...], groups: int,
) -> Tensor:
    """Run one convolution with ``kernel`` (one of :data:`KERNELS`, applicable to it: see
    :func:`conv_kernels`).

    Whatever the kernel, the output has the memory format :func:`conv_output_format` names,
    so a timing-based choice never changes a layout downstream. That is the format
    ``F.convNd`` gives, except where PyTorch's im2col fallback returns a channels_last input's
    result channels-first (batch 1, small maps); there it is converted back.
    """
    if kernel == "default":
        y = _CONV_FN[x.dim()](x, weight, bias, stride, padding, dilation, groups)
        layout = conv_output_format(x, weight)
        return y if y.is_contiguous(memory_format=layout) else y.contiguous(memory_format=layout)
    if kernel == "onednn":
        y = torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
        return y.contiguous(memory_format=conv_output_format(x, weight))
    if kernel == "onednn_channels_last":
        layout = _CHANNELS_LAST[x.dim()]
        y = torch.mkldnn_convolution(
            x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout), bias, padding, stride,
            dilation, groups,
        )
        return y.contiguous(memory_format=conv_output_format(x, weight))
    if kernel == "frames":
        return _conv_over_frames(x, weight, bias, padding[1:], dilation[1:], groups, stride[1:])
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


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
    if not autotune or traced_or_compiled():
        return fallback
    grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args)
    full_key = (*key, grad, tuple(a is not None and a.requires_grad for a in args), torch.get_num_threads())
    cached = _cache.get(full_key)
    if cached is not None:
        return cached
    if plain is None:
        plain = _plain_eager()
    if (
        len(options) < 2
        or not plain
        or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    ):
        return fallback
    choice = _time_options(options, args, grad, fallback)
    _cache[full_key] = choice
    return choice


@contextlib.contextmanager
def force(conv: str | None = None, **plans: str) -> Iterator[None]:
    """Force kernel choices inside the block, bypassing timing and the cache (for tests and A/B runs).

    ``conv`` names a kernel of :data:`KERNELS`: every convolution that it can compute uses it,
    the others take the rule's choice. ``plans`` force the option of a layer-level choice by
    its family, e.g. ``force(low="split")`` (see ``OctConv._sum_of_convs``).
    """
    if conv is not None and conv not in KERNELS:
        raise ValueError(f"conv must be one of {KERNELS}, got {conv!r}")
    saved = dict(_forced)
    if conv is not None:
        _forced["conv"] = conv
    _forced.update(plans)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def forced(family: str) -> str | None:
    """The option :func:`force` set for ``family`` in the current block, if any."""
    return _forced.get(family)


def clear_cache() -> None:
    """Forget every tuned choice (the next call of each setting times its options again)."""
    _cache.clear()


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


def _is_channels_last(t: Tensor) -> bool:
    layout = _CHANNELS_LAST.get(t.dim())
    return layout is not None and not t.is_contiguous() and t.is_contiguous(memory_format=layout)


def conv_output_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format ``F.convNd`` gives its output: channels_last(_3d) when the input or the
    weight is laid out that way (and not also plainly contiguous), else contiguous."""
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
