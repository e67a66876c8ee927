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

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from oct3d.nn import OctBatchNorm, OctConv
from oct3d.nn.transposed import OctConvTranspose

__all__ = [
    "InflationReport",
    "VanillaMismatchError",
    "inflate",
    "load_vanilla",
    "partition_conv_weight",
    "slice_paths",
    "split_batchnorm",
    "split_channel_state",
]

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


def slice_paths(dense: Tensor, out_high: int, in_high: int) -> dict[str, Tensor]:
    """The four channel blocks of a dense ``(out, in, *kernel)`` weight, high channels first.

    ``h2h = W[:out_high, :in_high]``, ``h2l = W[out_high:, :in_high]``, ``l2h = W[:out_high, in_high:]``,
    ``l2l = W[out_high:, in_high:]`` (docs/semantics.md section 2: the paths partition the vanilla weight). Shared by
    :func:`partition_conv_weight` and the converter's transposed convolutions.
    """
    return {
        "h2h": dense[:out_high, :in_high],
        "h2l": dense[out_high:, :in_high],
        "l2h": dense[:out_high, in_high:],
        "l2l": dense[out_high:, in_high:],
    }


def partition_conv_weight(
    conv: OctConv, weight: Tensor, bias: Tensor | None = None, in_order: Tensor | None = None
) -> dict[str, Tensor]:
    """Split a vanilla ``ConvNd`` weight (and bias) into the state dict of ``conv``'s paths.

    ``weight`` has the vanilla shape ``(out_channels, in_channels // groups, *kernel_size)``.
    Grouped (non-depthwise) layers at ``alpha > 0`` take the block-diagonal part of each
    partition that their own grouping can hold, which is a warm start only.

    ``in_order`` (optional, ``groups == 1`` or depthwise) lists the vanilla input channels in the
    octave input's order (all high channels, then all low ones), for inputs that are not "high
    channels first", such as a channel concatenation of octave maps. A depthwise layer's outputs
    follow the same order.
    """
    expected = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    if tuple(weight.shape) != expected:
        raise VanillaMismatchError(f"expected a weight of shape {expected}, got {tuple(weight.shape)}")
    if in_order is not None:
        if conv.depthwise:
            weight = weight[in_order]
            bias = None if bias is None else bias[in_order]
        elif conv.groups == 1:
            weight = weight[:, in_order]
        else:
            raise VanillaMismatchError("in_order needs groups == 1 or a depthwise convolution")
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
        for path, w in slice_paths(dense, oh, ih).items():
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


def split_channel_state(
    source: Mapping[str, Tensor], prefix: str, keys: Sequence[str], num_features: int, high_channels: int,
    has_low: bool, order: Tensor | None = None,
) -> dict[str, Tensor]:
    """Split per-channel tensors ``source[prefix + key]`` into high (first ``high_channels``) and low parts.

    Returns ``{"h.<key>": ..., "l.<key>": ...}`` (no ``l.`` entries when ``has_low`` is False) for the
    keys present. ``order`` (optional) lists the vanilla channels in octave order first (see
    :func:`partition_conv_weight`). Normalisation statistics and affine parameters of BatchNorm,
    InstanceNorm and GroupNorm are split this way.
    """
    out: dict[str, Tensor] = {}
    for key in keys:
        full = f"{prefix}{key}"
        if full not in source or source[full] is None:
            continue
        value = source[full]
        if value.shape[0] != num_features:
            raise VanillaMismatchError(f"{full}: expected {num_features} channels, got {tuple(value.shape)}")
        if order is not None:
            value = value[order]
        out[f"h.{key}"] = value[:high_channels]
        if has_low:
            out[f"l.{key}"] = value[high_channels:]
    return {k: v.detach().clone() for k, v in out.items()}


