"""Checkpoints of d-li14/octconv.pytorch into oct3d: Oct-ResNet-26..200 and Oct-MobileNetV1.

d-li14/octconv.pytorch published the only PyTorch ImageNet octave weights: Oct-ResNet-50, -101
and -152 at alpha .5, and Oct-MobileNetV1 (width 1.0, alpha .5). Its networks are oct3d's
``oct_resnet50(alpha=0.5)`` (and siblings) and ``oct_mobilenet_v1(alpha=0.5)`` parameter for
parameter; only the module names differ:

- ResNet stem and head: ``conv1``, ``bn1``, ``fc`` keep their names;
- ``layerS.B.convK.conv.conv_h2h.weight`` -> ``layerS.B.convK.h2h.weight`` (and ``h2l``, ``l2h``, ``l2l``);
- ``layerS.B.convK.bn_h.*`` / ``bn_l.*`` -> ``layerS.B.bnK.bn_h.*`` / ``bn_l.*``;
- ``layerS.B.downsample.0.conv.conv_*`` -> ``layerS.B.downsample.0.*``, and its ``bn_h`` / ``bn_l``
  -> ``layerS.B.downsample.1.bn_h`` / ``bn_l``;
- MobileNetV1 stem ``features.0.0`` / ``features.0.1`` keeps its names; block ``I``'s depthwise
  ``features.I.0.conv.conv_*`` / ``features.I.0.bn_*`` -> ``features.I.conv1.*`` / ``features.I.bn1.*``,
  its pointwise ``features.I.1.*`` -> ``features.I.conv2.*`` / ``features.I.bn2.*``, and ``fc`` ->
  ``classifier.1``.

The placement is the same (ResNet: stem vanilla, ``layer1.0`` opens the octave from the plain
stem map, ``layer4`` vanilla with ``layer4.0.conv1`` and its shortcut closing it; MobileNetV1:
depthwise ratios ``[0] + [a] * 10 + [0] * 2``, pointwise ``[a] * 10 + [0] * 3``), and so are the
low/high channel counts (theirs ``int(alpha * c)`` low channels, ours ``floor(alpha * c)``; every
published width is even). Their forward pools first for *every* strided convolution
(``layer4.0.conv2``, MobileNet's ``features.12`` depthwise, included), which is oct3d's default at
``alpha > 0`` (``pool_first``); :func:`load_octconv_pytorch` refuses a model built with
``pool_first=False``, which would compute another function with these weights. Where their code
runs (even map sizes at every pooling, e.g. 224x224), the two networks give the same logits; their
pooling drops an odd last row or column and their upsampling does not crop, so on other sizes
theirs fails or differs while oct3d runs (see ``docs/interop.md``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from oct3d.models.mobilenet import OctMobileNetV1
from oct3d.models.resnet import OctResNet
from oct3d.models.transfer import WRAPPER_KEYS, plain_state_dict

__all__ = [
    "ARCHITECTURES",
    "OctconvPytorchMismatchError",
    "from_octconv_pytorch",
    "load_octconv_pytorch",
    "read_octconv_pytorch",
    "translate_octconv_pytorch",
]

#: d-li14's builder names (also oct3d's for the ResNets) and the blocks per stage of each ResNet.
ARCHITECTURES: dict[str, tuple[int, int, int, int] | None] = {
    "oct_resnet26": (2, 2, 2, 2),
    "oct_resnet50": (3, 4, 6, 3),
    "oct_resnet101": (3, 4, 23, 3),
    "oct_resnet152": (3, 8, 36, 3),
    "oct_resnet200": (3, 24, 36, 3),
    "oct_mobilenet": None,  # their Oct-MobileNetV1: oct3d's oct_mobilenet_v1
}

_PATHS = "h2h|h2l|l2h|l2l"


class OctconvPytorchMismatchError(ValueError):
    """The checkpoint does not fit the model; the message lists missing, unexpected and mis-shaped keys."""


@dataclass(frozen=True)
class _Family:
    """How one of d-li14's model families maps onto oct3d: key renames, its configuration, our model."""

    name: str
    model_type: type[nn.Module]
    marker: str  # a key only this family's state dicts have
    rules: tuple[tuple[re.Pattern, str], ...]
    describe: Callable[[Mapping[str, Tensor]], dict]  # the checkpoint's configuration
    describe_model: Callable[[nn.Module], dict]  # the same fields for our model
    build: Callable[[dict], nn.Module]


def _blocks_per_stage(state: Mapping[str, Tensor]) -> tuple[int, ...]:
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    return tuple(blocks)


