"""Checkpoints of d-li14/octconv.pytorch (Oct-ResNet-26/50/101/152/200) into oct3d's ``OctResNet``.

d-li14/octconv.pytorch published the only PyTorch ImageNet octave weights (Oct-ResNet-50, -101
and -152 at alpha .5). Its network is oct3d's ``oct_resnet50(alpha=0.5)`` (and siblings)
parameter for parameter; only the module names differ:

==============================================  ==============================================
d-li14/octconv.pytorch                          oct3d
==============================================  ==============================================
``conv1``, ``bn1``, ``fc``                      the same (the vanilla stem and head)
``layerS.B.convK.conv.conv_h2h.weight``         ``layerS.B.convK.h2h.weight`` (``h2l``, ``l2h``, ``l2l``)
``layerS.B.convK.bn_h.*`` / ``bn_l.*``          ``layerS.B.bnK.bn_h.*`` / ``bn_l.*``
``layerS.B.downsample.0.conv.conv_*.weight``    ``layerS.B.downsample.0.*.weight``
``layerS.B.downsample.0.bn_h.*`` / ``bn_l.*``   ``layerS.B.downsample.1.bn_h.*`` / ``bn_l.*``
==============================================  ==============================================

The placement is the same (stem vanilla, ``layer1.0`` opens the octave from the plain stem
map, ``layer4`` vanilla with ``layer4.0.conv1`` and its shortcut closing it), and so are the
low/high channel counts (theirs ``int(alpha * c)`` low channels, ours ``floor(alpha * c)``;
every ResNet width is even). Their forward pools first for *every* strided convolution
(``layer4.0.conv2`` included), which is oct3d's default at ``alpha > 0`` (``pool_first``);
:func:`load_octconv_pytorch` refuses a model built with ``pool_first=False``, which would
compute another function with these weights. Where their code runs (even map sizes at every
pooling, e.g. 224x224), the two networks give the same logits; their pooling drops an odd last
row or column and their upsampling does not crop, so on other sizes theirs fails or differs
while oct3d runs (see ``docs/interop.md``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from oct3d.models.resnet import OctResNet

__all__ = [
    "OctconvPytorchMismatchError",
    "from_octconv_pytorch",
    "load_octconv_pytorch",
    "read_octconv_pytorch",
    "translate_octconv_pytorch",
]

#: Blocks per stage of each architecture in d-li14's ``oct_resnet.py`` (the builder names match ours).
ARCHITECTURES: dict[str, tuple[int, int, int, int]] = {
    "oct_resnet26": (2, 2, 2, 2),
    "oct_resnet50": (3, 4, 6, 3),
    "oct_resnet101": (3, 4, 23, 3),
    "oct_resnet152": (3, 8, 36, 3),
    "oct_resnet200": (3, 24, 36, 3),
}

_PATHS = "h2h|h2l|l2h|l2l"
_RULES = (
    # (their key, our key): a convolution's four paths, and its octave BatchNorm, in a block and its shortcut.
    (re.compile(rf"^(layer\d+\.\d+)\.conv([123])\.conv\.conv_({_PATHS})\.(weight|bias)$"), r"\1.conv\2.\3.\4"),
    (re.compile(r"^(layer\d+\.\d+)\.conv([123])\.bn_([hl])\.(\w+)$"), r"\1.bn\2.bn_\3.\4"),
    (re.compile(rf"^(layer\d+\.\d+)\.downsample\.0\.conv\.conv_({_PATHS})\.(weight|bias)$"), r"\1.downsample.0.\2.\3"),
    (re.compile(r"^(layer\d+\.\d+)\.downsample\.0\.bn_([hl])\.(\w+)$"), r"\1.downsample.1.bn_\2.\3"),
    (re.compile(r"^(conv1\.weight|bn1\.\w+|fc\.weight|fc\.bias)$"), r"\1"),
)
_WRAPPERS = ("state_dict", "model", "model_state", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


class OctconvPytorchMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists missing, unexpected and mis-shaped keys."""