def partition_transposed_weight(
    conv: OctConvTranspose, weight: Tensor, bias: Tensor | None = None, in_order: Tensor | None = None
) -> dict[str, Tensor]:
    """Split a vanilla ``ConvTransposeNd`` weight ``(in, out, *kernel)`` (and bias) into ``conv``'s paths.

    The same partition as :func:`partition_conv_weight`, on the transposed layout; ``in_order`` likewise.
    """
    expected = (conv.in_channels, conv.out_channels, *conv.kernel_size)
    if tuple(weight.shape) != expected:
        raise VanillaMismatchError(f"expected a transposed weight of shape {expected}, got {tuple(weight.shape)}")
    dense = weight.detach().transpose(0, 1)  # (out, in, *kernel), the layout slice_paths expects
    if in_order is not None:
        dense = dense[:, in_order]
    out = {
        f"{path}.weight": w.transpose(0, 1)
        for path, w in slice_paths(dense, conv.out_high, conv.in_high).items()
        if getattr(conv, path) is not None
    }
    if bias is not None:
        if conv.h2h.bias is None:
            raise VanillaMismatchError("the vanilla convolution has a bias but the octave one has none")
        out["h2h.bias"] = bias[: conv.out_high]
        if conv.out_low:
            out[("l2l" if conv.l2l is not None else "h2l") + ".bias"] = bias[conv.out_high :]
    return {k: v.detach().clone() for k, v in out.items()}


def split_branch_norm(
    branch: nn.Module, source: Mapping[str, Tensor], prefix: str = "", order: Tensor | None = None
) -> dict[str, Tensor]:
    """The state dict of a per-branch norm (``norm_h``, ``norm_l``: the converter's ``OctBranchNorm``) from
    the vanilla ``GroupNorm``/``InstanceNorm`` state ``source[prefix + key]``; ``order`` as for
    :func:`split_channel_state`."""
    norm_h, norm_l = branch.norm_h, branch.norm_l

    def channels_of(norm: nn.Module) -> int:  # GroupNorm, InstanceNorm, torchvision's FrozenBatchNorm2d
        count = getattr(norm, "num_channels", None) or getattr(norm, "num_features", None)
        return int(count if count is not None else norm.weight.shape[0])

    keys = ("weight", "bias") if isinstance(norm_h, nn.GroupNorm) else _BN_KEYS
    parts = split_channel_state(source, prefix, keys, channels_of(norm_h) + channels_of(norm_l), channels_of(norm_h),
                                True, order)
    out = {("norm_h." if k[0] == "h" else "norm_l.") + k[2:]: v for k, v in parts.items()}
    counter = f"{prefix}num_batches_tracked"
    for name, norm in (("norm_h", norm_h), ("norm_l", norm_l)):
        if "num_batches_tracked" in norm.state_dict():
            # (A vanilla state without the counter, as older checkpoints are, keeps the module's own.)
            out[f"{name}.num_batches_tracked"] = (
                source.get(counter, norm.num_batches_tracked)
            ).detach().clone()
    return out


def _split_batchnorm(
    bn: OctBatchNorm, source: Mapping[str, Tensor], prefix: str, order: Tensor | None = None
) -> dict[str, Tensor]:
    parts = split_channel_state(
        source, prefix, _BN_KEYS, bn.num_features, bn.high_channels, bn.bn_l is not None, order
    )
    out = {("bn_h." if k[0] == "h" else "bn_l.") + k[2:]: v for k, v in parts.items()}
    counter = f"{prefix}num_batches_tracked"
    for name, branch in (("bn_h", bn.bn_h), ("bn_l", bn.bn_l)):
        if branch is not None and branch.num_batches_tracked is not None:
            # (A vanilla state without the counter, as older checkpoints are, keeps the module's own.)
            out[f"{name}.num_batches_tracked"] = (
                source.get(counter, branch.num_batches_tracked)
            ).detach().clone()
    return out


def split_batchnorm(bn: OctBatchNorm, vanilla: nn.Module, order: Tensor | None = None) -> dict[str, Tensor]:
    """The state dict of ``bn`` (an :class:`~oct3d.nn.OctBatchNorm`) from a vanilla ``BatchNormNd``.

    The statistics and affine parameters are split into ``bn_h`` (high channels) and ``bn_l`` (low
    channels), as :func:`load_vanilla` does; ``order`` as for :func:`split_channel_state`.
    """
    return _split_batchnorm(bn, vanilla.state_dict(), "", order)


#: A converted module whose input channels are not "high first, in vanilla order" (after a channel
#: concatenation of octave maps) holds, under this attribute, the vanilla input channels in its octave
#: order (a list of ints), so that :func:`load_vanilla` slices a vanilla weight as the converter did.
CHANNEL_ORDER_ATTR = "vanilla_channel_order"

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def _unwrapped(source: Mapping[str, object]) -> dict[str, object]:
    """The state dict a training checkpoint wraps under one of :data:`WRAPPER_KEYS`, or ``source`` itself."""
    for key in WRAPPER_KEYS:
        if isinstance(source.get(key), Mapping):
            return dict(source[key])
    return dict(source)


