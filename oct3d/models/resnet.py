"""Oct-ResNet, Oct-ResNeXt and Oct-SE-ResNet for ImageNet (2D), torchvision layout.

Octave placement follows the official code (``docs/semantics.md`` section 4):

- the stem (``conv1``, ``bn1``, ``relu``, ``maxpool``) is vanilla;
- ``layer1``..``layer3`` run at ratio ``alpha``; the first block of ``layer1`` takes the
  plain stem tensor (its ``conv1`` and shortcut have ``alpha_in = 0``);
- ``layer4`` is vanilla: its first block's ``conv1`` and shortcut map ``alpha -> 0``
  ("a 3x3 conv on a 3.5x3.5 low map makes no sense");
- the head (global average pool + ``fc``) works on the plain tensor.

Module names are torchvision's (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``
and ``conv1/bn1/.../downsample`` inside the blocks), so :func:`oct3d.models.load_vanilla`
fills an Oct-ResNet-50 from ``torchvision.models.resnet50()`` by name; at ``alpha=0`` the
model *is* torchvision's (same parameters, same multiply-adds, same outputs).

Cost at 224x224, 1000 classes (multiply-adds from ``torch.utils.flop_counter`` / 2):
Oct-ResNet-50 gives 4.09 / 3.57 / 3.10 / 2.37 / 1.88 GMACs at alpha 0 / .125 / .25 / .5 / .75
with 25.56 M parameters at every alpha (paper Table 2: 4.1 / 3.6 / 3.1 / 2.4 / 1.9, 25.6 M).

Weights from vanilla models: at ``alpha > 0``, ``load_vanilla(oct_resnet50(alpha), resnet50())``
is a warm start for fine-tuning, not an equivalent network. Besides the low channels seeing
pooled maps, every strided octave convolution average-pools and then convolves instead of
subsampling (``docs/semantics.md`` section 2), which changes the high path too: on a randomly
initialised ResNet-50 (BatchNorm calibrated on smooth random 112x112 images) the logits move
by 0.58 / 0.57 / 0.56 relative L2 at alpha .125 / .25 / .5, and already at alpha .02 the
features differ by 0.8 after ``layer2``. See ``tests/test_transfer_2d.py`` for the other models.

ResNeXt (grouped 3x3): every branch of a grouped octave convolution must divide by
``groups`` (``docs/semantics.md`` section 2, as in the official code), so ``oct_resnext50_32x4d`` accepts
``alpha`` in {0, .25, .5, .75} (``layer1`` is 128 channels wide: 32 groups of 4) and rejects
``alpha = .125`` with a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from oct3d.models.blocks import (
    OctBottleneck,
    init_like_vanilla,
    make_stage,
    resolve_pool_first,
)
from oct3d.models.registry import forwards_kwargs, register_model
from oct3d.nn import OctGlobalAvgPool
from oct3d.nn.conv import check_alpha, check_positive_int
from oct3d.nn.octave import check_channels_last, in_model_layout, weights_in_model_layout

__all__ = [
    "OctResNet",
    "init_like_vanilla",
    "oct_resnet26",
    "oct_resnet50",
    "oct_resnet101",
    "oct_resnet152",
    "oct_resnet200",
    "oct_resnext50_32x4d",
    "oct_resnext101_32x4d",
    "oct_se_resnet50",
]


#: Output channels of a bottleneck are four times its ``planes`` (torchvision's ``expansion``).
_EXPANSION = 4


class OctResNet(nn.Module):
    """ResNet / ResNeXt / SE-ResNet with octave convolutions in ``layer1``..``layer3``.

    Args:
        layers: number of bottleneck blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        alpha: octave ratio of ``layer1``..``layer3`` (``layer4`` is vanilla), in [0, 1).
        num_classes: outputs of ``fc``.
        groups: cardinality of the 3x3 convolutions (ResNeXt: 32).
        width_per_group: channels per group of the 3x3 convolution of ``layer1`` (torchvision's
            ``width_per_group``: 64 for ResNet, 4 for ResNeXt-32x4d).
        se_reduction: add an octave squeeze-excitation with this reduction to every block
            (SE-ResNet: 16).
        alphas: per-stage override of ``alpha`` for advanced use, four ratios for
            ``layer1``..``layer4``. The default is ``(alpha, alpha, alpha, 0)``. A stage
            takes the previous stage's ratio as input (the stem's is 0); with ``alphas[3] > 0``
            the head pools both branches and concatenates them before ``fc``.
        zero_init_residual: start every block's last BatchNorm at zero (torchvision's option).
        pool_first: how strided ratio-0 convolutions (``layer4.0.conv2``) stride. ``None``: the
            official code's rule, pool then stride-1 conv when any ratio is > 0, a strided conv at
            alpha 0 (exactly torchvision). ``True``/``False`` force either. See
            :func:`~oct3d.models.blocks.resolve_pool_first`.
        channels_last: run in the channels_last memory format (the input converted once,
            before the stem; logits are layout-free). ``None`` (default): on CPU inputs only,
            where oneDNN would otherwise reorder every convolution's input and output. See
            :func:`~oct3d.nn.octave.in_model_layout`.
    """

    def __init__(
        self,
        layers: Sequence[int],
        alpha: float = 0.5,
        num_classes: int = 1000,
        groups: int = 1,
        width_per_group: int = 64,
        se_reduction: int | None = None,
        alphas: Sequence[float] | None = None,
        zero_init_residual: bool = False,
        pool_first: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = check_channels_last(channels_last)
        if len(layers) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in layers):
            raise ValueError(f"layers must be four positive ints, got {layers!r}")
        for name, value in (("num_classes", num_classes), ("groups", groups), ("width_per_group", width_per_group)):
            check_positive_int(value, name)
        alpha = check_alpha(alpha, "alpha")
        if alphas is None:
            alphas = (alpha, alpha, alpha, 0.0)
        elif len(alphas) != 4:
            raise ValueError(f"alphas must give four ratios (layer1..layer4), got {alphas!r}")
        self.alphas = tuple(check_alpha(a, f"alphas[{i}]") for i, a in enumerate(alphas))
        self.layers = tuple(layers)
        self.groups = groups
        self.pool_first = resolve_pool_first(pool_first, self.alphas)

        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        in_channels, alpha_in = 64, 0.0
        block_options = {"groups": groups, "se_reduction": se_reduction, "pool_first": self.pool_first}
        for index, (planes, depth, stage_alpha) in enumerate(zip((64, 128, 256, 512), layers, self.alphas)):
            width = int(planes * width_per_group / 64) * groups
            out_channels = planes * _EXPANSION
            stage = make_stage(
                OctBottleneck, 2, in_channels, width, out_channels, depth, stride=1 if index == 0 else 2,
                alpha_in=alpha_in, alpha=stage_alpha, **block_options,
            )
            self.add_module(f"layer{index + 1}", stage)
            in_channels, alpha_in = out_channels, stage_alpha

        self.avgpool = OctGlobalAvgPool()
        self.fc = nn.Linear(in_channels, num_classes)

        init_like_vanilla(self, "fan_out")
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, OctBottleneck):
                    for bn in (module.bn3.bn_h, module.bn3.bn_l):
                        if bn is not None:
                            nn.init.zeros_(bn.weight)
        weights_in_model_layout(self, self.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of an image batch ``(N, 3, H, W)`` (any H, W >= 1)."""
        if not isinstance(x, torch.fx.Proxy) and (not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3):
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects an image batch of shape (N, 3, H, W), got {shape}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(in_model_layout(x, self.channels_last)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x))