def _ratio(state: Mapping[str, Tensor], high_key: str, low_key: str) -> float:
    high, low = state[high_key].shape[0], state[low_key].shape[0]
    return round(low / (low + high), 6)


def _describe_resnet(state: Mapping[str, Tensor]) -> dict:
    prefix = "layer1.0.conv2.conv.conv_"
    return {
        "blocks per stage": _blocks_per_stage(state),
        "alphas": (_ratio(state, prefix + "h2h.weight", prefix + "l2l.weight"),) * 3 + (0.0,),
        "classes": state["fc.weight"].shape[0],
    }


def _describe_mobilenet(state: Mapping[str, Tensor]) -> dict:
    prefix = "features.2.0.conv.conv_"  # the first octave depthwise convolution
    return {
        "alpha": _ratio(state, prefix + "h2h.weight", prefix + "l2l.weight"),
        "stem width": state["features.0.0.weight"].shape[0],
        "classes": state["fc.weight"].shape[0],
    }


_RESNET = _Family(
    name="Oct-ResNet",
    model_type=OctResNet,
    marker="layer1.0.conv1.conv.conv_h2h.weight",
    rules=(
        (re.compile(rf"^(layer\d+\.\d+)\.conv([123])\.conv\.conv_({_PATHS})\.(weight|bias)$"), r"\1.conv\2.\3.\4"),
        (re.compile(r"^(layer\d+\.\d+)\.conv([123])\.bn_([hl])\.(\w+)$"), r"\1.bn\2.bn_\3.\4"),
        (re.compile(rf"^(layer\d+\.\d+)\.downsample\.0\.conv\.conv_({_PATHS})\.(weight|bias)$"),
         r"\1.downsample.0.\2.\3"),
        (re.compile(r"^(layer\d+\.\d+)\.downsample\.0\.bn_([hl])\.(\w+)$"), r"\1.downsample.1.bn_\2.\3"),
        (re.compile(r"^(conv1\.weight|bn1\.\w+|fc\.weight|fc\.bias)$"), r"\1"),
    ),
    describe=_describe_resnet,
    describe_model=lambda m: {
        "blocks per stage": m.layers, "alphas": m.alphas, "classes": m.fc.out_features,
    },
    build=lambda c: OctResNet(c["blocks per stage"], alpha=c["alphas"][0], num_classes=c["classes"]),
)

_MOBILENET = _Family(
    name="Oct-MobileNetV1",
    model_type=OctMobileNetV1,
    marker="features.0.0.weight",
    rules=(
        (re.compile(rf"^features\.(\d+)\.0\.conv\.conv_({_PATHS})\.(weight|bias)$"), r"features.\1.conv1.\2.\3"),
        (re.compile(r"^features\.(\d+)\.0\.bn_([hl])\.(\w+)$"), r"features.\1.bn1.bn_\2.\3"),
        (re.compile(rf"^features\.(\d+)\.1\.conv\.conv_({_PATHS})\.(weight|bias)$"), r"features.\1.conv2.\2.\3"),
        (re.compile(r"^features\.(\d+)\.1\.bn_([hl])\.(\w+)$"), r"features.\1.bn2.bn_\2.\3"),
        (re.compile(r"^(features\.0\.[01]\.\w+)$"), r"\1"),
        (re.compile(r"^fc\.(weight|bias)$"), r"classifier.1.\1"),
    ),
    describe=_describe_mobilenet,
    describe_model=lambda m: {
        "alpha": m.pw_alphas[0], "stem width": m.features[0][0].out_channels, "classes": m.classifier[1].out_features,
    },
    build=lambda c: OctMobileNetV1(alpha=c["alpha"], num_classes=c["classes"], width_mult=c["stem width"] / 32),
)

_FAMILIES = (_RESNET, _MOBILENET)


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
    state = plain_state_dict(source)
    if not state or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise TypeError(
            "source holds no state dict: expected a mapping of parameter names to tensors, or one under "
            f"one of the keys {list(WRAPPER_KEYS)}; got keys {sorted(map(str, source))[:8]}"
        )
    return state


def _family_of(state: Mapping[str, Tensor]) -> tuple[_Family, dict]:
    """The model family of a d-li14 state dict and its configuration, or a clear error."""
    for family in _FAMILIES:
        if family.marker in state:
            try:
                return family, family.describe(state)
            except KeyError as err:
                raise OctconvPytorchMismatchError(
                    f"an incomplete d-li14/octconv.pytorch {family.name} state dict: no key {err.args[0]!r}"
                ) from None
    raise OctconvPytorchMismatchError(
        "not a d-li14/octconv.pytorch state dict (Oct-ResNet or Oct-MobileNetV1): none of the keys "
        f"{[f.marker for f in _FAMILIES]}; first keys: {sorted(state)[:6]}"
    )