def _without_prefix(state: dict[str, object], prefix: str) -> dict[str, object] | None:
    """``state`` with ``prefix`` removed from every key, or None unless every key carries it."""
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return None


def plain_state_dict(source: Mapping[str, object]) -> dict[str, object]:
    """The state dict inside a checkpoint-like mapping, with wrapper prefixes removed.

    A training checkpoint that wraps the state dict under ``"state_dict"`` (Lightning), ``"model_state_dict"``,
    ``"model_state"`` or ``"model"`` is unwrapped, and a ``module.`` (``DataParallel``/DDP) or
    ``_orig_mod.`` (``torch.compile``) prefix on every key is removed.
    """
    state = _unwrapped(source)
    for prefix in WRAPPER_PREFIXES:
        state = _without_prefix(state, prefix) or state
    return state


def _state_dict_of(
    vanilla: nn.Module | Mapping[str, Tensor], expected: set[str],
    translate: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None,
) -> dict[str, Tensor]:
    def translated(state: dict[str, Tensor]) -> dict[str, Tensor]:
        return translate(state) if translate is not None else state

    if isinstance(vanilla, nn.Module):
        return translated(dict(vanilla.state_dict()))
    if not isinstance(vanilla, Mapping):
        raise TypeError(f"vanilla must be an nn.Module or a state dict, got {type(vanilla).__name__}")
    state = _unwrapped(vanilla)
    # A key "fits" when its module is one of the octave model's modules (a vanilla conv's weight fits the
    # OctConv of its name). Of the keys as given and the keys without a wrapper's prefix (DataParallel,
    # torch.compile, a LightningModule's attribute), the reading that fits most wins; as given on a tie, so
    # a model whose own top module is called "module" keeps its keys.
    modules = {k.rsplit(".", i)[0] for k in expected for i in range(1, k.count(".") + 1)}

    def fits(candidate: dict[str, Tensor]) -> int:
        return sum(1 for k in candidate if isinstance(k, str) and (k in expected or k.rsplit(".", 1)[0] in modules))

    heads = {k.split(".", 1)[0] + "." for k in state if isinstance(k, str) and "." in k}
    best = translated(state)
    best_fit = fits(best)
    for prefix in sorted(set(WRAPPER_PREFIXES) | (heads if len(heads) == 1 else set())):
        stripped = _without_prefix(state, prefix)
        if stripped is not None and fits(candidate := translated(stripped)) > best_fit:
            best, best_fit = candidate, fits(candidate)
    return best


def load_vanilla(
    oct_model: nn.Module,
    vanilla: nn.Module | Mapping[str, Tensor],
    exclude: Sequence[str] = (),
) -> nn.Module:
    """Fill ``oct_model`` from a vanilla model (or its state dict) of the matching architecture.

    Args:
        oct_model: an oct3d model (any alpha), or a network :func:`oct3d.octavize` returned (its
            concatenations' channel orders are kept on the converted modules, see :data:`CHANNEL_ORDER_ATTR`).
        vanilla: the vanilla peer, e.g. ``torchvision.models.resnet50()`` for
            ``oct_resnet50``, or its ``state_dict()`` (also wrapped in a training checkpoint, or with a
            ``module.``/``_orig_mod.``/LightningModule attribute prefix: see :func:`plain_state_dict`).
        exclude: module-name prefixes of ``oct_model`` to leave untouched (and vanilla keys
            under the same names to ignore), e.g. ``("fc",)`` when the class count differs.

    Returns:
        ``oct_model``, loaded in place.

    Raises:
        VanillaMismatchError: listing the vanilla keys that found no place, the octave keys that
            found no vanilla weight, and the shape mismatches.
    """
    from oct3d.convert.layers import OctBranchNorm  # (oct3d.convert imports this module)

    exclude = tuple(p.rstrip(".") + "." for p in exclude)

    def excluded(key: str) -> bool:
        return any(key.startswith(p) for p in exclude)

    expected_keys = {k for k in oct_model.state_dict() if not excluded(k)}
    translate = getattr(oct_model, "translate_vanilla_state_dict", None)
    source = _state_dict_of(vanilla, expected_keys, translate if callable(translate) else None)

    target: dict[str, Tensor] = {}
    consumed: set[str] = set()
    problems: list[str] = []
    covered: set[str] = set()  # module prefixes handled as a whole (no recursion below them)

    for name, module in oct_model.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(c) for c in covered) or excluded(prefix):
            continue
        order = getattr(module, CHANNEL_ORDER_ATTR, None)
        order = None if order is None else torch.as_tensor(order, dtype=torch.long)
        if isinstance(module, (OctConv, OctConvTranspose)):
            covered.add(prefix)
            w_key, b_key = f"{prefix}weight", f"{prefix}bias"
            if w_key not in source:
                problems.append(f"missing vanilla weight {w_key}")
                continue
            partition = partition_conv_weight if isinstance(module, OctConv) else partition_transposed_weight
            try:
                parts = partition(module, source[w_key], source.get(b_key), in_order=order)
            except VanillaMismatchError as err:
                problems.append(f"{w_key}: {err}")
                continue
            consumed.update(k for k in (w_key, b_key) if k in source)
            target.update({prefix + k: v for k, v in parts.items()})
        elif isinstance(module, (OctBatchNorm, OctBranchNorm)):
            covered.add(prefix)
            split = _split_batchnorm if isinstance(module, OctBatchNorm) else split_branch_norm
            try:
                parts = split(module, source, prefix, order)
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
                    if key == "num_batches_tracked":  # absent from older checkpoints; load_state_dict allows it
                        target[full] = value.detach().clone()
                    else:
                        problems.append(f"missing vanilla weight {full}")
                elif tuple(source[full].shape) != tuple(value.shape):
                    hint = ""
                    if isinstance(module, nn.Linear) and key in ("weight", "bias"):
                        hint = f" (a classifier for another class count? exclude=({name!r},) keeps this one)"
                    problems.append(
                        f"{full}: expected shape {tuple(value.shape)}, got {tuple(source[full].shape)}{hint}"
                    )
                else:
                    target[full] = source[full].detach().clone()
                    consumed.add(full)

    unused = sorted(k for k in source if k not in consumed and not excluded(k))
    if unused:
        # First: a prefix or renaming shows here, and explains the missing weights listed after it.
        problems.insert(0, f"vanilla keys with no place in the octave model: {_preview(unused)}")
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


