"""Eval-mode BatchNorm folded into the octave convolution before it, at run time.

In eval mode a BatchNorm is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``, so the convolution
that feeds it can absorb it: each path's weight is scaled by ``s`` per output channel, and the
shift becomes the bias of one path per output branch (the two paths of a branch are summed).
An octave layer has two BatchNorms per layer where a vanilla network has one, and at batch 1
their kernels and module calls cost about a tenth of an Oct-ResNet-50 forward pass on CPU.

The model builders' blocks compute every ``conv -> BatchNorm (-> ReLU)`` through
:func:`conv_norm`. Without autograd, in eval mode, on CPU, for stock modules that no hook
watches, it runs the convolution's fast path once with the folded weights and applies the ReLU
in place; otherwise it calls the three modules as written. The folded weights are cached per
layer and rebuilt when any of their sources changes (checked by identity and version counter:
optimizer steps, ``load_state_dict``, ``oct3d.fuse``); like the packed weights, a change through
``.data`` in eval mode needs :func:`oct3d.nn.kernels.clear_cache`. :func:`oct3d.fuse` folds the
same way once and for all (:func:`fold_into_paths` is shared).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from oct3d.nn import kernels
from oct3d.nn.conv import OctConv, PathParams
from oct3d.nn.layers import OctBatchNorm, OctMap, OctReLU
from oct3d.nn.norm import STOCK_BATCH_NORMS
from oct3d.nn.octave import (
    Octave,
    OctaveInput,
    OctaveOutput,
    _first_proxy,
    _fx_tracing,
    module_hooks,
    traced_or_compiled,
)

__all__ = ["bn_affine", "conv_norm", "enabled", "fold_into_paths"]

#: Fold in eval-mode inference (``OCT3D_FOLD=0`` in the environment or ``oct3d.nn.fold.enabled = False``
#: turns it off, e.g. to compare with a network that calls its modules one by one).
enabled: bool = os.environ.get("OCT3D_FOLD", "1").strip().lower() not in ("0", "false", "no", "off")

_FLOATS = (torch.float32, torch.float64)


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm with running statistics, in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


def fold_into_paths(
    conv: OctConv, high: tuple[Tensor, Tensor], low: tuple[Tensor, Tensor] | None,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Every path's ``(weight, bias)`` of ``conv`` followed by the affine maps ``high`` and ``low``.

    ``high`` and ``low`` are the ``(scale, shift)`` of the high and low output branch
    (:func:`bn_affine`). The high scale goes on ``h2h`` and ``l2h`` and its shift on ``h2h``'s bias;
    the low scale on ``h2l`` and ``l2l`` and its shift on ``l2l``'s bias (on ``h2l``'s in a layer
    without a low input). The results are new tensors in the weights' dtype.
    """
    folded: dict[str, tuple[Tensor, Tensor | None]] = {}
    branches = {"h2h": high, "l2h": high, "h2l": low, "l2l": low}
    bias_path = {"high": "h2h", "low": "l2l" if conv.l2l is not None else "h2l"}
    for name, affine in branches.items():
        path = conv._modules.get(name)
        if path is None:
            continue
        if affine is None:
            raise ValueError(f"{type(conv).__name__} has a low output but no low BatchNorm was given")
        scale, shift = affine
        weight = path.weight
        new_weight = (weight.double() * scale.view((-1,) + (1,) * (weight.dim() - 1))).to(weight.dtype)
        new_bias = None
        if name in bias_path.values():
            old = path.bias.double() if path.bias is not None else torch.zeros_like(shift)
            new_bias = (old * scale + shift).to(weight.dtype)
        elif path.bias is not None:
            new_bias = (path.bias.double() * scale).to(weight.dtype)
        folded[name] = (new_weight, new_bias)
    return folded


