"""BatchNorm for the narrow channels_last maps that octave branches make.

An octave branch has a fraction of a layer's channels: 8 per branch in a U-Net's first level at
``base_width=16`` and alpha .5. PyTorch's CPU BatchNorm kernel for channels_last maps vectorises
over the channels, the innermost axis in memory, so with fewer channels than one vector register
holds it runs mostly scalar: on the development machine a training forward and backward of an
8-channel map took 4x as long per element as of a 16-channel one. Here such a map is viewed, without
a copy, as rows of ``k * C`` elements (``k`` consecutive voxels), every per-channel reduction
and scale runs over those wide rows, and the ``k`` partial results fold back to ``C`` channels.
The statistics are two-pass (mean, then centred squares), as accurate as PyTorch's.

:func:`batch_norm` is a drop-in for calling a ``BatchNorm{1,2,3}d`` module on one branch; it takes
PyTorch's own path for every case it does not improve (wide maps, channels-first, GPUs, reduced
precision, hooks, compiled graphs, functorch transforms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oct3d.nn.kernels import _plain_eager
from oct3d.nn.octave import (
    CHANNELS_LAST_FORMATS,
    global_module_hooks,
    is_channels_last,
    module_hooks,
    traced_or_compiled,
)

__all__ = ["batch_norm", "WIDE_ROW"]

#: Elements per wide row (a multiple of every x86 vector width in float32).
WIDE_ROW = 64
_BN_TYPES = (nn.BatchNorm2d, nn.BatchNorm3d)
#: Exactly these types compute what ``nn.BatchNorm*d`` does (a subclass or a parametrised module
#: may compute something else): the eval-mode shortcut here and the folding of ``oct3d.nn.fold``.
STOCK_BATCH_NORMS = frozenset((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def batch_norm(bn: nn.Module, x: Tensor) -> Tensor:
    """``bn(x)``, through the wide-row formulation when ``x`` is a narrow channels_last CPU map.

    In eval mode a stock, unhooked BatchNorm with running statistics is applied as
    ``F.batch_norm`` directly, which is what its ``forward`` computes there: an octave network
    has twice a vanilla network's BatchNorm calls, and at batch 1 the module call and its
    Python bookkeeping cost about as much as the kernel on small maps.
    """
    k = _rows_per_wide_row(bn, x)
    if k is not None:
        return _wide_batch_norm(bn, x, k)
    if (
        not bn.training
        and type(bn) in STOCK_BATCH_NORMS
        and bn.running_mean is not None
        and not module_hooks(bn)
        and not global_module_hooks()
    ):
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


def _rows_per_wide_row(bn: nn.Module, x: Tensor) -> int | None:
    # Cheapest tests first: most calls (wide or channels-first maps) leave at the first two.
    if (
        x.dim() not in (4, 5)
        or x.shape[1] >= 16
        or (x.is_contiguous() and x.shape[1] != 1)
        or type(bn) is not _BN_TYPES[x.dim() - 4]
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.float64)
        or module_hooks(bn)
        or global_module_hooks()
        or traced_or_compiled()
        or not is_channels_last(x)
    ):
        return None
    if not _plain_eager():
        return None
    rows = x.numel() // x.shape[1]
    k = max(1, WIDE_ROW // x.shape[1])
    while k > 1 and rows % k:
        k //= 2
    return k if k > 1 else None


def _wide_batch_norm(bn: nn.BatchNorm2d | nn.BatchNorm3d, x: Tensor, k: int) -> Tensor:
    """The semantics of ``nn.BatchNorm*d.forward`` (momentum, cumulative averages, untracked
    statistics, eval mode) with the arithmetic on wide rows."""
    channels = x.shape[1]
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or bn.running_mean is None
    weight = bn.weight if bn.weight is not None else torch.ones(channels, dtype=x.dtype)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels, dtype=x.dtype)
    if not use_batch_stats:
        scale = weight * torch.rsqrt(bn.running_var + bn.eps)
        shift = bias - bn.running_mean * scale
        rows = _wide(x, k)
        return _unwide(torch.addcmul(shift.repeat(k), rows, scale.repeat(k)), x)
    if x.numel() // channels <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    y, mean, var = _WideBatchNormFunction.apply(x, weight, bias, bn.eps, k)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            count = x.numel() // channels
            bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var * (count / (count - 1)), alpha=factor)
    return y


def _wide(x: Tensor, k: int) -> Tensor:
    """A channels_last map ``(N, C, *spatial)`` as its dense ``(rows, k * C)`` matrix (a view)."""
    return x.movedim(1, -1).reshape(-1, k * x.shape[1])


def _unwide(rows: Tensor, like: Tensor) -> Tensor:
    channels = like.shape[1]
    return rows.view(like.shape[0], *like.shape[2:], channels).movedim(-1, 1)


def _fold(per_column: Tensor, k: int, channels: int) -> Tensor:
    return per_column.view(k, channels).sum(0)


class _WideBatchNormFunction(torch.autograd.Function):
    """Training-mode batch normalisation on wide rows; returns ``(y, batch mean, biased variance)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, k: int):
        channels = x.shape[1]
        rows = _wide(x, k)
        count = rows.shape[0] * k
        mean = _fold(rows.sum(0), k, channels) / count
        out = torch.empty_like(x)  # x's strides; returned whole, not as a view (ReLU follows in place)
        centred = torch.sub(rows, mean.repeat(k), out=_wide(out, k))
        var = _fold((centred * centred).sum(0), k, channels) / count
        invstd = torch.rsqrt(var + eps)
        centred.mul_((weight * invstd).repeat(k)).add_(bias.repeat(k))
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.k = k
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A double backward (create_graph=True: gradient penalties): differentiate PyTorch's own
            # formula, whose graph reaches x through the batch statistics too.
            y = torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, ctx.eps)
            wanted = [t for t, needed in zip((x, weight, bias), ctx.needs_input_grad[:3]) if needed]
            grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
            return (*(next(grads) if needed else None for needed in ctx.needs_input_grad[:3]), None, None)
        return _WideBatchNormFunction._first_backward(ctx, grad, x, weight, mean, invstd)

    @staticmethod
    def _first_backward(ctx, grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor):
        k, channels = ctx.k, x.shape[1]
        rows = _wide(x, k)
        if not is_channels_last(grad):
            grad = grad.contiguous(memory_format=CHANNELS_LAST_FORMATS[x.dim()])
        grad_rows = _wide(grad, k)
        count = rows.shape[0] * k
        centred = rows - mean.repeat(k)
        grad_sum = _fold(grad_rows.sum(0), k, channels)
        grad_dot_xhat = _fold((grad_rows * centred).sum(0), k, channels) * invstd
        # dx = w * invstd * (g - mean(g) - xhat * mean(g * xhat)), with xhat = centred * invstd
        a = weight * invstd
        b = -a * invstd * grad_dot_xhat / count
        grad_x = centred.mul_(b.repeat(k)).addcmul_(grad_rows, a.repeat(k)).sub_((a * grad_sum / count).repeat(k))
        grad_weight = grad_dot_xhat if ctx.needs_input_grad[1] else None
        grad_bias = grad_sum if ctx.needs_input_grad[2] else None
        return _unwide(grad_x, x), grad_weight, grad_bias, None, None
