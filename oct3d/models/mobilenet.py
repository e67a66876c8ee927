"""Oct-MobileNet V1 and V2 for ImageNet (2D).

Octave placement follows the official code (``docs/semantics.md`` section 4):

- **V1** (vanilla 3x3 stem, then 13 depthwise-separable blocks): block ``i``'s depthwise
  convolution runs at ``dw[i]`` and its pointwise convolution maps ``dw[i] -> pw[i]`` with
  ``dw = [0] + [alpha] * 10 + [0] * 2`` and ``pw = [alpha] * 10 + [0] * 3``: the first block
  turns the plain stem map into an octave map, the 11th returns to a plain map, the last two
  (1024 channels at 7x7) are vanilla.
- **V2** (17 inverted residual blocks): only the expanded middle of a block is octave
  (expand 1x1 ``0 -> alpha``, depthwise ``alpha -> alpha``, project 1x1 ``alpha -> 0``); block
  inputs, outputs and residual sums stay plain tensors. The official schedule is
  ``[alpha] * 13 + [0] * 4``. One deliberate difference: the first block has expansion 1,
  and torchvision's ``mobilenet_v2`` (unlike the official MXNet code) gives it no expand
  convolution, so there is no layer that could turn its plain input into an octave map;
  that block stays vanilla and blocks 2..13 are octave. It costs 3.6 M multiply-adds of
  depthwise 3x3 at 112x112 that an octave block would have reduced, and keeps the model
  at ``alpha = 0`` identical to torchvision's (module names included, so
  :func:`oct3d.models.load_vanilla` fills it from ``torchvision.models.mobilenet_v2()``).

Channel widths: V1 uses ``int(c * width_mult)`` like the official code (0.75 and 1.0 give
multiples of 8); V2 uses torchvision's rounding to multiples of 8 by default, so
``width_mult=1.125`` matches ``torchvision.models.mobilenet_v2(width_mult=1.125)`` (4.35 M
parameters); ``round_nearest=1`` gives the official/paper 1.125 model (4.24 M).

Cost at 224x224 (multiply-adds, ``torch.utils.flop_counter`` / 2) against the official
README: V1 1.0 at alpha .5: 318 M (official 321 M); V1 0.75 at alpha .375: 211 M (213 M);
V2 1.0 at alpha .375: 248 M (256 M) and V2 1.125 (``round_nearest=1``) at alpha .5: 287 M
(295 M); the V2 gap is the official first block's extra 1x1 expand convolution (about 8-9 M).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from oct3d.models.blocks import init_like_vanilla, resolve_pool_first
from oct3d.models.registry import forwards_kwargs, register_model
from oct3d.nn import OctaveInput, OctaveOutput, OctBatchNorm, OctConv, OctGlobalAvgPool, OctMap
from oct3d.nn.conv import check_alpha, check_positive_int
from oct3d.nn.fold import conv_norm
from oct3d.nn.octave import check_channels_last, in_model_layout, weights_in_model_layout

__all__ = [
    "OctDepthwiseSeparable",
    "OctInvertedResidual",
    "OctMobileNetV1",
    "OctMobileNetV2",
    "oct_mobilenet_v1",
    "oct_mobilenet_v2",
]


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _make_divisible(value: float, divisor: int = 8) -> int:
    # torchvision's rounding: nearest multiple of divisor, never more than 10% below value.
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class OctDepthwiseSeparable(nn.Module):
    """MobileNetV1 block: depthwise 3x3 (``conv1``, ``bn1``) then pointwise 1x1 (``conv2``, ``bn2``), ReLU after each.

    Args:
        in_channels, out_channels: channels of the block's input and output.
        stride: stride of the depthwise convolution (1 or 2).
        alpha_in: ratio of the input and of the depthwise convolution.
        alpha_out: ratio of the pointwise convolution's output.
        pool_first: a strided ratio-0 depthwise conv pools by the stride, then convolves at stride 1
            (:func:`~oct3d.models.blocks.resolve_pool_first`).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, alpha_in: float, alpha_out: float,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = OctConv(
            2, in_channels, in_channels, 3, alpha_in, alpha_in, stride, groups=in_channels, pool_first=pool_first
        )
        self.bn1 = OctBatchNorm(2, in_channels, alpha_in)
        self.conv2 = OctConv(2, in_channels, out_channels, 1, alpha_in, alpha_out)
        self.bn2 = OctBatchNorm(2, out_channels, alpha_out)
        self.relu = OctMap(nn.ReLU(inplace=True))

    def forward(self, x: OctaveInput) -> OctaveOutput:
        """Depthwise then pointwise octave convolution, each followed by BatchNorm and ReLU."""
        x = conv_norm(self.conv1, self.bn1, x, self.relu)
        return conv_norm(self.conv2, self.bn2, x, self.relu)