def read_octconv_pytorch(source: str | os.PathLike | Mapping[str, object]) -> dict[str, Tensor]:
    """The plain state dict of a d-li14/octconv.pytorch checkpoint file or object.

    Accepts a path (read with ``torch.load(weights_only=True)`` onto the CPU), a state dict, or a
    training checkpoint that wraps one under ``"state_dict"`` (their ImageNet script's format),
    ``"model"``, ``"model_state"`` or ``"model_state_dict"``. A ``module.`` prefix
    (``DataParallel``) or ``_orig_mod.`` prefix (``torch.compile``) on every key is removed.
    """
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise TypeError(
            f"source must be a checkpoint path or a state dict (a mapping of names to tensors), "
            f"got {type(source).__name__}"
        )
    state: Mapping[str, object] = source
    for key in _WRAPPERS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise TypeError(
            "source holds no state dict: expected a mapping of parameter names to tensors, or one under "
            f"one of the keys {list(_WRAPPERS)}; got keys {sorted(map(str, source))[:8]}"
        )
    state = dict(state)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _their_config(state: Mapping[str, Tensor]) -> tuple[tuple[int, ...], float, int]:
    """(blocks per stage, alpha, classes) of a d-li14 Oct-ResNet state dict, for clear errors and building."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    try:
        high = state["layer1.0.conv2.conv.conv_h2h.weight"].shape[0]
        low = state["layer1.0.conv2.conv.conv_l2l.weight"].shape[0]
        classes = state["fc.weight"].shape[0]
    except KeyError as err:
        raise OctconvPytorchMismatchError(
            f"not a d-li14/octconv.pytorch Oct-ResNet state dict: no key {err.args[0]!r} "
            f"(first keys: {sorted(state)[:6]})"
        ) from None
    return tuple(blocks), low / (low + high), classes


def translate_octconv_pytorch(state: Mapping[str, Tensor], model: OctResNet) -> dict[str, Tensor]:
    """Rename a d-li14 state dict into ``model``'s keys, checking that every key and shape fits.

    Returns the state dict for ``model.load_state_dict(..., strict=True)``. ``num_batches_tracked``
    counters that the checkpoint lacks (PyTorch < 0.4.1) keep the model's values.

    Raises:
        OctconvPytorchMismatchError: naming the architecture difference (blocks per stage, alpha,
            classes) when there is one, and every key of the model left unfilled, every key of the
            checkpoint with no place, and every shape mismatch.
    """
    if not isinstance(model, OctResNet):
        raise TypeError(f"model must be an oct3d OctResNet (e.g. oct_resnet50(alpha=0.5)), got {type(model).__name__}")
    if not model.pool_first:
        raise OctconvPytorchMismatchError(
            "the model was built with pool_first=False: its layer4.0.conv2 is a strided convolution, while "
            "d-li14/octconv.pytorch (like the official code) pools and then convolves at stride 1, so these "
            "weights would compute another function. Build it with pool_first=None (the default) or True"
        )
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        for pattern, replacement in _RULES:
            if pattern.match(key):
                mapped[pattern.sub(replacement, key)] = value
                break
        else:
            unexpected.append(key)
    problems: list[str] = []
    blocks, alpha, classes = _their_config(state)
    if (blocks, (alpha, alpha, alpha, 0.0), classes) != (model.layers, model.alphas, model.fc.out_features):
        problems.append(
            f"the checkpoint is an Oct-ResNet with blocks {list(blocks)}, alpha {alpha:g} (layer4 vanilla) and "
            f"{classes} classes; the model has blocks {list(model.layers)}, alphas {list(model.alphas)} and "
            f"{model.fc.out_features} classes (build it with from_octconv_pytorch, or "
            f"OctResNet({list(blocks)}, alpha={alpha:g}, num_classes={classes}))"
        )
    unexpected += [k for k in mapped if k not in ours]
    missing = [k for k in ours if k not in mapped and not k.endswith("num_batches_tracked")]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}"
        for k, v in mapped.items() if k in ours and v.shape != ours[k].shape
    ]
    if missing:
        problems.append(f"model keys the checkpoint does not fill: {_preview(missing)}")
    if unexpected:
        problems.append(f"checkpoint keys with no place in the model: {_preview(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_preview(shapes, 6)}")
    if problems:
        raise OctconvPytorchMismatchError(
            "cannot load this d-li14/octconv.pytorch checkpoint into the model:\n  - " + "\n  - ".join(problems)
        )
    for key, value in ours.items():
        if key not in mapped:  # a num_batches_tracked counter the checkpoint lacks
            mapped[key] = value
    return {k: v for k, v in mapped.items() if k in ours}


def load_octconv_pytorch(model: OctResNet, source: str | os.PathLike | Mapping[str, object]) -> OctResNet:
    """Fill an oct3d ``OctResNet`` (e.g. ``oct_resnet50(alpha=0.5)``) from a d-li14/octconv.pytorch checkpoint.

    Args:
        model: the oct3d model of the checkpoint's architecture, built with the default
            ``pool_first`` (official strided semantics).
        source: a checkpoint path (loaded with ``weights_only=True``) or a state dict, wrapped or
            not, with or without a ``module.`` prefix (see :func:`read_octconv_pytorch`).

    Returns:
        ``model``, loaded in place; it computes what d-li14's network computes with these weights.
    """
    model.load_state_dict(translate_octconv_pytorch(read_octconv_pytorch(source), model), strict=True)
    return model


def from_octconv_pytorch(source: str | os.PathLike | Mapping[str, object], arch: str | None = None) -> OctResNet:
    """Build the oct3d network of a d-li14/octconv.pytorch checkpoint and load it.

    Args:
        source: a checkpoint path or state dict (see :func:`read_octconv_pytorch`).
        arch: ``"oct_resnet26"``, ``"oct_resnet50"``, ``"oct_resnet101"``, ``"oct_resnet152"`` or
            ``"oct_resnet200"`` (their builder names, which are also oct3d's). ``None`` reads the
            blocks per stage from the keys. Alpha and the class count always come from the shapes.

    Returns:
        an ``OctResNet`` with the checkpoint's weights, in training mode like any fresh model.
    """
    state = read_octconv_pytorch(source)
    blocks, alpha, classes = _their_config(state)
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)} or None, got {arch!r}")
        if ARCHITECTURES[arch] != blocks:
            raise OctconvPytorchMismatchError(
                f"arch={arch!r} has blocks {list(ARCHITECTURES[arch])} per stage, the checkpoint {list(blocks)}"
            )
    if any(b == 0 for b in blocks):
        raise OctconvPytorchMismatchError(f"not a complete Oct-ResNet state dict: blocks per stage {list(blocks)}")
    model = OctResNet(blocks, alpha=round(alpha, 6), num_classes=classes)
    model.load_state_dict(translate_octconv_pytorch(state, model), strict=True)
    return model


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
