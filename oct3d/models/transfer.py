"""Weights from vanilla models into octave models.

:func:`load_vanilla` fills an octave model from a vanilla model of the same architecture:
each octave convolution gets the channel partition of the vanilla weight
(``h2h = W[out_high, in_high]``, ``h2l = W[out_low, in_high]``, ``l2h = W[out_high, in_low]``,
``l2l = W[out_low, in_low]``; high channels first), and each octave BatchNorm the same split of
the vanilla statistics. At ``alpha = 0`` the result computes exactly what the vanilla model
computes. At ``alpha > 0`` it is a *warm start* for fine-tuning, not an equivalent network:
low channels now see pooled inputs and their contributions to the high map are upsampled.

Model families whose module names differ from their vanilla peer's (pytorchvideo's
``blocks.N...`` naming, torchvision's video ResNets) provide a method
``translate_vanilla_state_dict(state_dict) -> state_dict`` that renames the vanilla keys
into the octave model's names; :func:`load_vanilla` calls it when present.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from oct3d.nn import OctBatchNorm, OctConv

__all__ = ["load_vanilla", "partition_conv_weight", "VanillaMismatchError"]

_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class VanillaMismatchError(ValueError):
    """The vanilla weights do not fit the octave model; the message lists the keys."""


def _grouped_to_dense(weight: Tensor, groups: int) -> Tensor:
    out_c, in_per_group = weight.shape[:2]
    dense = weight.new_zeros((out_c, in_per_group * groups, *weight.shape[2:]))
    og = out_c // groups
    for g in range(groups):
        dense[g * og:(g + 1) * og, g * in_per_group:(g + 1) * in_per_group] = weight[g * og:(g + 1) * og]
    return dense


def _dense_to_grouped(dense: Tensor, groups: int) -> Tensor:
    out_c, in_c = dense.shape[:2]
    og, ig = out_c // groups, in_c // groups
    return torch.cat([dense[g * og:(g + 1) * og, g * ig:(g + 1) * ig] for g in range(groups)], dim=0)


def partition_conv_weight(conv: OctConv, weight: Tensor, bias: Tensor | None = None) -> dict[str, Tensor]:
    """Split a vanilla ``ConvNd`` weight (and bias) into the state dict of ``conv``'s paths.

    ``weight`` has the vanilla shape ``(out_channels, in_channels // groups, *kernel_size)``.
    Grouped (non-depthwise) layers at ``alpha > 0`` take the block-diagonal part of each
    partition that their own grouping can hold, which is a warm start only.
    """
    expected = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    if tuple(weight.shape) != expected:
        raise VanillaMismatchError(f"expected a weight of shape {expected}, got {tuple(weight.shape)}")
    oh, ih = conv.out_high, conv.in_high
    out: dict[str, Tensor] = {}
    if conv.is_vanilla:
        out["h2h.weight"] = weight
    elif conv.depthwise:
        out["h2h.weight"] = weight[:oh]
        if conv.l2l is not None:
            out["l2l.weight"] = weight[oh:]
    else:
        dense = weight if conv.groups == 1 else _grouped_to_dense(weight, conv.groups)
        parts = {
            "h2h": dense[:oh, :ih],
            "h2l": dense[oh:, :ih],
            "l2h": dense[:oh, ih:],
            "l2l": dense[oh:, ih:],
        }
        for path, w in parts.items():
            if getattr(conv, path) is not None:
                out[f"{path}.weight"] = w if conv.groups == 1 else _dense_to_grouped(w, conv.groups)
    if bias is not None:
        if conv.h2h.bias is None:
            raise VanillaMismatchError("the vanilla convolution has a bias but the octave one has none")
        out["h2h.bias"] = bias[:oh]
        if conv.out_low:
            low_path = "l2l" if conv.l2l is not None else "h2l"
            out[f"{low_path}.bias"] = bias[oh:]
    return {k: v.detach().clone() for k, v in out.items()}


def _split_batchnorm(bn: OctBatchNorm, source: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    ch = bn.high_channels
    for key in _BN_KEYS:
        full = f"{prefix}{key}"
        if full not in source:
            continue
        value = source[full]
        if value.shape[0] != bn.num_features:
            raise VanillaMismatchError(f"{full}: expected {bn.num_features} channels, got {tuple(value.shape)}")
        out[f"bn_h.{key}"] = value[:ch]
        if bn.bn_l is not None:
            out[f"bn_l.{key}"] = value[ch:]
    counter = f"{prefix}num_batches_tracked"
    if counter in source:
        out["bn_h.num_batches_tracked"] = source[counter]
        if bn.bn_l is not None:
            out["bn_l.num_batches_tracked"] = source[counter]
    return {k: v.detach().clone() for k, v in out.items()}


def _state_dict_of(vanilla: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(vanilla, nn.Module):
        return dict(vanilla.state_dict())
    if isinstance(vanilla, Mapping):
        state = dict(vanilla)
        for key in ("state_dict", "model_state", "model"):
            if key in state and isinstance(state[key], Mapping) and not isinstance(state[key], Tensor):
                state = dict(state[key])
                break
        return state
    raise TypeError(f"vanilla must be an nn.Module or a state dict, got {type(vanilla).__name__}")


def load_vanilla(
    oct_model: nn.Module,
    vanilla: nn.Module | Mapping[str, Tensor],
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Fill ``oct_model`` from a vanilla model (or its state dict) of the matching architecture.

    Args:
        oct_model: an oct3d model (any alpha).
        vanilla: the vanilla peer, e.g. ``torchvision.models.resnet50()`` for
            ``oct_resnet50``, or its ``state_dict()``.
        exclude: module-name prefixes of ``oct_model`` to leave untouched (and vanilla keys
            under the same names to ignore), e.g. ``("fc",)`` when the class count differs.

    Returns:
        ``oct_model``, loaded in place.

    Raises:
        VanillaMismatchError: listing the octave keys that found no vanilla weight, the
            vanilla keys that found no place, and the shape mismatches.
    """
    source = _state_dict_of(vanilla)
    translate = getattr(oct_model, "translate_vanilla_state_dict", None)
    if callable(translate):
        source = translate(source)
    exclude = tuple(p.rstrip(".") + "." for p in exclude)

    def excluded(key: str) -> bool:
        return any(key.startswith(p) for p in exclude)

    target: dict[str, Tensor] = {}
    consumed: set[str] = set()
    problems: list[str] = []
    covered: set[str] = set()  # module prefixes handled as a whole (no recursion below them)

    for name, module in oct_model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(c) for c in covered) or excluded(prefix):
            continue
        if isinstance(module, OctConv):
            covered.add(prefix)
            w_key, b_key = f"{prefix}weight", f"{prefix}bias"
            if w_key not in source:
                problems.append(f"missing vanilla weight {w_key}")
                continue
            try:
                parts = partition_conv_weight(module, source[w_key], source.get(b_key))
            except VanillaMismatchError as err:
                problems.append(f"{w_key}: {err}")
                continue
            consumed.update(k for k in (w_key, b_key) if k in source)
            target.update({prefix + k: v for k, v in parts.items()})
        elif isinstance(module, OctBatchNorm):
            covered.add(prefix)
            try:
                parts = _split_batchnorm(module, source, prefix)
            except VanillaMismatchError as err:
                problems.append(str(err))
                continue
            consumed.update(f"{prefix}{k}" for k in (*_BN_KEYS, "num_batches_tracked"))
            target.update({prefix + k: v for k, v in parts.items()})
        else:
            local = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for key, value in local:
                full = prefix + key
                if full not in source:
                    problems.append(f"missing vanilla weight {full}")
                elif tuple(source[full].shape) != tuple(value.shape):
                    problems.append(f"{full}: expected shape {tuple(value.shape)}, got {tuple(source[full].shape)}")
                else:
                    target[full] = source[full].detach().clone()
                    consumed.add(full)

    unused = sorted(k for k in source if k not in consumed and not excluded(k))
    if unused:
        problems.append(f"vanilla keys with no place in the octave model: {_preview(unused)}")
    expected_keys = {k for k in oct_model.state_dict() if not excluded(k)}
    missing = sorted(expected_keys - set(target))
    if missing and not problems:
        problems.append(f"octave keys left unfilled: {_preview(missing)}")
    if problems:
        raise VanillaMismatchError(
            f"cannot load a vanilla model into {type(oct_model).__name__}: the architectures differ.\n  - "
            + "\n  - ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    oct_model.load_state_dict(target, strict=not exclude)
    return oct_model


def _preview(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