class OctMobileNetV1(nn.Module):
    """MobileNetV1 with octave depthwise-separable blocks (ratio schedule in the module docstring).

    Modules: ``features`` (``features.0`` the vanilla stem conv/BN/ReLU, ``features.1..13`` the
    :class:`OctDepthwiseSeparable` blocks), ``avgpool`` and ``classifier`` (dropout, linear).

    Args:
        alpha: octave ratio of the octave blocks, in [0, 1).
        num_classes: outputs of the classifier.
        width_mult: channel multiplier (the paper: 1.0 and 0.75).
        dropout: dropout before the classifier (0 in the official recipe).
        pool_first: how the strided ratio-0 depthwise conv (``features.12``) strides; ``None``
            follows the official code (pool first when ``alpha > 0``). See
            :func:`~oct3d.models.blocks.resolve_pool_first`.
        channels_last: run in the channels_last memory format (the input converted once; logits
            are layout-free). ``None`` (default): on CPU inputs only. See
            :func:`~oct3d.nn.octave.in_model_layout`.
    """

    #: (output channels, stride) of the 13 depthwise-separable blocks at width 1.0.
    BLOCKS: Sequence[tuple[int, int]] = (
        (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
    )

    def __init__(
        self, alpha: float = 0.5, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.0,
        pool_first: bool | None = None, channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = check_channels_last(channels_last)
        alpha = check_alpha(alpha, "alpha")
        width_mult = _check_positive("width_mult", width_mult)
        num_classes = check_positive_int(num_classes, "num_classes")
        n = len(self.BLOCKS)
        self.dw_alphas = (0.0,) + (alpha,) * 10 + (0.0,) * (n - 11)
        self.pw_alphas = (alpha,) * 10 + (0.0,) * (n - 10)
        self.pool_first = resolve_pool_first(pool_first, (alpha,))

        in_channels = int(32 * width_mult)
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(3, in_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.ReLU(inplace=True),
            )
        ]
        for (channels, stride), alpha_dw, alpha_pw in zip(self.BLOCKS, self.dw_alphas, self.pw_alphas):
            out_channels = int(channels * width_mult)
            layers.append(
                OctDepthwiseSeparable(in_channels, out_channels, stride, alpha_dw, alpha_pw, self.pool_first)
            )
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = OctGlobalAvgPool()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_channels, num_classes))
        _init_mobilenet(self)
        weights_in_model_layout(self, self.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of an image batch ``(N, 3, H, W)``."""
        _check_image(self, x)
        return self.classifier(self.avgpool(self.features(in_model_layout(x, self.channels_last))))


class OctInvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block with an octave expanded middle; torchvision's layout.

    ``conv`` holds ``[expand (conv, bn, relu6)], depthwise (conv, bn, relu6), project conv,
    project bn``, the expand part only when ``expand_ratio != 1``. The block's input and
    output are plain tensors; the expanded maps are octave at ratio ``alpha``. With ``pool_first``
    a strided ratio-0 depthwise conv pools by the stride, then convolves at stride 1.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand_ratio: int, alpha: float,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        if expand_ratio == 1 and alpha > 0:
            raise ValueError("an inverted residual block without expansion has no octave middle; use alpha=0")
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, 1, 1, 1, 0.0, alpha))
        layers.append(_conv_bn_relu6(hidden, hidden, 3, stride, hidden, alpha, alpha, pool_first))
        layers.append(OctConv(2, hidden, out_channels, 1, alpha, 0.0))
        layers.append(OctBatchNorm(2, out_channels, 0.0))
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        """``x + conv(x)`` when shapes allow (stride 1, same width), else ``conv(x)``."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel: int, stride: int, groups: int, alpha_in: float, alpha_out: float,
    pool_first: bool = False,
) -> nn.Sequential:
    return nn.Sequential(
        OctConv(
            2, in_channels, out_channels, kernel, alpha_in, alpha_out, stride, groups=groups, pool_first=pool_first
        ),
        OctBatchNorm(2, out_channels, alpha_out),
        OctMap(nn.ReLU6(inplace=True)),
    )


