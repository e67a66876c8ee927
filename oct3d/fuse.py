"""Inference-time BatchNorm folding: ``oct3d.fuse(model)``.

Every BatchNorm whose input is exactly the output of a convolution is folded into that
convolution and replaced by ``nn.Identity``. In eval mode a BatchNorm is the affine map
``y = s * x + t`` per channel, with ``s = gamma / sqrt(running_var + eps)`` and
``t = beta - running_mean * s``, so the preceding convolution absorbs it: its weight is
scaled by ``s`` per output channel and its bias becomes ``s * bias + t``.

For an :class:`~oct3d.nn.OctConv` followed by an :class:`~oct3d.nn.OctBatchNorm`, the
high BatchNorm scales both paths that write the high output (``h2h``, ``l2h``) and puts its
shift on ``h2h``; the low BatchNorm scales ``h2l`` and ``l2l`` and puts its shift on ``l2l``
(on ``h2l`` when the layer has no ``l2l``). The shift goes on one path per output branch
because the two paths of a branch are summed.

Which BatchNorm follows which convolution is found by running the model once on the
``meta`` device (no compute, no memory) and matching tensors: a BatchNorm is paired with a
convolution only when its input *is* that convolution's output object. Names play no part,
so pre-activation layouts (DenseNet's ``norm -> relu -> conv``) are handled correctly: a
BatchNorm that reads anything but a convolution's output is left alone. Modules called
more than once per forward (shared weights) are not folded.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from oct3d.nn import Octave, OctBatchNorm, OctConv
from oct3d.nn.fold import bn_affine, fold_into_paths
from oct3d.profiling import ExampleInput, describe_input, example_args, floating_dtype, fresh_lists

__all__ = ["fuse", "find_conv_bn_pairs"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_DEFAULT_SPATIAL = {1: (1024,), 2: (224, 224), 3: (8, 224, 224)}


def fuse(
    model: nn.Module, example_input: ExampleInput | None = None, inplace: bool = False
) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into it, for inference.

    Args:
        model: any network built from ``nn.ConvNd``/``OctConv`` and ``nn.BatchNormNd``/
            ``OctBatchNorm`` (the oct3d models, torchvision and pytorchvideo models).
        example_input: an input shape, a tensor (or an ``Octave``), or a tuple of the model's positional
            arguments, each a tensor or a list of tensors (``([slow, fast],)`` for SlowFast), used only
            to find the conv -> BatchNorm pairs on the ``meta`` device. By default ``(1, C, 224, 224)``
            for a 2D network, ``(1, C, 8, 224, 224)`` for a 3D one, with ``C`` the first convolution's
            input channels.
        inplace: fold into ``model`` itself instead of a copy.

    Returns:
        A deep copy of ``model`` (``model`` itself with ``inplace=True``) in eval mode, whose
        folded BatchNorms are ``nn.Identity``. Its outputs equal ``model.eval()``'s up to
        rounding. Folding uses the running statistics, so the result is for inference only:
        training it would no longer normalise batches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    modules = dict(fused.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in find_conv_bn_pairs(fused, example_input):
            conv, bn = modules[conv_name], modules[bn_name]
            if isinstance(conv, OctConv):
                _fold_octconv(conv, bn)
            else:
                _fold_into_conv(conv, *bn_affine(bn))
            _replace(fused, bn_name, nn.Identity())
    return fused


def find_conv_bn_pairs(
    model: nn.Module, example_input: ExampleInput | None = None
) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every BatchNorm whose input is exactly a convolution's output.

    Runs a ``meta``-device copy of ``model`` once (see the module docstring). Only
    BatchNorms that can be folded are returned: eval-mode statistics tracked, conv and
    BatchNorm each called once, channel counts matching.
    """
    meta_model = copy.deepcopy(model).to("meta").eval()
    args = _meta_args(meta_model, example_input)
    octave_parts = (OctConv, OctBatchNorm)
    inner = {id(child) for m in meta_model.modules() if isinstance(m, octave_parts) for child in m.children()}
    names = {id(m): name for name, m in meta_model.named_modules()}
    conv_outputs: dict[tuple[int, ...], str] = {}
    kept_alive: list[object] = []  # keeps outputs alive so that their ids stay unique during the pass
    calls: dict[str, int] = {}
    candidates: list[tuple[str, str]] = []

    def conv_hook(module: nn.Module, _inputs: object, output: object) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        kept_alive.append(output)
        conv_outputs[_identity(output)] = name

    def bn_pre_hook(module: nn.Module, inputs: tuple[object, ...]) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        source = conv_outputs.get(_identity(inputs[0])) if inputs else None
        if source is not None:
            candidates.append((source, name))

    handles = []
    for module in meta_model.modules():
        if id(module) in inner:
            continue
        if isinstance(module, (*_CONVS, OctConv)):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, (*_BNS, OctBatchNorm)):
            handles.append(module.register_forward_pre_hook(bn_pre_hook))
    try:
        with torch.no_grad():
            meta_model(*fresh_lists(args))
    except Exception as error:
        raise ValueError(
            f"fuse could not run the model on {describe_input(args)} to find its conv -> BatchNorm "
            f"pairs ({type(error).__name__}: {error}); pass example_input: an input shape, a tensor, or a tuple of "
            "the model's positional arguments that it accepts"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    return [
        (conv, bn) for conv, bn in candidates
        if calls[conv] == 1 and calls[bn] == 1 and _foldable(modules[conv], modules[bn])
    ]


def _identity(value: object) -> tuple[int, ...]:
    if isinstance(value, Octave):
        return (id(value.high), id(value.low))
    return (id(value),)


def _meta_args(model: nn.Module, example_input: ExampleInput | None) -> tuple[Any, ...]:
    # The meta run compares no values, but layers check that inputs have their weights' dtype: floating
    # examples take the model's (a float32 example for a bfloat16 model finds the same pairs).
    dtype = floating_dtype(model) or torch.float32
    if example_input is not None:
        return tuple(_on_meta(value, dtype) for value in example_args(example_input, "meta", dtype))
    for module in model.modules():
        if isinstance(module, _CONVS):
            dims = module.weight.dim() - 2
            return (torch.empty((1, module.in_channels, *_DEFAULT_SPATIAL[dims]), device="meta", dtype=dtype),)
        if isinstance(module, OctConv):
            return (torch.empty((1, module.in_channels, *_DEFAULT_SPATIAL[module.dims]), device="meta", dtype=dtype),)
    raise ValueError("model has no convolution to infer an input shape from; pass example_input")


def _on_meta(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a tensor, an ``Octave``, a list or tuple of tensors) with every tensor an empty ``meta``
    twin, floating ones in ``dtype``."""
    if isinstance(value, Tensor):
        return torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype, device="meta")
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # Octave and other NamedTuples
        return type(value)(*(None if t is None else _on_meta(t, dtype) for t in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_on_meta(t, dtype) for t in value)
    return value


def _bn_parts(bn: nn.Module) -> list[nn.Module]:
    if isinstance(bn, OctBatchNorm):
        return [bn.bn_h] if bn.bn_l is None else [bn.bn_h, bn.bn_l]
    return [bn]


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    parts = _bn_parts(bn)
    if any(not p.track_running_stats or p.running_mean is None for p in parts):
        return False  # normalises with batch statistics even in eval mode
    if isinstance(conv, OctConv):
        if conv.is_vanilla or conv.out_low == 0:
            return len(parts) == 1 and parts[0].num_features == conv.out_high
        return len(parts) == 2 and (parts[0].num_features, parts[1].num_features) == (conv.out_high, conv.out_low)
    return len(parts) == 1 and parts[0].num_features == conv.out_channels


def _fold_into_conv(conv: nn.Module, scale: Tensor, shift: Tensor) -> None:
    """``weight <- scale * weight`` per output channel, ``bias <- scale * bias + shift`` (created if absent)."""
    weight = conv.weight
    weight.copy_((weight.double() * scale.view((-1,) + (1,) * (weight.dim() - 1))).to(weight.dtype))
    old = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    conv.bias = nn.Parameter((old * scale + shift).to(dtype=weight.dtype, device=weight.device))


def _fold_octconv(conv: OctConv, bn: nn.Module) -> None:
    parts = _bn_parts(bn)
    folded = fold_into_paths(conv, bn_affine(parts[0]), bn_affine(parts[1]) if len(parts) == 2 else None)
    for name, (weight, bias) in folded.items():
        path = conv._modules[name]
        path.weight.copy_(weight)
        if bias is not None:
            if path.bias is None:
                path.bias = nn.Parameter(bias)
            else:
                path.bias.copy_(bias)


def _replace(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