# --------------------------------------------------------------------------- 2D -> 3D inflation


@dataclass
class InflationReport:
    """What :func:`inflate` did to the video model.

    Attributes:
        inflated: names of the video model's layers filled from the 2D model.
        classifier_copied: whether every classifier (``nn.Linear``) was copied; False when the
            class counts differ and the classifier was left as it was.
        left_untouched: names of the layers left as they were (a classifier with another class count).
        warm_start: octave layers filled by partitioning a *vanilla* 2D layer (``alpha > 0`` in the
            video model only); the result is a starting point for fine-tuning, not the 2D network.
    """

    inflated: list[str] = field(default_factory=list)
    classifier_copied: bool = True
    left_untouched: list[str] = field(default_factory=list)
    warm_start: list[str] = field(default_factory=list)


def _inflate_kernel(weight: Tensor, frames: int) -> Tensor:
    # I3D: repeat the 2D kernel over time and divide by its length, so a clip of identical
    # frames gives every frame the response of the 2D kernel on that frame.
    return weight.detach().unsqueeze(2).repeat(1, 1, frames, *([1] * (weight.dim() - 2))) / frames


def _conv_geometry(module: nn.Module) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...]]:
    if isinstance(module, OctConv):
        return module.in_channels, module.out_channels, module.groups, module.kernel_size, module.stride
    return module.in_channels, module.out_channels, module.groups, tuple(module.kernel_size), tuple(module.stride)


