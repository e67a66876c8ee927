"""Octave video ResNets: Oct-I3D, Oct-C2D, Oct-Slow (pytorchvideo layouts) and Oct-R3D (torchvision layout).

One class, :class:`OctVideoResNet`, built from the dimension-generic blocks of
:mod:`oct3d.models.blocks`, covers every model here. Its module names are those of the 2D
torchvision ResNet (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``) plus
``temporal_pool`` (the max pool over time after ``layer1`` of I3D and C2D) and ``dropout``, so a
2D model inflates into it key for key (:func:`oct3d.models.inflate`) and
:func:`oct3d.models.load_vanilla` fills it from pytorchvideo's or torchvision's vanilla peers
(:meth:`OctVideoResNet.translate_vanilla_state_dict` renames their keys).

Octave placement follows docs/semantics.md section 4 (the paper's Table 8): stem vanilla, ``layer1`` to
``layer3`` (res2..res4) octave with ratio ``alpha`` (the first block of ``layer1`` takes the plain
stem output), ``layer4`` (res5) vanilla. ``octave="spatial"`` halves H and W of the low branch (the
paper's video setting), ``"spatiotemporal"`` halves T as well. At ``alpha=0`` every model is its
vanilla peer, layer for layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from oct3d.models.blocks import (
    OctaveResplit,
    OctBasicBlock,
    OctBottleneck,
    init_like_vanilla,
    make_stage,
    resolve_pool_first,
)
from oct3d.models.registry import register_model
from oct3d.nn import (
    OCTAVE_MODES,
    OctaveOutput,
    OctBatchNorm,
    OctGlobalAvgPool,
    OctMaxPool,
)
from oct3d.nn.conv import check_alpha, check_positive_int, to_tuple
from oct3d.nn.octave import check_channels_last, in_model_layout, weights_in_model_layout

__all__ = [
    "OctTemporalMaxPool",
    "OctaveResplit",
    "OctVideoResNet",
    "oct_c2d_r50",
    "oct_i3d_r50",
    "oct_r3d_18",
    "oct_r3d_34",
    "oct_r3d_50",
    "oct_slow_r50",
]


# pytorchvideo's create_resnet repeats a stage's conv_a kernel list until it covers the stage's depth.
_I3D_TEMPORAL_KERNELS = ((3,), (3, 1), (3, 1), (1, 3))
_C2D_TEMPORAL_KERNELS = ((1,), (1,), (1,), (1,))
_SLOW_TEMPORAL_KERNELS = ((1,), (1,), (3,), (3,))


class OctTemporalMaxPool(OctMaxPool):
    """Max pooling over time only (kernel = stride = ``kernel_size`` frames), for plain or octave maps.

    The high branch (or a plain tensor) is pooled exactly like ``nn.MaxPool3d((k, 1, 1))``, as
    pytorchvideo's I3D/C2D do after res2; :class:`~oct3d.nn.OctMaxPool` keeps the low branch at
    the octave size on odd frame counts in ``"spatiotemporal"`` mode.
    """

    def __init__(self, kernel_size: int = 2, octave: str = "spatial") -> None:
        check_positive_int(kernel_size, "kernel_size")
        k = (kernel_size, 1, 1)
        super().__init__(3, k, k, 0, octave=octave)


class OctVideoResNet(nn.Module):
    """A video ResNet (I3D, C2D, Slow, R3D) with octave convolutions in res2..res4.

    Args:
        block: ``"bottleneck"`` (ResNet-50 family) or ``"basic"`` (R3D-18/34).
        depths: blocks per stage (res2..res5), e.g. ``(3, 4, 6, 3)``.
        alphas: octave ratio per stage (res2..res5); the paper's placement is ``(a, a, a, 0)``
            (``docs/semantics.md`` section 4).
        octave: ``"spatial"`` (low branch at half H, W) or ``"spatiotemporal"`` (half T, H, W).
        stem_kernel_size: kernel of the vanilla stem convolution (stride ``(1, 2, 2)``, "same" padding).
        stem_pool: add pytorchvideo's stem max pool (kernel ``(1, 3, 3)``, stride ``(1, 2, 2)``).
        temporal_pool: add a max pool over 2 frames after ``layer1`` (I3D, C2D).
        temporal_kernels: bottleneck only: per stage, the temporal kernels of ``conv1`` (conv_a),
            cycled over the stage's blocks as pytorchvideo does (I3D: ``((3,), (3, 1), (3, 1), (1, 3))``).
        spatial_kernel_size: kernel of the middle convolution (bottleneck: ``(1, 3, 3)``, R3D: 3)
            or of both convolutions (basic block).
        stage_strides: stride of the first block of each stage; ``(1, 2, 2)`` keeps time (pytorchvideo),
            ``(2, 2, 2)`` halves it (torchvision's R3D, layers 2-4).
        base_width: stem channels; stage widths are ``base_width * 2**i`` (times 4 at a bottleneck's output).
        in_channels: input channels (3 for RGB).
        num_classes: classifier outputs.
        dropout: dropout probability before the classifier.
        zero_init_residual: zero the last BatchNorm of every block (pytorchvideo's initialisation).
        pool_first: how strided ratio-0 convolutions (res5's first block) stride. ``None``: the
            official OctConv rule, pool then stride-1 conv when any ratio is > 0, strided convs at
            alpha 0 (exactly pytorchvideo / torchvision). See :func:`~oct3d.models.blocks.resolve_pool_first`.
        channels_last: run in the channels_last_3d memory format (the clip converted once, before
            the stem; logits are layout-free). ``None`` (default): on CPU inputs only, where oneDNN
            would otherwise reorder every convolution's input and output. See
            :func:`~oct3d.nn.octave.in_model_layout`.

    Head. pytorchvideo's head averages with a fixed ``AvgPool3d`` kernel (``(4, 7, 7)`` for I3D and C2D,
    ``(8, 7, 7)`` for Slow; stride 1), applies the classifier at every remaining position and averages
    the logits; it rejects clips whose final map is smaller than the kernel and, on larger clips,
    weights the central positions more (overlapping windows). Here ``avgpool`` is a global average over
    whatever T x H x W remains (any clip size, odd sizes included), then ``dropout`` and ``fc``. At the
    size the pytorchvideo kernel was made for (8 x 224 x 224) the final map is exactly the kernel and
    both heads compute the same logits.

    ``forward_features`` returns the map before the head (a tensor, or an :class:`~oct3d.nn.Octave`
    when ``alphas[3] > 0``).
    """

    def __init__(
        self,
        block: str,
        depths: Sequence[int],
        alphas: Sequence[float],
        octave: str = "spatial",
        stem_kernel_size: int | Sequence[int] = (5, 7, 7),
        stem_pool: bool = True,
        temporal_pool: bool = True,
        temporal_kernels: Sequence[Sequence[int]] = _I3D_TEMPORAL_KERNELS,
        spatial_kernel_size: int | Sequence[int] = (1, 3, 3),
        stage_strides: Sequence[int | Sequence[int]] = ((1, 1, 1), (1, 2, 2), (1, 2, 2), (1, 2, 2)),
        base_width: int = 64,
        in_channels: int = 3,
        num_classes: int = 400,
        dropout: float = 0.5,
        zero_init_residual: bool = True,
        pool_first: bool | None = None,
        channels_last: bool | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = check_channels_last(channels_last)
        if block not in ("bottleneck", "basic"):
            raise ValueError(f"block must be 'bottleneck' or 'basic', got {block!r}")
        if octave not in OCTAVE_MODES:
            raise ValueError(f"octave must be one of {OCTAVE_MODES}, got {octave!r}")
        depths = _four(depths, "depths")
        for i, d in enumerate(depths):
            check_positive_int(d, f"depths[{i}]")
        alphas = tuple(check_alpha(a, f"alphas[{i}]") for i, a in enumerate(_four(alphas, "alphas")))
        base_width = check_positive_int(base_width, "base_width")
        in_channels = check_positive_int(in_channels, "in_channels")
        num_classes = check_positive_int(num_classes, "num_classes")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        temporal_kernels = _four(temporal_kernels, "temporal_kernels")
        stage_strides = [
            to_tuple(s, 3, f"stage_strides[{i}]") for i, s in enumerate(_four(stage_strides, "stage_strides"))
        ]
        stem_kernel = to_tuple(stem_kernel_size, 3, "stem_kernel_size")
        if any(k % 2 == 0 for k in stem_kernel):
            raise ValueError(f"stem_kernel_size must be odd, got {stem_kernel_size!r}")

        self.block = block
        self.depths = depths
        self.alphas = alphas
        self.octave = octave
        self.pool_first = resolve_pool_first(pool_first, alphas)
        self.base_width = base_width
        self.num_classes = num_classes

        self.conv1 = nn.Conv3d(
            in_channels, base_width, stem_kernel, stride=(1, 2, 2), padding=tuple(k // 2 for k in stem_kernel),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)) if stem_pool else nn.Identity()

        expansion = 4 if block == "bottleneck" else 1
        block_cls = OctBottleneck if block == "bottleneck" else OctBasicBlock
        channels = base_width
        alpha_in = 0.0  # the stem hands a plain tensor to res2
        stages = []
        for i in range(4):
            width = base_width * 2**i
            if block == "bottleneck":
                kernels = list(temporal_kernels[i])
                if not kernels or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernels):
                    raise ValueError(f"temporal_kernels[{i}] must be a non-empty sequence of odd ints, got {kernels!r}")
                per_block = [
                    {"kernel_a": (kernels[b % len(kernels)], 1, 1), "kernel_b": spatial_kernel_size}
                    for b in range(depths[i])
                ]
            else:
                per_block = {"kernel_size": spatial_kernel_size}
            stages.append(
                make_stage(
                    block_cls, 3, channels, width, width * expansion, depths[i], stage_strides[i], alpha_in, alphas[i],
                    octave=octave, block_kwargs=per_block, pool_first=self.pool_first,
                )
            )
            channels, alpha_in = width * expansion, alphas[i]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.temporal_pool = OctTemporalMaxPool(2, octave) if temporal_pool else nn.Identity()
        self.avgpool = OctGlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_like_vanilla(self, "fan_out")
        weights_in_model_layout(self, self.channels_last)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, OctBottleneck) else None
                if isinstance(m, OctBasicBlock):
                    last = m.bn2
                if isinstance(last, OctBatchNorm):
                    for bn in (last.bn_h, last.bn_l):
                        if bn is not None:
                            nn.init.zeros_(bn.weight)

    def forward_features(self, x: Tensor) -> OctaveOutput:
        """The feature map after ``layer4``, before the head (channels_last_3d when the model runs
        channels_last, as on CPU by default: use ``.reshape``, not ``.view``, to flatten it)."""
        if not isinstance(x, torch.fx.Proxy) and (not isinstance(x, Tensor) or x.dim() != 5):
            raise ValueError(f"expected a clip tensor of shape (N, C, T, H, W), got {getattr(x, 'shape', type(x))}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(in_model_layout(x, self.channels_last)))))
        x = self.temporal_pool(self.layer1(x))
        return self.layer4(self.layer3(self.layer2(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(N, num_classes)`` of a clip batch ``(N, C, T, H, W)``."""
        return self.fc(self.dropout(self.avgpool(self.forward_features(x))))

    def translate_vanilla_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Rename a vanilla video ResNet's keys into this model's names (used by ``load_vanilla``).

        Understands pytorchvideo's ``create_resnet`` naming (``blocks.0.conv``,
        ``blocks.1.res_blocks.0.branch2.conv_a``, ``blocks.5.proj``, ...) and torchvision's
        ``VideoResNet`` naming (``stem.0``, ``layer1.0.conv1.0``, ``layer1.0.conv1.1``, ...); keys
        already in this model's naming pass through unchanged.
        """
        keys = list(state_dict)
        if any(k.startswith("blocks.") for k in keys):
            return _translate_pytorchvideo(state_dict)
        if any(k.startswith("stem.") for k in keys):
            return _translate_torchvision(state_dict)
        return dict(state_dict)


def _four(value: Sequence, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
        raise ValueError(f"{name} must be a sequence of 4 values (res2..res5), got {value!r}")
    return tuple(value)


_PTV_BLOCK_NAMES = {
    "branch1_conv": "downsample.0",
    "branch1_norm": "downsample.1",
    "branch2.conv_a": "conv1",
    "branch2.norm_a": "bn1",
    "branch2.conv_b": "conv2",
    "branch2.norm_b": "bn2",
    "branch2.conv_c": "conv3",
    "branch2.norm_c": "bn3",
}


def _translate_pytorchvideo(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # Stage indices shift by one where a pool sits between res2 and res3, so find them from the keys.
    stage_ids = sorted({int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.res_blocks\.", k)})
    layer_of = {idx: f"layer{n + 1}" for n, idx in enumerate(stage_ids)}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if m is None:
            out[key] = value
            continue
        idx, rest = int(m.group(1)), m.group(2)
        if idx in layer_of:
            b = re.match(r"res_blocks\.(\d+)\.(branch1_conv|branch1_norm|branch2\.\w+?)\.(.*)$", rest)
            if b and b.group(2) in _PTV_BLOCK_NAMES:
                out[f"{layer_of[idx]}.{b.group(1)}.{_PTV_BLOCK_NAMES[b.group(2)]}.{b.group(3)}"] = value
                continue
        elif idx == 0 and rest.split(".")[0] in ("conv", "norm"):
            out[("conv1." if rest.startswith("conv.") else "bn1.") + rest.split(".", 1)[1]] = value
            continue
        elif rest.startswith("proj."):
            out["fc." + rest[len("proj."):]] = value
            continue
        out[key] = value  # unknown: left for load_vanilla to report
    return out


def _translate_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = re.sub(r"^stem\.0\.", "conv1.", key)
        new = re.sub(r"^stem\.1\.", "bn1.", new)
        # torchvision wraps each block convolution with its BatchNorm: convN.0 = conv, convN.1 = bn.
        new = re.sub(r"^(layer\d+\.\d+)\.conv(\d)\.0\.", r"\1.conv\2.", new)
        new = re.sub(r"^(layer\d+\.\d+)\.conv(\d)\.1\.", r"\1.bn\2.", new)
        out[new] = value
    return out


def _alphas(alpha: float, alphas: Sequence[float] | None) -> tuple[float, ...]:
    check_alpha(alpha)
    return (alpha, alpha, alpha, 0.0) if alphas is None else tuple(alphas)


@register_model(task="video")
def oct_i3d_r50(
    *,
    alpha: float = 0.5,
    octave: str = "spatial",
    num_classes: int = 400,
    dropout: float = 0.5,
    alphas: Sequence[float] | None = None,
    depths: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    in_channels: int = 3,
    pool_first: bool | None = None,
    channels_last: bool | None = None,
) -> OctVideoResNet:
    """Oct-I3D ResNet-50 (paper Table 8); at ``alpha=0`` it is pytorchvideo's ``i3d_r50``.

    Stem conv ``5x7x7`` + max pool ``1x3x3``; conv_a temporal kernels per stage ``(3)``, ``(3, 1)``,
    ``(3, 1)``, ``(1, 3)`` cycled over the blocks; conv_b ``1x3x3`` (stride ``1x2x2`` in res3..res5);
    a max pool over 2 frames after res2. 8 x 224 x 224, 400 classes: 28.04 M parameters, 28.4 GMACs
    at alpha 0.

    Args:
        alpha: octave ratio of res2..res4 (res5 is vanilla).
        octave: ``"spatial"`` or ``"spatiotemporal"``.
        num_classes: classifier outputs.
        dropout: dropout before the classifier.
        alphas: per-stage ratios (res2..res5), overriding ``alpha``.
        depths: blocks per stage; ``(1, 1, 1, 1)`` with a small ``base_width`` for tests and demos.
        base_width: stem channels (64); every stage width scales with it.
        in_channels: input channels.
        pool_first: strided ratio-0 convs (res5's first block) pool, then convolve at stride 1;
            ``None`` follows the official code (pool first when any ratio is > 0). See
            :func:`~oct3d.models.blocks.resolve_pool_first`.
        channels_last: run in channels_last_3d; ``None`` (default): on CPU inputs only. See
            :func:`~oct3d.nn.octave.in_model_layout`.
    """
    return OctVideoResNet(
        "bottleneck", depths, _alphas(alpha, alphas), octave, stem_kernel_size=(5, 7, 7), stem_pool=True,
        temporal_pool=True, temporal_kernels=_I3D_TEMPORAL_KERNELS, base_width=base_width, in_channels=in_channels,
        num_classes=num_classes, dropout=dropout, pool_first=pool_first,
        channels_last=channels_last,
    )


@register_model(task="video")
def oct_c2d_r50(
    *,
    alpha: float = 0.5,
    octave: str = "spatial",
    num_classes: int = 400,
    dropout: float = 0.5,
    alphas: Sequence[float] | None = None,
    depths: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    in_channels: int = 3,
    pool_first: bool | None = None,
    channels_last: bool | None = None,
) -> OctVideoResNet:
    """Oct-C2D ResNet-50 (paper Table 8); at ``alpha=0`` it is pytorchvideo's ``c2d_r50``.

    A 2D ResNet-50 applied per frame (every kernel is ``1xkxk``) with a max pool over 2 frames
    after res2. 8 x 224 x 224, 400 classes: 24.33 M parameters, 19.49 GMACs at alpha 0.
    Arguments as :func:`oct_i3d_r50`.
    """
    return OctVideoResNet(
        "bottleneck", depths, _alphas(alpha, alphas), octave, stem_kernel_size=(1, 7, 7), stem_pool=True,
        temporal_pool=True, temporal_kernels=_C2D_TEMPORAL_KERNELS, base_width=base_width, in_channels=in_channels,
        num_classes=num_classes, dropout=dropout, pool_first=pool_first,
        channels_last=channels_last,
    )


@register_model(task="video")
def oct_slow_r50(
    *,
    alpha: float = 0.5,
    octave: str = "spatial",
    num_classes: int = 400,
    dropout: float = 0.5,
    alphas: Sequence[float] | None = None,
    depths: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    in_channels: int = 3,
    pool_first: bool | None = None,
    channels_last: bool | None = None,
) -> OctVideoResNet:
    """Oct-Slow ResNet-50 (the Slow pathway of SlowFast); at ``alpha=0`` it is pytorchvideo's ``slow_r50``.

    Stem ``1x7x7``, temporal kernels only in res4 and res5 (conv_a ``3x1x1``), no temporal pooling.
    Arguments as :func:`oct_i3d_r50`.
    """
    return OctVideoResNet(
        "bottleneck", depths, _alphas(alpha, alphas), octave, stem_kernel_size=(1, 7, 7), stem_pool=True,
        temporal_pool=False, temporal_kernels=_SLOW_TEMPORAL_KERNELS, base_width=base_width,
        in_channels=in_channels, num_classes=num_classes, dropout=dropout, pool_first=pool_first,
        channels_last=channels_last,
    )


def _r3d(
    block: str, default_depths: Sequence[int], alpha: float, octave: str, num_classes: int, dropout: float,
    alphas: Sequence[float] | None, depths: Sequence[int] | None, base_width: int, in_channels: int,
    pool_first: bool | None, channels_last: bool | None,
) -> OctVideoResNet:
    return OctVideoResNet(
        block, default_depths if depths is None else depths, _alphas(alpha, alphas), octave,
        stem_kernel_size=(3, 7, 7), stem_pool=False, temporal_pool=False, temporal_kernels=((1,),) * 4,
        spatial_kernel_size=3, stage_strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), base_width=base_width,
        in_channels=in_channels, num_classes=num_classes, dropout=dropout, pool_first=pool_first,
        channels_last=channels_last,
    )


@register_model(task="video")
def oct_r3d_18(
    *,
    alpha: float = 0.5,
    octave: str = "spatial",
    num_classes: int = 400,
    dropout: float = 0.5,
    alphas: Sequence[float] | None = None,
    depths: Sequence[int] = (2, 2, 2, 2),
    base_width: int = 64,
    in_channels: int = 3,
    pool_first: bool | None = None,
    channels_last: bool | None = None,
) -> OctVideoResNet:
    """Oct-R3D-18: 3x3x3 basic blocks; at ``alpha=0`` it is torchvision's ``r3d_18`` (plus head dropout).

    Stem ``3x7x7`` stride ``1x2x2`` without max pool; layers 2-4 stride 2 on T, H and W.
    Arguments as :func:`oct_i3d_r50` (torchvision has no dropout; it is identity in eval mode).
    ``layer1.0`` keeps 64 channels and only changes the ratio 0 -> alpha; its shortcut is the
    parameter-free :class:`OctaveResplit` (the vanilla identity), so the parameter count does not
    depend on alpha and :func:`~oct3d.models.load_vanilla` fills it from ``r3d_18`` at any alpha.
    """
    return _r3d(
        "basic", (2, 2, 2, 2), alpha, octave, num_classes, dropout, alphas, depths, base_width, in_channels, pool_first,
        channels_last,
    )


@register_model(task="video")
def oct_r3d_34(
    *,
    alpha: float = 0.5,
    octave: str = "spatial",
    num_classes: int = 400,
    dropout: float = 0.5,
    alphas: Sequence[float] | None = None,
    depths: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    in_channels: int = 3,
    pool_first: bool | None = None,
    channels_last: bool | None = None,
) -> OctVideoResNet:
    """Oct-R3D-34: :func:`oct_r3d_18` with ``(3, 4, 6, 3)`` basic blocks (torchvision's ``VideoResNet`` layout)."""
    return _r3d(
        "basic", (3, 4, 6, 3), alpha, octave, num_classes, dropout, alphas, depths, base_width, in_channels, pool_first,
        channels_last,
    )


@register_model(task="video")
def oct_r3d_50(
    *,
    alpha: float = 0.5,
    octave: str = "spatial",
    num_classes: int = 400,
    dropout: float = 0.5,
    alphas: Sequence[float] | None = None,
    depths: Sequence[int] = (3, 4, 6, 3),
    base_width: int = 64,
    in_channels: int = 3,
    pool_first: bool | None = None,
    channels_last: bool | None = None,
) -> OctVideoResNet:
    """Oct-R3D-50: bottleneck blocks (1x1x1, 3x3x3, 1x1x1) in the R3D layout (torchvision's ``VideoResNet``
    with ``Bottleneck`` and ``Conv3DSimple``). Arguments as :func:`oct_i3d_r50`."""
    return _r3d(
        "bottleneck", (3, 4, 6, 3), alpha, octave, num_classes, dropout, alphas, depths, base_width, in_channels,
        pool_first, channels_last,
    )