class OctMobileNetV2(nn.Module):
    """MobileNetV2 with octave expanded middles; at ``alpha=0`` torchvision's ``mobilenet_v2``.

    Modules mirror torchvision: ``features`` (``features.0`` stem, ``features.1..17`` the
    :class:`OctInvertedResidual` blocks, ``features.18`` the 1x1 conv to ``last_channel``) and
    ``classifier`` (dropout, linear).

    Args:
        alpha: octave ratio of the expanded middles of ``features.2..13``, in [0, 1).
        num_classes: outputs of the classifier.
        width_mult: channel multiplier (the paper: 1.0 and 1.125).
        dropout: dropout before the classifier (torchvision: 0.2).
        round_nearest: round every width to a multiple of this (torchvision's default 8).
            ``round_nearest=1`` gives the official MXNet widths (``int(c * width_mult)``): at
            ``width_mult=1.125`` that is the paper's 4.2 M-parameter model, while the default 8
            is ``torchvision.models.mobilenet_v2(width_mult=1.125)`` with 4.35 M. At
            ``width_mult=1.0`` both are the same model.
        pool_first: how strided ratio-0 depthwise convs (``features.14``) stride; ``None``
            follows the official code (pool first when ``alpha > 0``). See
            :func:`~oct3d.models.blocks.resolve_pool_first`.
        channels_last: run in the channels_last memory format (the input converted once; logits
            are layout-free). ``None`` (default): on CPU inputs only. See
            :func:`~oct3d.nn.octave.in_model_layout`.
    """

    #: torchvision's (expansion t, channels c, repeats n, stride s) per stage.
    SETTING: Sequence[tuple[int, int, int, int]] = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    )
    #: Number of leading blocks with an octave middle in the official schedule ``[a] * 13 + [0] * 4``.
    OCTAVE_BLOCKS = 13

    def __init__(
        self, alpha: float = 0.5, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
        round_nearest: int = 8, pool_first: bool | None = None, channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = check_channels_last(channels_last)
        alpha = check_alpha(alpha, "alpha")
        width_mult = _check_positive("width_mult", width_mult)
        num_classes = check_positive_int(num_classes, "num_classes")
        check_positive_int(round_nearest, "round_nearest")
        self.pool_first = resolve_pool_first(pool_first, (alpha,))
        in_channels = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(3, in_channels, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(in_channels),
                nn.ReLU6(inplace=True),
            )
        ]
        block_alphas = []
        index = 0
        for t, c, n, s in self.SETTING:
            out_channels = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                # No expansion, no octave middle (module docstring); otherwise the official schedule.
                block_alpha = alpha if (index < self.OCTAVE_BLOCKS and t != 1) else 0.0
                layers.append(
                    OctInvertedResidual(in_channels, out_channels, s if i == 0 else 1, t, block_alpha, self.pool_first)
                )
                block_alphas.append(block_alpha)
                in_channels = out_channels
                index += 1
        self.block_alphas = tuple(block_alphas)
        layers.append(
            nn.Sequential(
                nn.Conv2d(in_channels, self.last_channel, 1, bias=False),
                nn.BatchNorm2d(self.last_channel),
                nn.ReLU6(inplace=True),
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = OctGlobalAvgPool()
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        _init_mobilenet(self)
        weights_in_model_layout(self, self.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of an image batch ``(N, 3, H, W)``."""
        _check_image(self, x)
        return self.classifier(self.avgpool(self.features(in_model_layout(x, self.channels_last))))


def _init_mobilenet(model: nn.Module) -> None:
    # torchvision's MobileNet initialisation: Kaiming fan-out convs, N(0, 0.01) classifier.
    init_like_vanilla(model, "fan_out")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def _check_image(model: nn.Module, x: object) -> None:
    if not isinstance(x, torch.fx.Proxy) and (not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{type(model).__name__} expects an image batch of shape (N, 3, H, W), got {shape}")


@register_model(task="image")
@forwards_kwargs(OctMobileNetV1)
def oct_mobilenet_v1(
    alpha: float = 0.5, num_classes: int = 1000, width_mult: float = 1.0, **kwargs
) -> OctMobileNetV1:
    """Oct-MobileNetV1; the official models are ``width_mult=1.0, alpha=0.5`` and ``width_mult=0.75, alpha=0.375``.

    See :class:`OctMobileNetV1`.
    """
    return OctMobileNetV1(alpha=alpha, num_classes=num_classes, width_mult=width_mult, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctMobileNetV2)
def oct_mobilenet_v2(
    alpha: float = 0.5, num_classes: int = 1000, width_mult: float = 1.0, **kwargs
) -> OctMobileNetV2:
    """Oct-MobileNetV2; the official models are ``width_mult=1.0, alpha=0.375`` and ``width_mult=1.125, alpha=0.5``.

    At ``alpha=0`` it is ``torchvision.models.mobilenet_v2(width_mult=width_mult)``. See :class:`OctMobileNetV2`.
    """
    return OctMobileNetV2(alpha=alpha, num_classes=num_classes, width_mult=width_mult, **kwargs)