def conv_norm(conv: nn.Module, norm: nn.Module, x: OctaveInput, relu: nn.Module | None = None) -> OctaveOutput:
    """``relu(norm(conv(x)))`` (``norm(conv(x))`` without ``relu``), with the BatchNorm folded
    into the convolution in eval-mode CPU inference.

    The folded form applies when autograd is off, ``conv`` is an :class:`~oct3d.nn.OctConv` on
    its fast path and ``norm`` an :class:`~oct3d.nn.OctBatchNorm` (and ``relu`` an
    :class:`~oct3d.nn.OctReLU`, or an ``nn.ReLU`` applied to each branch), all three in eval
    mode, stock and unhooked, the maps float32 or float64 on CPU, nothing traces or compiles,
    and :data:`enabled` is on. The outputs equal the three calls' up to rounding. Anything else
    calls the modules as written; fx tracing records the call as one node.
    """
    if _fx_tracing():
        proxy = _first_proxy((x,))
        if proxy is not None:  # fx records this call as one node, the modules as get_attr arguments
            return proxy.tracer.create_proxy("call_function", conv_norm, (conv, norm, x, relu), {})
    # A graph keeps the BatchNorm (inductor's freezing folds it itself).
    unfolded = torch.is_grad_enabled() or not enabled or traced_or_compiled()
    params = None if unfolded else _folded_params(conv, norm, relu)
    if params is None:
        out = norm(conv(x))
        if relu is None:
            return out
        if isinstance(out, Octave) and not isinstance(relu, OctMap):  # a plain nn.ReLU, once per branch
            return Octave(relu(out.high), None if out.low is None else relu(out.low))
        return relu(out)
    return conv.forward_folded(x, params, relu=relu is not None)


def _folded_params(conv: nn.Module, norm: nn.Module, relu: nn.Module | None) -> PathParams | None:
    """The cached folded weights of ``conv`` and ``norm``, or None where the folded form does not apply."""
    # A batch-1 forward pass asks this about a hundred times: the dicts are read directly
    # (nn.Module.__getattr__ costs more than the checks).
    if (
        conv.training
        or norm.training
        or not isinstance(conv, OctConv)
        or type(conv).forward is not OctConv.forward
        or not isinstance(norm, OctBatchNorm)
        or type(norm).forward is not OctBatchNorm.forward
        or not conv.fast_path
        or module_hooks(conv)
        or module_hooks(norm)
        or (relu is not None and not _plain_relu(relu))
        or norm.high_channels != conv.out_high
        or norm.low_channels != conv.out_low
    ):
        return None
    bns = norm._modules
    parts = (bns["bn_h"],) if bns.get("bn_l") is None else (bns["bn_h"], bns["bn_l"])
    for bn in parts:
        if (type(bn) not in STOCK_BATCH_NORMS or bn.training or bn._buffers.get("running_mean") is None
                or module_hooks(bn)):
            return None
    weight = conv._modules["h2h"]._parameters["weight"]
    if (
        weight.device.type != "cpu"
        or weight.dtype not in _FLOATS
        or not kernels._plain_eager()
        or not conv._paths_are_plain()
    ):
        return None
    cache = kernels.layer_cache(conv)
    cached = cache.get("folded")
    if cached is not None and cached[0] is norm and _still_valid(cached[1], parts):
        return cached[2]
    # Each source as (its dict, its key, the tensor, its version): the check above re-reads the
    # dict, so a swapped parameter or buffer is seen as well as an in-place update.
    sources = [(path._parameters, name, path._parameters[name])
               for path in conv._modules.values() if path is not None for name in ("weight", "bias")]
    sources += [(bn._parameters, name, bn._parameters[name]) for bn in parts for name in ("weight", "bias")]
    sources += [(bn._buffers, name, bn._buffers[name]) for bn in parts for name in ("running_mean", "running_var")]
    if not all(t is None or kernels.cacheable(t) for _, _, t in sources):
        return None  # no trustworthy version counter to check a cached copy against: the unfolded path
    # Built as normal tensors even under inference_mode, so the packed-weight cache can key on them.
    with torch.inference_mode(False), torch.no_grad():
        params = fold_into_paths(conv, bn_affine(parts[0]), bn_affine(parts[1]) if len(parts) == 2 else None)
    # The entry holds the sources themselves, so none can be freed and another tensor take its place.
    checks = ([(d, k, t, None if t is None else t._version) for d, k, t in sources], tuple(bn.eps for bn in parts))
    cache["folded"] = (norm, checks, params)
    return params


def _still_valid(checks: tuple[list, tuple], parts: tuple[nn.Module, ...]) -> bool:
    sources, eps = checks
    for d, key, tensor, version in sources:
        current = d.get(key)
        if current is not tensor or (tensor is not None and tensor._version != version):
            return False
    return all(bn.eps == e for bn, e in zip(parts, eps))


def _plain_relu(relu: nn.Module) -> bool:
    if type(relu) is nn.ReLU:  # (converted networks call one nn.ReLU on each branch)
        return not module_hooks(relu)
    return (
        type(relu) in (OctReLU, OctMap)
        and type(relu.module) is nn.ReLU
        and relu.module_l is None
        and not module_hooks(relu)
        and not module_hooks(relu.module)
    )
