"""The octave callables that pytorchvideo's ResNet builders name but never shipped.

pytorchvideo's ``create_bottleneck_block`` and ``create_res_block`` take the layers they build
as callables (``conv_a``, ``conv_b``, ``conv_c``, ``conv_skip``, ``norm``, ``activation_*``,
``branch_fusion``), and their docstrings give ``OctaveConv`` and ``OctaveSum`` as examples.
This module provides them, with the exact keyword arguments pytorchvideo 0.1.5 passes:

- :class:`OctaveConv`: ``conv(in_channels=, out_channels=, kernel_size=, stride=, padding=,
  bias=, groups=, dilation=)`` and, for the shortcut, ``conv_skip(dim_in, dim_out,
  kernel_size=, stride=, bias=)`` (the stride arrives as numpy integers);
- :class:`OctaveBatchNorm`: ``norm(num_features=, eps=, momentum=)``;
- :class:`OctaveActivation`: ``activation()`` (no arguments);
- :class:`OctaveSum`: ``branch_fusion(shortcut, branch2_output)``, the per-branch residual sum.

The octave ratios are not among pytorchvideo's arguments, so bind them with
``functools.partial`` (or :meth:`OctaveConv.partial`), one callable per position in the network.
:func:`create_octave_resnet` does that for the paper's placement (stem vanilla, res2..res4
octave, res5 vanilla) and assembles the network from pytorchvideo's own builders.

pytorchvideo's ``create_resnet`` cannot carry an octave map from block to block by itself: its
``create_res_stage`` calls ``create_res_block`` without ``conv_skip`` or ``branch_fusion``, so
every shortcut is an ``nn.Conv3d`` and every residual sum is ``x + y`` (on two ``Octave`` pairs
that would be tuple concatenation). :func:`create_octave_resnet` therefore loops over
``create_res_block`` itself; at ``alpha = 0`` it builds the module tree ``create_resnet`` builds.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Callable, Sequence

from torch import nn

from oct3d.models.blocks import resolve_pool_first
from oct3d.nn import OctAvgPool, OctBatchNorm, OctConv, OctMap, OctMaxPool, octave_add
from oct3d.nn.conv import check_alpha
from oct3d.nn.octave import OctaveInput, OctaveOutput

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pytorchvideo's imports emit deprecation warnings
    from pytorchvideo.models.head import create_res_basic_head
    from pytorchvideo.models.net import Net
    from pytorchvideo.models.resnet import (
        _MODEL_STAGE_DEPTH,
        ResStage,
        create_bottleneck_block,
        create_res_block,
    )
    from pytorchvideo.models.stem import create_res_basic_stem

__all__ = [
    "OctaveActivation",
    "OctaveBatchNorm",
    "OctaveConv",
    "OctaveSum",
    "create_octave_resnet",
    "init_octave_convs",
]


def _ints(value: object, name: str) -> object:
    """Turn numpy integers (pytorchvideo computes the shortcut stride with ``np.prod``) into ints."""
    if isinstance(value, (list, tuple)):
        try:
            return tuple(operator.index(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    if isinstance(value, (bool, str)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value  # OctConv's own check names the argument


class OctaveConv(OctConv):
    """:class:`~oct3d.nn.OctConv` with ``nn.Conv3d``'s signature, for pytorchvideo's ``conv_*`` hooks.

    The positional order is ``nn.ConvNd``'s (``in_channels, out_channels, kernel_size, stride,
    padding, dilation, groups, bias``); the octave settings are keyword-only, so bind them with
    ``functools.partial(OctaveConv, alpha_in=..., alpha_out=...)`` or :meth:`partial`.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, bias: as for
            ``nn.Conv3d`` (odd kernels, strides 1 or 2).
        padding: must be the "same" padding ``dilation * (kernel_size - 1) // 2`` per axis (what
            pytorchvideo passes), ``"same"``, or ``None``; an octave convolution pads itself.
        alpha_in, alpha_out: low-frequency ratios of input and output, in [0, 1).
        octave: ``"spatial"`` (halve H and W, the paper's video setting) or ``"spatiotemporal"``.
        dims: number of spatial axes (3 for pytorchvideo's video models).
        pool_first: a strided ratio-0 layer pools by the stride, then convolves at stride 1 (the
            official rule inside an octave network); see :class:`~oct3d.nn.OctConv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str | None = None,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        alpha_in: float = 0.5,
        alpha_out: float = 0.5,
        octave: str = "spatial",
        dims: int = 3,
        pool_first: bool = False,
    ) -> None:
        super().__init__(
            dims, _ints(in_channels, "in_channels"), _ints(out_channels, "out_channels"),
            _ints(kernel_size, "kernel_size"), alpha_in, alpha_out, _ints(stride, "stride"),
            _ints(dilation, "dilation"), _ints(groups, "groups"), bias, octave, pool_first=pool_first,
        )
        padding = _ints(padding, "padding")
        if padding is not None and padding != "same":
            if isinstance(padding, int):
                padding = (padding,) * dims
            if tuple(padding) != self.padding:
                raise ValueError(
                    f"OctaveConv pads 'same' (dilation * (kernel_size - 1) // 2 = {self.padding} for "
                    f"kernel_size={self.kernel_size}, dilation={self.dilation}); got padding={padding!r}"
                )

    @classmethod
    def partial(
        cls, alpha_in: float = 0.5, alpha_out: float = 0.5, octave: str = "spatial", pool_first: bool = False,
        dims: int = 3,
    ) -> Callable[..., OctaveConv]:
        """A callable for pytorchvideo's ``conv_a``/``conv_b``/``conv_c``/``conv_skip`` with these settings."""
        check_alpha(alpha_in, "alpha_in")
        check_alpha(alpha_out, "alpha_out")
        return functools.partial(
            cls, alpha_in=alpha_in, alpha_out=alpha_out, octave=octave, pool_first=pool_first, dims=dims
        )


class OctaveBatchNorm(OctBatchNorm):
    """:class:`~oct3d.nn.OctBatchNorm` with the keywords pytorchvideo's ``norm`` hook passes.

    pytorchvideo calls ``norm(num_features=, eps=, momentum=)``; bind ``alpha`` (and ``dims``,
    3 by default) with ``functools.partial``. pytorchvideo's bottleneck marks its last norm
    with ``block_final_bn = True`` so that its weight initialises to zero; the flag is passed
    on to ``bn_h`` and ``bn_l``, which are what pytorchvideo's initialiser visits.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
        track_running_stats: bool = True, *, alpha: float = 0.5, dims: int = 3,
    ) -> None:
        super().__init__(
            dims, num_features, alpha, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats,
        )

    @property
    def block_final_bn(self) -> bool:
        """pytorchvideo's marker of a residual branch's last norm (zero-initialised weight)."""
        return bool(getattr(self.bn_h, "block_final_bn", False))

    @block_final_bn.setter
    def block_final_bn(self, value: bool) -> None:
        for bn in (self.bn_h, self.bn_l):
            if bn is not None:
                bn.block_final_bn = value


class OctaveActivation(OctMap):
    """An elementwise activation applied to each branch; ``activation()`` builds ReLU, as pytorchvideo does.

    Args:
        activation: the activation module class (``nn.ReLU``, ``nn.SiLU``, ...).
        **kwargs: its constructor arguments.
    """

    def __init__(self, activation: type[nn.Module] = nn.ReLU, **kwargs) -> None:
        if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
            raise TypeError(f"activation must be an nn.Module class such as nn.ReLU, got {activation!r}")
        super().__init__(activation(**kwargs))


class OctaveSum(nn.Module):
    """Residual sum per branch (``high + high``, ``low + low``), for pytorchvideo's ``branch_fusion``.

    Pass an instance: ``create_res_block(..., branch_fusion=OctaveSum())``; pytorchvideo calls it
    as ``branch_fusion(shortcut, branch2_output)``. Two plain tensors are simply added. It has
    no parameters, so it adds no state-dict keys.
    """

    def forward(self, x: OctaveInput, y: OctaveInput) -> OctaveOutput:
        """``x + y`` branch by branch (see :func:`oct3d.nn.octave_add`)."""
        return octave_add(x, y)


def init_octave_convs(model: nn.Module) -> nn.Module:
    """Re-initialise every octave convolution as pytorchvideo initialises the vanilla one.

    pytorchvideo's ``Net`` runs ``c2_msra_fill`` (Kaiming normal, fan out) on every ``nn.Conv3d``,
    which for an octave layer means each path on its own, so half-width paths would start with
    up to ``1 / alpha`` times the vanilla variance. This gives each path the whole layer's
    standard deviation ``sqrt(2 / (out_channels * kernel volume))`` and zero bias instead.
    """
    for module in model.modules():
        if isinstance(module, OctConv):
            std = math.sqrt(2.0 / (module.out_channels * math.prod(module.kernel_size)))
            for path in (module.h2h, module.h2l, module.l2h, module.l2l):
                if path is not None:
                    nn.init.normal_(path.weight, 0.0, std)
                    if path.bias is not None:
                        nn.init.zeros_(path.bias)
    return model


def _per_block(value: object, depth: int) -> list:
    """pytorchvideo's rule for per-stage kernel lists: a tuple of ints for every block, or a list repeated."""
    if isinstance(value[0], int):
        return [value] * depth
    return (list(value) * depth)[:depth]


def _stage1_pool(pool: Callable, kernel_size: Sequence[int], alpha: float, octave: str) -> nn.Module:
    """I3D's pool after res2; on an octave res2 it pools each branch (keeping the low map's size rule)."""
    if alpha == 0:
        return pool(kernel_size=kernel_size, stride=kernel_size, padding=(0, 0, 0))
    octave_pools = {nn.MaxPool3d: OctMaxPool, nn.AvgPool3d: OctAvgPool}
    if pool not in octave_pools:
        raise ValueError(
            f"stage1_pool={pool!r} cannot pool an octave res2 (alphas[0] > 0); use nn.MaxPool3d or nn.AvgPool3d"
        )
    return octave_pools[pool](3, tuple(kernel_size), tuple(kernel_size), 0, octave=octave)


def create_octave_resnet(
    *,
    alpha: float = 0.5,
    alphas: Sequence[float] | None = None,
    octave: str = "spatial",
    pool_first: bool | None = None,
    input_channel: int = 3,
    model_depth: int = 50,
    stage_depths: Sequence[int] | None = None,
    model_num_class: int = 400,
    dropout_rate: float = 0.5,
    stem_dim_out: int = 64,
    stem_conv_kernel_size: Sequence[int] = (3, 7, 7),
    stem_conv_stride: Sequence[int] = (1, 2, 2),
    stem_pool: Callable | None = nn.MaxPool3d,
    stem_pool_kernel_size: Sequence[int] = (1, 3, 3),
    stem_pool_stride: Sequence[int] = (1, 2, 2),
    stage1_pool: Callable | None = None,
    stage1_pool_kernel_size: Sequence[int] = (2, 1, 1),
    stage_conv_a_kernel_size: Sequence = ((1, 1, 1), (1, 1, 1), (3, 1, 1), (3, 1, 1)),
    stage_conv_b_kernel_size: Sequence = ((1, 3, 3), (1, 3, 3), (1, 3, 3), (1, 3, 3)),
    stage_conv_b_num_groups: Sequence[int] = (1, 1, 1, 1),
    stage_spatial_h_stride: Sequence[int] = (1, 2, 2, 2),
    stage_spatial_w_stride: Sequence[int] = (1, 2, 2, 2),
    stage_temporal_stride: Sequence[int] = (1, 1, 1, 1),
    head_pool: Callable = nn.AvgPool3d,
    head_pool_kernel_size: Sequence[int] = (4, 7, 7),
    head_output_size: Sequence[int] = (1, 1, 1),
    head_activation: Callable | None = None,
    head_output_with_global_average: bool = True,
) -> Net:
    """An octave video ResNet assembled from pytorchvideo's builders and this module's callables.

    The arguments after ``pool_first`` are ``pytorchvideo.models.resnet.create_resnet``'s, with
    its defaults (a Slow-R50 style network). Its ``norm``, ``activation``, ``stem``, ``head``,
    ``bottleneck`` and ``stage_conv_b_dilation`` stay at their defaults (BatchNorm, ReLU, the basic
    stem and head, the bottleneck block, no dilation). pytorchvideo's hub configurations carry over, e.g.
    I3D-R50 is ``stem_conv_kernel_size=(5, 7, 7), stage1_pool=nn.MaxPool3d,
    stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)],
    [(1, 1, 1), (3, 1, 1)])``. The stem (``create_res_basic_stem``) and the head
    (``create_res_basic_head``) are pytorchvideo's and vanilla; each block is
    ``create_res_block(bottleneck=create_bottleneck_block, ...)`` with :class:`OctaveConv`,
    :class:`OctaveBatchNorm`, :class:`OctaveActivation` and :class:`OctaveSum`, so the module
    names are ``create_resnet``'s (``blocks.1.res_blocks.0.branch2.conv_a`` ...) and
    :func:`oct3d.models.load_vanilla` fills the network from a pytorchvideo model.

    Args:
        alpha: octave ratio of res2..res4 (res5 is vanilla, as in the paper), in [0, 1).
        alphas: per-stage ratios (res2..res5) instead; the default is ``(alpha, alpha, alpha, 0)``.
        octave: ``"spatial"`` (the paper's video setting) or ``"spatiotemporal"``.
        pool_first: how strided ratio-0 convolutions (res5's first ``conv_b``) stride. ``None``:
            the official rule, pool then stride-1 conv when any ratio is > 0, so ``alpha=0`` is
            exactly ``create_resnet``'s network. ``True``/``False`` force either.
        stage_depths: blocks per stage instead of ``model_depth`` (50, 101 or 152).

    Returns:
        a pytorchvideo ``Net``; its stages carry :class:`~oct3d.nn.Octave` maps between blocks.
    """
    alphas = (alpha, alpha, alpha, 0.0) if alphas is None else tuple(alphas)
    if len(alphas) != 4:
        raise ValueError(f"alphas must give four ratios (res2..res5), got {alphas!r}")
    alphas = tuple(check_alpha(a, f"alphas[{i}]") for i, a in enumerate(alphas))
    if stage_depths is None:
        if model_depth not in _MODEL_STAGE_DEPTH:
            raise ValueError(f"model_depth must be one of {sorted(_MODEL_STAGE_DEPTH)}, got {model_depth!r}")
        stage_depths = _MODEL_STAGE_DEPTH[model_depth]
    if len(stage_depths) != 4 or any(not isinstance(d, int) or d < 1 for d in stage_depths):
        raise ValueError(f"stage_depths must be four positive ints, got {stage_depths!r}")
    strided_pool_first = resolve_pool_first(pool_first, alphas)

    blocks: list[nn.Module] = [
        create_res_basic_stem(
            in_channels=input_channel, out_channels=stem_dim_out, conv_kernel_size=stem_conv_kernel_size,
            conv_stride=stem_conv_stride, conv_padding=[k // 2 for k in stem_conv_kernel_size], pool=stem_pool,
            pool_kernel_size=stem_pool_kernel_size, pool_stride=stem_pool_stride,
            pool_padding=[k // 2 for k in stem_pool_kernel_size], norm=nn.BatchNorm3d, activation=nn.ReLU,
        )
    ]
    dim_in, dim_out, alpha_in = stem_dim_out, stem_dim_out * 4, 0.0
    for stage, (depth, stage_alpha) in enumerate(zip(stage_depths, alphas)):
        kernels_a = _per_block(stage_conv_a_kernel_size[stage], depth)
        kernel_b = stage_conv_b_kernel_size[stage]
        res_blocks = []
        for index in range(depth):
            block_in = dim_in if index == 0 else dim_out
            block_alpha_in = alpha_in if index == 0 else stage_alpha

            def conv(a_in: float, a_out: float) -> Callable[..., OctaveConv]:
                return OctaveConv.partial(a_in, a_out, octave=octave, pool_first=strided_pool_first)

            res_blocks.append(
                create_res_block(
                    dim_in=block_in, dim_inner=dim_out // 4, dim_out=dim_out, bottleneck=create_bottleneck_block,
                    # A ratio change needs a projection even where pytorchvideo would use the identity.
                    use_shortcut=block_in == dim_out and block_alpha_in != stage_alpha,
                    branch_fusion=OctaveSum(),
                    conv_a_kernel_size=kernels_a[index],
                    conv_a_stride=(stage_temporal_stride[stage] if index == 0 else 1, 1, 1),
                    conv_a_padding=[k // 2 for k in kernels_a[index]],
                    conv_a=conv(block_alpha_in, stage_alpha),
                    conv_b_kernel_size=kernel_b,
                    conv_b_stride=(1, stage_spatial_h_stride[stage], stage_spatial_w_stride[stage])
                    if index == 0 else (1, 1, 1),
                    conv_b_padding=[k // 2 for k in kernel_b],
                    conv_b_num_groups=stage_conv_b_num_groups[stage],
                    conv_b=conv(stage_alpha, stage_alpha),
                    conv_c=conv(stage_alpha, stage_alpha),
                    conv_skip=conv(block_alpha_in, stage_alpha),
                    norm=functools.partial(OctaveBatchNorm, alpha=stage_alpha),
                    activation_bottleneck=OctaveActivation,
                    activation_block=OctaveActivation,
                )
            )
        blocks.append(ResStage(res_blocks=nn.ModuleList(res_blocks)))
        if stage == 0 and stage1_pool is not None:
            blocks.append(_stage1_pool(stage1_pool, stage1_pool_kernel_size, stage_alpha, octave))
        dim_in, dim_out, alpha_in = dim_out, dim_out * 2, stage_alpha
    if alpha_in > 0:
        raise ValueError(f"the last stage must be vanilla (alphas[3] = 0) for pytorchvideo's head, got {alphas!r}")
    blocks.append(
        create_res_basic_head(
            in_features=dim_in, out_features=model_num_class, pool=head_pool, output_size=head_output_size,
            pool_kernel_size=head_pool_kernel_size, dropout_rate=dropout_rate, activation=head_activation,
            output_with_global_average=head_output_with_global_average,
        )
    )
    return init_octave_convs(Net(blocks=nn.ModuleList(blocks)))