def _build(layers: Sequence[int], alpha: float, num_classes: int, **kwargs) -> OctResNet:
    return OctResNet(layers, alpha=alpha, num_classes=num_classes, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet)
def oct_resnet26(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNet-26: bottleneck blocks ``[2, 2, 2, 2]`` (paper Table 6). ``kwargs`` go to :class:`OctResNet`."""
    return _build((2, 2, 2, 2), alpha, num_classes, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet)
def oct_resnet50(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNet-50 ``[3, 4, 6, 3]``; at ``alpha=0`` it is torchvision's ``resnet50``. See :class:`OctResNet`."""
    return _build((3, 4, 6, 3), alpha, num_classes, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet)
def oct_resnet101(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNet-101 ``[3, 4, 23, 3]``; at ``alpha=0`` torchvision's ``resnet101``. See :class:`OctResNet`."""
    return _build((3, 4, 23, 3), alpha, num_classes, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet)
def oct_resnet152(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNet-152 ``[3, 8, 36, 3]``; at ``alpha=0`` torchvision's ``resnet152``. See :class:`OctResNet`."""
    return _build((3, 8, 36, 3), alpha, num_classes, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet)
def oct_resnet200(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNet-200 ``[3, 24, 36, 3]`` (paper Table 6). See :class:`OctResNet`."""
    return _build((3, 24, 36, 3), alpha, num_classes, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet, fixed=("groups", "width_per_group"))
def oct_resnext50_32x4d(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNeXt-50 32x4d; at ``alpha=0`` torchvision's ``resnext50_32x4d``.

    ``alpha`` must leave both branches of every 3x3 layer divisible by 32 groups: 0, .25, .5
    or .75 (the paper uses .25). See :class:`OctResNet`.
    """
    return _build((3, 4, 6, 3), alpha, num_classes, groups=32, width_per_group=4, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet, fixed=("groups", "width_per_group"))
def oct_resnext101_32x4d(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-ResNeXt-101 32x4d ``[3, 4, 23, 3]`` (torchvision has 32x8d and 64x4d only).

    ``alpha`` in {0, .25, .5, .75}, as for :func:`oct_resnext50_32x4d`. See :class:`OctResNet`.
    """
    return _build((3, 4, 23, 3), alpha, num_classes, groups=32, width_per_group=4, **kwargs)


@register_model(task="image")
@forwards_kwargs(OctResNet, fixed=("se_reduction",))
def oct_se_resnet50(alpha: float = 0.5, num_classes: int = 1000, **kwargs) -> OctResNet:
    """Oct-SE-ResNet-50: Oct-ResNet-50 with an octave squeeze-excitation (reduction 16) in every block.

    The SE pools both branches, squeezes them with one shared FC and excites each branch with
    its own FC (``docs/semantics.md`` section 3); ``layer4``'s SE is the ordinary one. See :class:`OctResNet`.
    """
    return _build((3, 4, 6, 3), alpha, num_classes, se_reduction=16, **kwargs)