def translate_octconv_pytorch(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a d-li14 state dict into ``model``'s keys, checking that every key and shape fits.

    Args:
        state: a plain d-li14 state dict (see :func:`read_octconv_pytorch` for files and wrappers).
        model: an oct3d ``OctResNet`` (e.g. ``oct_resnet50(alpha=0.5)``) or ``OctMobileNetV1``
            (``oct_mobilenet_v1(alpha=0.5)``), built with the default ``pool_first``.

    Returns:
        the state dict for ``model.load_state_dict(..., strict=True)``. ``num_batches_tracked``
        counters the checkpoint lacks (PyTorch < 0.4.1) keep the model's values.

    Raises:
        OctconvPytorchMismatchError: naming the architecture difference (blocks per stage, alpha,
            widths, classes) when there is one, and every key of the model left unfilled, every key
            of the checkpoint with no place, and every shape mismatch.
    """
    family, config = _family_of(state)
    if not isinstance(model, family.model_type):
        raise TypeError(
            f"the checkpoint is a d-li14 {family.name}; model must be an oct3d {family.model_type.__name__}, "
            f"got {type(model).__name__}"
        )
    if not model.pool_first:
        raise OctconvPytorchMismatchError(
            "the model was built with pool_first=False: its strided ratio-0 convolutions stride, while "
            "d-li14/octconv.pytorch (like the official code) pools and then convolves at stride 1, so these "
            "weights would compute another function. Build it with pool_first=None (the default) or True"
        )
    ours = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state.items():
        for pattern, replacement in family.rules:
            if pattern.match(key):
                mapped[pattern.sub(replacement, key)] = value
                break
        else:
            unexpected.append(key)
    problems: list[str] = []
    have = family.describe_model(model)
    if have != config:
        problems.append(
            f"the checkpoint is a {family.name} with {_settings(config)}; the model has {_settings(have)} "
            "(from_octconv_pytorch builds the checkpoint's architecture)"
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


def load_octconv_pytorch(model: nn.Module, source: str | os.PathLike | Mapping[str, object]) -> nn.Module:
    """Fill an oct3d model from a d-li14/octconv.pytorch checkpoint of the same architecture.

    Args:
        model: ``oct_resnet26/50/101/152/200(alpha=0.5)`` or ``oct_mobilenet_v1(alpha=0.5)``, built
            with the default ``pool_first`` (official strided semantics).
        source: a checkpoint path (loaded with ``weights_only=True``) or a state dict, wrapped or
            not, with or without a ``module.`` prefix (see :func:`read_octconv_pytorch`).

    Returns:
        ``model``, loaded in place; it computes what d-li14's network computes with these weights.
    """
    model.load_state_dict(translate_octconv_pytorch(read_octconv_pytorch(source), model), strict=True)
    return model


def from_octconv_pytorch(source: str | os.PathLike | Mapping[str, object], arch: str | None = None) -> nn.Module:
    """Build the oct3d network of a d-li14/octconv.pytorch checkpoint and load it.

    Args:
        source: a checkpoint path or state dict (see :func:`read_octconv_pytorch`).
        arch: their builder name, to check the checkpoint against: ``"oct_resnet26"``,
            ``"oct_resnet50"``, ``"oct_resnet101"``, ``"oct_resnet152"``, ``"oct_resnet200"`` or
            ``"oct_mobilenet"``. ``None`` reads the architecture from the keys. Alpha, widths and
            the class count always come from the shapes.

    Returns:
        an ``OctResNet`` or ``OctMobileNetV1`` with the checkpoint's weights, in training mode
        like any fresh model (call ``.eval()`` for inference).
    """
    state = read_octconv_pytorch(source)
    family, config = _family_of(state)
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)} or None, got {arch!r}")
        expected = (_MOBILENET, None) if ARCHITECTURES[arch] is None else (_RESNET, ARCHITECTURES[arch])
        actual = (family, config.get("blocks per stage"))
        if expected != actual:
            found = family.name + (f" with blocks {list(actual[1])}" if actual[1] else "")
            raise OctconvPytorchMismatchError(f"arch={arch!r} does not describe the checkpoint, a {found}")
    if family is _RESNET and 0 in config["blocks per stage"]:
        raise OctconvPytorchMismatchError(
            f"not a complete Oct-ResNet state dict: blocks per stage {list(config['blocks per stage'])}"
        )
    model = family.build(config)
    model.load_state_dict(translate_octconv_pytorch(state, model), strict=True)
    return model


def _settings(config: Mapping[str, object]) -> str:
    return ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in config.items())


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")
