"""Oct-DenseNet-121 for ImageNet (2D), torchvision layout.

The paper does not give DenseNet's placement; the one here (``docs/semantics.md`` section 4) is
the official MXNet code's (``facebookresearch/OctConv``, ``utils/gluon/utils/densenet.py``, ``ratio=(a, a, a, 0)``):

- the stem convolution ``conv0`` is the network's first octave layer (``alpha_in = 0``,
  ``alpha_out = alpha``, 7x7, stride 2); ``norm0``, ``relu0`` and the 3x3 max pool
  ``pool0`` act on each branch. Unlike a ResNet, whose first block can take the plain stem
  map, every dense layer *keeps* its input in the concatenation, so a plain stem map would
  stay at full resolution through the whole first block;
- dense blocks 1..3 run at ratio ``alpha``: each dense layer (BN-ReLU-1x1 conv-BN-ReLU-3x3
  conv) produces ``growth_rate`` new channels split by ``alpha``, concatenated *per branch*
  (high with high, low with low);
- transitions 1 and 2 (BN-ReLU-1x1 conv-2x2 average pool) are octave at ``alpha``;
  transition 3 maps ``alpha -> 0``, so dense block 4 (7x7 maps), ``norm5`` and the
  classifier are vanilla.

The channel counts of a concatenation are tracked exactly (the low count of a map is the sum
of its pieces' low counts), so any ``alpha`` whose layers all keep at least one low channel
works. The transition's 2x2 pool floors like torchvision's on the high branch; its low
branch pools with ceiling and is cropped to half the new high size, so odd sizes work.

At ``alpha = 0`` the model is ``torchvision.models.densenet121()``: same module names,
parameters, multiply-adds and outputs, and :func:`oct3d.models.load_vanilla` fills it by
name. At ``alpha > 0`` :meth:`OctDenseNet.translate_vanilla_state_dict` reorders the vanilla
channels of every concatenation (``[piece0, piece1, ...]``, each high-first) into the
octave order (all high pieces, then all low pieces) before the weights are partitioned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oct3d.models.blocks import init_like_vanilla
from oct3d.models.registry import forwards_kwargs, register_model
from oct3d.nn import (
    Octave,
    OctaveInput,
    OctaveOutput,
    OctAvgPool,
    OctBatchNorm,
    OctConv,
    OctMaxPool,
    OctReLU,
    split_channels,
)
from oct3d.nn.conv import check_alpha, check_positive_int
from oct3d.nn.octave import check_channels_last, fx_leaf_forward, in_model_layout, weights_in_model_layout

__all__ = ["OctDenseLayer", "OctDenseBlock", "OctTransition", "OctDenseNet", "oct_densenet121"]

#: A piece of a concatenation: (high channels, low channels).
Piece = tuple[int, int]


def _ratio(pieces: Sequence[Piece]) -> float:
    # The exact low fraction of a concatenation; OctConv/OctBatchNorm recover the integer
    # low count from it (floor(ratio * c + 1e-6) == low).
    total = sum(h + lo for h, lo in pieces)
    return sum(lo for _, lo in pieces) / total


def _branches(x: OctaveInput) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, Octave):
        return x.high, x.low
    if isinstance(x, Tensor):
        return x, None
    raise TypeError(f"expected a torch.Tensor or an Octave, got {type(x).__name__}")


def _pack(high: Tensor, low: Tensor | None) -> OctaveOutput:
    return high if low is None else Octave(high, low)


class OctDenseLayer(nn.Module):
    """DenseNet-BC layer: ``norm1, relu1, conv1`` (1x1 to ``bn_size * growth_rate``), ``norm2, relu2, conv2`` (3x3).

    Args:
        input_pieces: ``(high, low)`` channel counts of the concatenated input's pieces, in order.
        growth_rate: channels this layer adds.
        bn_size: width multiplier of the bottleneck 1x1 convolution.
        alpha: ratio of the bottleneck and of the new channels.
    """

    def __init__(self, input_pieces: Sequence[Piece], growth_rate: int, bn_size: int, alpha: float) -> None:
        super().__init__()
        self.input_pieces = tuple(input_pieces)
        in_channels = sum(h + lo for h, lo in self.input_pieces)
        alpha_in = _ratio(self.input_pieces)
        mid = bn_size * growth_rate
        self.norm1 = OctBatchNorm(2, in_channels, alpha_in)
        self.relu1 = OctReLU(inplace=True)
        self.conv1 = OctConv(2, in_channels, mid, 1, alpha_in, alpha)
        self.norm2 = OctBatchNorm(2, mid, alpha)
        self.relu2 = OctReLU(inplace=True)
        self.conv2 = OctConv(2, mid, growth_rate, 3, alpha, alpha)
        self.output_piece: Piece = (self.conv2.out_high, self.conv2.out_low)

    def forward(self, x: OctaveInput) -> OctaveOutput:
        """The ``growth_rate`` new channels computed from the concatenated input ``x``."""
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class OctDenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers (``denselayer1``...), each fed the per-branch concatenation of all before it."""

    def __init__(
        self, num_layers: int, input_piece: Piece, growth_rate: int, bn_size: int, alpha: float
    ) -> None:
        super().__init__()
        pieces = [input_piece]
        for i in range(num_layers):
            layer = OctDenseLayer(pieces, growth_rate, bn_size, alpha)
            self.add_module(f"denselayer{i + 1}", layer)
            pieces.append(layer.output_piece)
        self.pieces = tuple(pieces)

    @fx_leaf_forward
    def forward(self, x: OctaveInput) -> OctaveOutput:
        """The block input concatenated with every layer's output, high with high and low with low."""
        high, low = _branches(x)
        highs, lows = [high], ([] if low is None else [low])
        for layer in self.values():
            new_high, new_low = _branches(layer(_pack(torch.cat(highs, 1), torch.cat(lows, 1) if lows else None)))
            highs.append(new_high)
            if new_low is not None:
                lows.append(new_low)
        return _pack(torch.cat(highs, 1), torch.cat(lows, 1) if lows else None)