def _vanilla_conv_source(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` of a vanilla 2D convolution (``nn.Conv2d`` or an OctConv at alpha 0), else None."""
    if isinstance(module, nn.Conv2d):
        return module.weight, module.bias
    if isinstance(module, OctConv) and module.is_vanilla:
        return module.h2h.weight, module.h2h.bias
    return None


def _inflate_conv(name: str, video: nn.Module, source: nn.Module, report: InflationReport) -> str | None:
    if not (isinstance(source, nn.Conv2d) or (isinstance(source, OctConv) and source.dims == 2)):
        return f"{name}: the 2D model has a {type(source).__name__} here, not a 2D convolution"
    v_in, v_out, v_groups, v_kernel, v_stride = _conv_geometry(video)
    s_in, s_out, s_groups, s_kernel, s_stride = _conv_geometry(source)
    if (v_in, v_out, v_groups) != (s_in, s_out, s_groups) or v_kernel[1:] != s_kernel or v_stride[1:] != s_stride:
        return (
            f"{name}: 2D convolution {s_in}->{s_out} (kernel {s_kernel}, stride {s_stride}, groups {s_groups}) "
            f"cannot inflate into {v_in}->{v_out} (kernel {v_kernel}, stride {v_stride}, groups {v_groups})"
        )
    frames = v_kernel[0]
    vanilla = _vanilla_conv_source(source)
    if isinstance(video, nn.Conv3d):
        if vanilla is None:
            return f"{name}: the video layer is vanilla but the 2D layer is octave (alpha {source.alpha_in}->" \
                f"{source.alpha_out}); build both models with the same alpha"
        state = {"weight": _inflate_kernel(vanilla[0], frames)}
        if vanilla[1] is not None:
            state["bias"] = vanilla[1].detach().clone()
        try:
            video.load_state_dict(state)
        except RuntimeError as err:
            return f"{name}: {err}"
        return None
    if vanilla is not None:
        weight, bias = vanilla
        try:
            state = partition_conv_weight(video, _inflate_kernel(weight, frames), bias)
        except VanillaMismatchError as err:
            return f"{name}: {err}"
        if not video.is_vanilla:
            report.warm_start.append(name)
    else:
        if (source.in_high, source.in_low, source.out_high, source.out_low) != (
            video.in_high, video.in_low, video.out_high, video.out_low
        ):
            return (
                f"{name}: the 2D octave layer splits channels as in {source.in_high}+{source.in_low}, out "
                f"{source.out_high}+{source.out_low} (alpha {source.alpha_in}->{source.alpha_out}) but the video "
                f"layer as in {video.in_high}+{video.in_low}, out {video.out_high}+{video.out_low} "
                f"(alpha {video.alpha_in}->{video.alpha_out}); build both models with the same alpha"
            )
        # Path by path: each of h2h, h2l, l2h, l2l is an ordinary 2D kernel.
        state = {
            key: _inflate_kernel(value, frames) if key.endswith("weight") else value.detach().clone()
            for key, value in source.state_dict().items()
        }
    try:
        video.load_state_dict(state)
    except RuntimeError as err:
        return f"{name}: {err}"
    return None


def _inflate_batchnorm(name: str, video: nn.Module, source: nn.Module, report: InflationReport) -> str | None:
    if isinstance(source, nn.BatchNorm2d):
        vanilla: dict[str, Tensor] | None = dict(source.state_dict())
    elif isinstance(source, OctBatchNorm) and source.dims == 2:
        vanilla = dict(source.bn_h.state_dict()) if source.bn_l is None else None
    else:
        return f"{name}: the 2D model has a {type(source).__name__} here, not a 2D BatchNorm"
    video_channels = video.num_features
    source_channels = source.num_features
    if video_channels != source_channels:
        return f"{name}: BatchNorm of {source_channels} channels in the 2D model, {video_channels} in the video model"
    if isinstance(video, nn.BatchNorm3d) or (isinstance(video, OctBatchNorm) and video.bn_l is None):
        if vanilla is None:
            return f"{name}: the video BatchNorm is vanilla but the 2D one is octave (alpha {source.alpha}); " \
                "build both models with the same alpha"
        target = video if isinstance(video, nn.BatchNorm3d) else video.bn_h
        target.load_state_dict({k: v.detach().clone() for k, v in vanilla.items()})
        return None
    if vanilla is not None:
        try:
            video.load_state_dict(_split_batchnorm(video, vanilla, ""))
        except (VanillaMismatchError, RuntimeError) as err:
            return f"{name}: {err}"
        report.warm_start.append(name)
        return None
    if (source.high_channels, source.low_channels) != (video.high_channels, video.low_channels):
        return f"{name}: octave BatchNorm split {source.high_channels}+{source.low_channels} in the 2D model, " \
            f"{video.high_channels}+{video.low_channels} in the video model; build both with the same alpha"
    video.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
    return None


def _inflate_linear(name: str, video: nn.Linear, source: nn.Module, report: InflationReport) -> str | None:
    if not isinstance(source, nn.Linear):
        return f"{name}: the 2D model has a {type(source).__name__} here, not an nn.Linear"
    if source.in_features != video.in_features:
        return (
            f"{name}: nn.Linear with {source.in_features} inputs in the 2D model, "
            f"{video.in_features} in the video model"
        )
    if source.out_features != video.out_features:
        report.classifier_copied = False
        report.left_untouched.append(name)
        return None
    video.load_state_dict({k: v.detach().clone() for k, v in source.state_dict().items()})
    return None


def inflate(oct_video_model: nn.Module, model_2d: nn.Module) -> InflationReport:
    """Fill a video model from a 2D model of the same architecture by I3D-style inflation.

    Every 2D kernel ``(out, in, kh, kw)`` is repeated over the video layer's temporal kernel
    ``kt`` and divided by ``kt`` (Carreira and Zisserman's "boring video" rule), so a clip of
    identical frames gives the 2D model's features on that frame, and the 2D model's logits.
    Exactly so only away from the temporal borders when the temporal kernels are longer than 1
    and the video model pads them with zeros (I3D): a border frame sees fewer than ``kt`` taps.
    C2D has only ``1xkxk`` kernels and is exact everywhere.

    The video model's layers are matched to the 2D model's by module name
    (``conv1``, ``layer1.0.conv2``, ``layer2.0.downsample.0``, ``fc``, ...):

    - an octave 2D model (e.g. ``oct_resnet50``) at the same alpha: every octave path
      (``h2h``, ``h2l``, ``l2h``, ``l2l``) is inflated on its own, BatchNorm branches are copied;
    - a vanilla 2D model (e.g. ``torchvision.models.resnet50()``): each vanilla kernel is
      inflated to the 3D shape, then partitioned into the octave paths
      (:func:`partition_conv_weight`) and the BatchNorm statistics are split; at ``alpha > 0``
      that is a warm start (listed in ``report.warm_start``);
    - the classifier is copied when the class counts match, else left as it was
      (``report.classifier_copied`` is False, and a ``UserWarning`` says so).

    Args:
        oct_video_model: an oct3d video model, e.g. ``oct_i3d_r50(alpha=0.5, num_classes=400)``.
        model_2d: the 2D model whose weights to inflate.

    Returns:
        An :class:`InflationReport`; ``oct_video_model`` is filled in place.

    Raises:
        VanillaMismatchError: (a ``ValueError``) when the architectures differ, listing every
            layer that does not correspond; the video model is then left as it was.
        TypeError: when the arguments are not modules.
    """
    for arg, value in (("oct_video_model", oct_video_model), ("model_2d", model_2d)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got {type(value).__name__}")
    sources = dict(model_2d.named_modules())
    report = InflationReport()
    problems: list[str] = []
    used: set[str] = set()
    covered: list[str] = []
    # Layers are filled as they are matched; a mismatch found later puts every tensor back.
    before = {k: v.detach().clone() for k, v in oct_video_model.state_dict().items()}

    for name, module in oct_video_model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        kind = None
        if (isinstance(module, OctConv) and module.dims == 3) or isinstance(module, nn.Conv3d):
            kind = _inflate_conv
        elif (isinstance(module, OctBatchNorm) and module.dims == 3) or isinstance(module, nn.BatchNorm3d):
            kind = _inflate_batchnorm
        elif isinstance(module, nn.Linear):
            kind = _inflate_linear
        elif isinstance(module, (OctConv, OctBatchNorm, nn.Conv1d, nn.Conv2d)):
            raise TypeError(
                f"oct_video_model must be a 3D (video) model, but {name or 'it'} is a {type(module).__name__} "
                f"with dims {getattr(module, 'dims', 2)}"
            )
        else:
            if any(True for _ in module.parameters(recurse=False)):
                problems.append(f"{name}: {type(module).__name__} has parameters inflate does not know how to fill")
            continue
        covered.append(name)
        if name not in sources:
            problems.append(f"{name}: no layer of this name in the 2D model")
            continue
        used.add(name)
        problem = kind(name, module, sources[name], report)
        if problem is None:
            if name not in report.left_untouched:
                report.inflated.append(name)
        else:
            problems.append(problem)

    for name, module in sources.items():
        has_weights = any(True for _ in module.parameters(recurse=False))
        if has_weights and not any(name == u or name.startswith(u + ".") for u in used):
            problems.append(f"{name}: layer of the 2D model with no counterpart in the video model")
    if problems:
        with torch.no_grad():
            for key, value in oct_video_model.state_dict().items():
                value.copy_(before[key])
        raise VanillaMismatchError(
            f"cannot inflate {type(model_2d).__name__} into {type(oct_video_model).__name__}: the architectures "
            "differ.\n  - " + "\n  - ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    if not report.classifier_copied:
        warnings.warn(
            f"inflate: class counts differ, left the classifier(s) {', '.join(report.left_untouched)} as they were",
            UserWarning,
            stacklevel=2,
        )
    return report