class OctTransition(nn.Sequential):
    """Transition between dense blocks: ``norm, relu, conv`` (1x1, halves the channels), ``pool`` (2x2 average)."""

    def __init__(self, input_pieces: Sequence[Piece], out_channels: int, alpha_out: float) -> None:
        in_channels = sum(h + lo for h, lo in input_pieces)
        alpha_in = _ratio(input_pieces)
        super().__init__(
            OrderedDict(
                norm=OctBatchNorm(2, in_channels, alpha_in),
                relu=OctReLU(inplace=True),
                conv=OctConv(2, in_channels, out_channels, 1, alpha_in, alpha_out),
                pool=OctAvgPool(2, 2, 2),  # floor on high like torchvision; low kept at octave size
            )
        )
        self.input_pieces = tuple(input_pieces)


class OctDenseNet(nn.Module):
    """DenseNet-BC with octave dense blocks 1..3 (placement in the module docstring).

    Args:
        alpha: octave ratio of the stem, dense blocks 1..3 and transitions 1..2, in [0, 1).
        num_classes: outputs of ``classifier``.
        growth_rate, block_config, num_init_features, bn_size: the DenseNet-BC shape
            (DenseNet-121: 32, ``(6, 12, 24, 16)``, 64, 4).
        channels_last: run in the channels_last memory format (the input converted once; logits
            are layout-free). ``None`` (default): on CPU inputs only. See
            :func:`~oct3d.nn.octave.in_model_layout`.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        num_classes: int = 1000,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = check_channels_last(channels_last)
        alpha = check_alpha(alpha, "alpha")
        for name, value in (
            ("num_classes", num_classes), ("growth_rate", growth_rate),
            ("num_init_features", num_init_features), ("bn_size", bn_size),
        ):
            check_positive_int(value, name)
        if len(block_config) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in block_config):
            raise ValueError(f"block_config must be at least two positive ints, got {block_config!r}")
        last = len(block_config) - 1
        # The official ratios: alpha everywhere but the last block.
        self.block_alphas = tuple(alpha if i < last else 0.0 for i in range(len(block_config)))

        features: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=OctConv(2, 3, num_init_features, 7, 0.0, self.block_alphas[0], stride=2),
            norm0=OctBatchNorm(2, num_init_features, self.block_alphas[0]),
            relu0=OctReLU(inplace=True),
            pool0=OctMaxPool(2, 3, 2, 1),
        )
        piece: Piece = split_channels(num_init_features, self.block_alphas[0])
        for i, num_layers in enumerate(block_config):
            block = OctDenseBlock(num_layers, piece, growth_rate, bn_size, self.block_alphas[i])
            features[f"denseblock{i + 1}"] = block
            channels = sum(h + lo for h, lo in block.pieces)
            if i != last:
                transition = OctTransition(block.pieces, channels // 2, self.block_alphas[i + 1])
                features[f"transition{i + 1}"] = transition
                piece = split_channels(channels // 2, self.block_alphas[i + 1])
        features["norm5"] = OctBatchNorm(2, channels, 0.0)
        self.features = nn.Sequential(features)
        self.classifier = nn.Linear(channels, num_classes)

        init_like_vanilla(self, "fan_in")  # torchvision's DenseNet uses kaiming_normal_ with fan_in
        weights_in_model_layout(self, self.channels_last)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of an image batch ``(N, 3, H, W)``."""
        if not isinstance(x, torch.fx.Proxy) and (not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects an image batch of shape (N, 3, H, W), got {shape}")
        out = F.relu(self.features(in_model_layout(x, self.channels_last)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def translate_vanilla_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Reorder a vanilla DenseNet's concatenated channels into this model's octave order.

        A vanilla concatenation is ``[piece0, piece1, ...]`` and :func:`oct3d.models.load_vanilla`
        gives each piece's first ``high`` channels to the high branch; here the
        concatenation is ``[all high parts, all low parts]``. The BatchNorm statistics and
        the input channels of the 1x1 convolution that read a concatenation are permuted to
        match, so each octave weight is the exact slice of the vanilla weight it replaces.
        At ``alpha = 0`` nothing moves.
        """
        out = dict(state_dict)
        for name, module in self.named_modules():
            if not isinstance(module, (OctDenseLayer, OctTransition)):
                continue
            order = _octave_order(module.input_pieces)
            if order is None:
                continue
            norm, conv = ("norm1", "conv1") if isinstance(module, OctDenseLayer) else ("norm", "conv")
            for key in ("weight", "bias", "running_mean", "running_var"):
                full = f"{name}.{norm}.{key}"
                if full in out and out[full].shape[:1] == order.shape:
                    out[full] = out[full][order]
            full = f"{name}.{conv}.weight"
            if full in out and out[full].dim() == 4 and out[full].shape[1] == order.numel():
                out[full] = out[full][:, order]
        return out


def _octave_order(pieces: Sequence[Piece]) -> Tensor | None:
    """Vanilla channel indices listed in octave order, or None when the orders agree."""
    highs: list[int] = []
    lows: list[int] = []
    start = 0
    for h, lo in pieces:
        highs.extend(range(start, start + h))
        lows.extend(range(start + h, start + h + lo))
        start += h + lo
    order = highs + lows
    if order == list(range(start)):
        return None
    return torch.tensor(order, dtype=torch.long)


@register_model(task="image")
@forwards_kwargs(OctDenseNet)
def oct_densenet121(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctDenseNet:
    """Oct-DenseNet-121 (growth 32, blocks ``(6, 12, 24, 16)``); at ``alpha=0`` torchvision's ``densenet121``.

    See :class:`OctDenseNet` and the module docstring for the octave placement.
    """
    return OctDenseNet(alpha=alpha, num_classes=num_classes, **kwargs)
