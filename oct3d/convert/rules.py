"""The rule table: what each kind of op does with the octave representation.

Every node of the traced graph is matched against :data:`RULES`, first match wins. A rule
has one of four kinds:

``"conv"``
    A convolution that *produces* a map: it may read an octave map (``alpha_in > 0``), write one
    (``alpha_out > 0``), both or neither. :meth:`Rule.build` returns its replacement module.
``"flow"``
    An op the octave map flows through, branch by branch (norms, activations, dropout, residual
    sums, channel concatenation, pooling, resizing, depthwise convolutions). Its tensor inputs and
    its output are all octave or all plain. :meth:`Rule.emit` writes the per-branch graph code and
    :meth:`Rule.channel_map` says which vanilla channels each output branch holds.
``"meta"``
    Reads only a tensor's metadata (``x.shape``, ``x.size()``, ``x.dim()``): any map may reach it.
``"close"``
    Everything else (flatten, reshape, global pooling, linear layers, attention, channel gating,
    unknown modules and functions, excluded names): its inputs must be plain tensors, so the
    octave closes before it (the producing convolution gets ``alpha_out = 0``).

A flow or conv rule can refuse a particular node (:meth:`Rule.check` returns a reason), which
makes that node closing. To teach the converter a new op, subclass :class:`Rule` (or reuse
:class:`ElementwiseRule` with your own predicate) and put an instance in front of the table:
``octavize(model, rules=[MyRule(), *RULES], ...)``. See docs/convert.md.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize
from torchvision.ops.misc import FrozenBatchNorm2d

from oct3d.convert.core import Context, IncompatibleSplitError, Split, tensor_inputs
from oct3d.convert.layers import (
    KernelConv2d,
    OctBranchNorm,
    OctStochasticDepth,
    crop_low,
    kernel_conv,
    octave_shape,
    octave_size,
    pad_low,
    pool_low,
    resize_low,
    spatial_slices,
)
from oct3d.models.transfer import (
    CHANNEL_ORDER_ATTR,
    partition_conv_weight,
    partition_transposed_weight,
    split_batchnorm,
    split_branch_norm,
)
from oct3d.nn import OctBatchNorm, OctConv
from oct3d.nn.layers import pool_misaligns
from oct3d.nn.transposed import OctConvTranspose, transposed_low_size_ok

__all__ = [
    "RULES",
    "StochasticDepthRule",
    "BatchNormRule",
    "BinaryRule",
    "BranchNormRule",
    "CatRule",
    "CloseRule",
    "ConvRule",
    "ConvTransposeRule",
    "CropRule",
    "DepthwiseConvRule",
    "ElementwiseRule",
    "InterpolateRule",
    "LowFollowsHighRule",
    "MetaRule",
    "PadRule",
    "PoolRule",
    "Rule",
    "conv_geometry_problem",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# torchvision's detection and segmentation backbones freeze their BatchNorm this way: fixed statistics,
# split per branch like a norm's (traced through, its broadcast arithmetic would close every octave).
_BRANCH_NORMS = (*_INSTANCE_NORMS, nn.GroupNorm, FrozenBatchNorm2d)


class Rule:
    """One kind of op. Subclasses set :attr:`name` and :attr:`kind` and override what they need."""

    name: str = "rule"
    kind: str = "close"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        """Whether this rule handles ``node``."""
        raise NotImplementedError

    def leaf(self, module: nn.Module) -> bool:
        """Whether the tracer should stop at ``module`` (call it as one op) rather than trace into it."""
        return False

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        """None when this node can carry (flow) or take and give (conv) octave maps, else why not."""
        return None

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        """The inputs that travel in the same representation as the output (flow rules)."""
        return tensor_inputs(node)

    def channel_map(self, node: fx.Node, splits: Sequence[Split], ctx: Context) -> Split:
        """The output split of a flow node from its data inputs' splits.

        Raises :class:`IncompatibleSplitError` when there is none (the octave then closes before the node).
        """
        if any(s != splits[0] for s in splits[1:]):
            raise IncompatibleSplitError(f"{node.name}: its inputs split their channels differently")
        return splits[0]

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        """Write the per-branch code of an octave flow node into ``em.graph``; return ``(high, low)``."""
        return em.replicate(node)

    def check_splits(self, node: fx.Node, ctx: Context, split_in: Split | None, split_out: Split | None) -> str | None:
        """Conv rules: None when the module can read ``split_in`` / write ``split_out``, else why not.

        The planner asks about one side at a time (the other is None); a refused side's map stays plain.
        """
        return None

    def build(
        self, node: fx.Node, ctx: Context, split_in: Split | None, split_out: Split | None, pool_first: bool
    ) -> nn.Module | None:
        """The module replacing a conv node (None keeps the original), given its input and output splits."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r})"


# --------------------------------------------------------------------------- helpers


def _is_module(node: fx.Node, ctx: Context, types: tuple[type, ...]) -> bool:
    module = ctx.module(node)
    return module is not None and isinstance(module, types)


def _stock_forward(module: nn.Module, types: tuple[type, ...]) -> bool:
    """Whether ``module`` runs the stock ``forward`` of one of ``types`` (not a subclass that changes it);
    a convolution ``octavize`` kept (:class:`~oct3d.convert.layers.KernelConv2d`) computes the stock one."""
    forward = type(module).forward
    return any(forward is t.forward for t in types) or (forward is KernelConv2d.forward and isinstance(module, types))


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _ints(value: object) -> tuple[int, ...]:
    """A module's geometry as Python ints (pytorchvideo builds convolutions with numpy integers)."""
    return tuple(int(v) for v in value)


def _tuple(value: object, dims: int) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral):
        return (int(value),) * dims
    value = _ints(value)
    return value * dims if len(value) == 1 else value


def _replacement_would_drop(module: nn.Module) -> str | None:
    """Why a module cannot be replaced by a new octave module without losing something attached to it,
    or None: a parametrization (weight_norm, spectral_norm) or hooks (pruning, old-style weight_norm,
    a user's feature or gradient hooks) live on the module object, not in its state dict."""
    if parametrize.is_parametrized(module):
        return "a parametrized weight (weight_norm, spectral_norm, ...), which an octave layer would drop"
    if module._forward_pre_hooks or module._forward_hooks:
        return "forward hooks (old-style weight_norm or spectral_norm, pruning, ...), which an octave layer would drop"
    if module._backward_hooks or module._backward_pre_hooks:
        return "backward hooks, which an octave layer would drop"
    return None


def conv_geometry_problem(module: nn.Module) -> str | None:
    """None when a vanilla ``ConvNd`` maps onto :class:`~oct3d.nn.OctConv` exactly, else why not.

    OctConv takes odd kernels with "same" padding (in any of ``nn.ConvNd``'s padding modes) and stride
    1 or 2 per axis; then a stride-2 octave layer's output has the vanilla layer's size (``ceil(n / 2)``)
    on every input size.
    """
    if not _stock_forward(module, _CONVS):
        return f"{type(module).__name__} overrides the convolution's forward"
    kept = _replacement_would_drop(module)
    if kept:
        return kept
    kernel, stride, dilation = _ints(module.kernel_size), _ints(module.stride), module.dilation
    if any(k % 2 == 0 for k in kernel):
        return f"even kernel {kernel}"
    if any(s not in (1, 2) for s in stride):
        return f"stride {stride} (only 1 or 2)"
    same = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    padding = module.padding
    if isinstance(padding, str):
        padding = same if padding == "same" else (0,) * len(kernel)
    if tuple(padding) != same:
        return f"padding {tuple(padding)} is not 'same' ({same}) for kernel {kernel}"
    return None


# --------------------------------------------------------------------------- conv kinds


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d`` -> :class:`~oct3d.nn.OctConv`, weights partitioned as ``load_vanilla`` does.

    Grouped layers (ResNeXt) keep octaves only where every branch divides by the groups; their weights
    then keep the block-diagonal part of each partition (a warm start at ``alpha > 0``, as for ``load_vanilla``).

    With no octave on either side the original module is kept, except that a strided layer becomes
    ``OctConv(0, 0, pool_first=True)`` when the network's ``pool_first`` asks for it.
    """

    name = "conv"
    kind = "conv"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _CONVS)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _is_module(node, ctx, _CONVS) and not _depthwise(ctx.module(node))

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        return conv_geometry_problem(ctx.module(node))

    def check_splits(self, node: fx.Node, ctx: Context, split_in: Split | None, split_out: Split | None) -> str | None:
        groups = ctx.module(node).groups
        if groups == 1:
            return None
        # Grouped (ResNeXt): every branch must divide by the groups, and the input must be in vanilla order.
        for split in (split_in, split_out):
            if split is not None and (not split.is_natural or len(split.high) % groups or len(split.low) % groups):
                return f"a grouped convolution (groups={groups}) needs each branch to divide by its groups"
        return None

    def build(
        self, node: fx.Node, ctx: Context, split_in: Split | None, split_out: Split | None, pool_first: bool
    ) -> nn.Module | None:
        module = ctx.module(node)
        if split_in is None and split_out is None:
            strided = _pool_first_conv(module, ctx) if pool_first and conv_geometry_problem(module) is None else None
            return strided if strided is not None else kernel_conv(module)
        dims = module.weight.dim() - 2
        conv = OctConv(
            dims, module.in_channels, module.out_channels, _ints(module.kernel_size),
            alpha_in=0.0 if split_in is None else split_in.alpha,
            alpha_out=0.0 if split_out is None else split_out.alpha,
            stride=_ints(module.stride), dilation=_ints(module.dilation), groups=module.groups,
            bias=module.bias is not None,
            octave=ctx.octave_for(dims), padding_mode=module.padding_mode,
        )
        order = None if split_in is None or split_in.is_natural else split_in.order
        conv.load_state_dict(partition_conv_weight(conv, module.weight, module.bias, in_order=order))
        _keep_channel_order(conv, order)
        return conv.to(module.weight.device, module.weight.dtype)


def _keep_channel_order(module: nn.Module, order: torch.Tensor | None) -> None:
    """Record a permuted input order on the converted module, for ``load_vanilla`` to slice vanilla weights alike."""
    if order is not None:
        setattr(module, CHANNEL_ORDER_ATTR, [int(i) for i in order])


def _bias_kwarg(norm: nn.Module) -> dict[str, bool]:
    """``{"bias": False}`` for an affine norm built with ``bias=False`` (a scale, no shift), else nothing
    (older torch versions take no ``bias`` argument)."""
    return {"bias": False} if getattr(norm, "affine", False) and getattr(norm, "bias", None) is None else {}


def _depthwise(module: nn.Module) -> bool:
    return module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _pool_first_conv(module: nn.Module, ctx: Context) -> nn.Module | None:
    """A strided vanilla convolution as ``OctConv(0, 0, pool_first=True)``: pool by the stride, convolve at stride 1."""
    if all(s == 1 for s in _ints(module.stride)):
        return None
    dims = module.weight.dim() - 2
    conv = OctConv(
        dims, module.in_channels, module.out_channels, _ints(module.kernel_size), 0.0, 0.0, _ints(module.stride),
        dilation=_ints(module.dilation), groups=module.groups, bias=module.bias is not None,
        octave=ctx.octave_for(dims),
        pool_first=True, padding_mode=module.padding_mode,
    )
    conv.load_state_dict(partition_conv_weight(conv, module.weight, module.bias))
    return conv.to(module.weight.device, module.weight.dtype)


class DepthwiseConvRule(Rule):
    """Depthwise ``ConvNd`` (``groups == in == out``): each branch convolves its own channels (a flow op).

    Replaced by a depthwise :class:`~oct3d.nn.OctConv` (only ``h2h`` and ``l2l``), whose split is the input's.
    """

    name = "depthwise conv"
    kind = "flow"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _is_module(node, ctx, _CONVS) and _depthwise(ctx.module(node))

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        return conv_geometry_problem(ctx.module(node))

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]]

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        module = em.ctx.module(node)
        split = em.split(node.args[0])
        dims = module.weight.dim() - 2
        conv = OctConv(
            dims, module.in_channels, module.out_channels, _ints(module.kernel_size), split.alpha, split.alpha,
            _ints(module.stride), dilation=_ints(module.dilation), groups=module.groups,
            bias=module.bias is not None,
            octave=em.ctx.octave_for(dims), padding_mode=module.padding_mode,
        )
        order = None if split.is_natural else split.order
        conv.load_state_dict(partition_conv_weight(conv, module.weight, module.bias, in_order=order))
        _keep_channel_order(conv, order)
        em.set_module(node.target, conv.to(module.weight.device, module.weight.dtype))
        return em.call_octave_module(node.target, node.args[0], node.name)

    def build(
        self, node: fx.Node, ctx: Context, split_in: Split | None, split_out: Split | None, pool_first: bool
    ) -> nn.Module | None:
        module = ctx.module(node)
        return _pool_first_conv(module, ctx) if pool_first and conv_geometry_problem(module) is None else None


class ConvTransposeRule(Rule):
    """``nn.ConvTranspose1d/2d/3d`` (groups 1) -> :class:`~oct3d.nn.transposed.OctConvTranspose`."""

    name = "conv-transpose"
    kind = "conv"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _CONV_TS)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _is_module(node, ctx, _CONV_TS)

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        module = ctx.module(node)
        if not _stock_forward(module, _CONV_TS):
            return f"{type(module).__name__} overrides the transposed convolution's forward"
        if module.groups != 1 or any(d != 1 for d in _ints(module.dilation)) or module.padding_mode != "zeros":
            return "grouped, dilated or non-zero-padded transposed convolution"
        if len(node.args) > 1 or node.kwargs:
            return "called with an output_size"
        dims = module.weight.dim() - 2
        if not transposed_low_size_ok(
            _ints(module.kernel_size), _ints(module.stride), _ints(module.padding), _ints(module.output_padding),
            ctx.factors(dims),
        ):
            return "its geometry cannot keep the low branch at half the high branch's size"
        return None

    def build(
        self, node: fx.Node, ctx: Context, split_in: Split | None, split_out: Split | None, pool_first: bool
    ) -> nn.Module | None:
        if split_in is None and split_out is None:
            return None
        module = ctx.module(node)
        dims = module.weight.dim() - 2
        conv = OctConvTranspose(
            dims, module.in_channels, module.out_channels, _ints(module.kernel_size),
            alpha_in=0.0 if split_in is None else split_in.alpha,
            alpha_out=0.0 if split_out is None else split_out.alpha,
            stride=_ints(module.stride), padding=_ints(module.padding), output_padding=_ints(module.output_padding),
            bias=module.bias is not None, octave=ctx.octave_for(dims),
        )
        order = None if split_in is None or split_in.is_natural else split_in.order
        conv.load_state_dict(partition_transposed_weight(conv, module.weight, module.bias, in_order=order))
        _keep_channel_order(conv, order)
        return conv.to(module.weight.device, module.weight.dtype)


# --------------------------------------------------------------------------- norms


class BatchNormRule(Rule):
    """``nn.BatchNormNd`` -> :class:`~oct3d.nn.OctBatchNorm` (``bn_h``/``bn_l``; statistics split as by
    ``load_vanilla``)."""

    name = "batchnorm"
    kind = "flow"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _BNS)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _is_module(node, ctx, _BNS)

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        module = ctx.module(node)
        if not _stock_forward(module, _BNS):
            return f"{type(module).__name__} overrides BatchNorm's forward"
        kept = _replacement_would_drop(module)
        if kept:
            return kept
        shape = ctx.shape(node)
        if shape is None or len(shape) < 3:
            return "BatchNorm over a map without spatial axes"
        return None

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]]

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        module = em.ctx.module(node)
        split = em.split(node.args[0])
        dims = len(em.ctx.shape(node)) - 2
        bn = OctBatchNorm(
            dims, module.num_features, split.alpha, eps=module.eps, momentum=module.momentum, affine=module.affine,
            track_running_stats=module.track_running_stats, **_bias_kwarg(module),
        )
        order = None if split.is_natural else split.order
        bn.load_state_dict(split_batchnorm(bn, module, order))
        _keep_channel_order(bn, order)
        ref = module.weight if module.weight is not None else module.running_mean
        em.set_module(node.target, bn if ref is None else bn.to(ref.device, ref.dtype))
        return em.call_octave_module(node.target, node.args[0], node.name)


class BranchNormRule(Rule):
    """``nn.InstanceNormNd``, ``nn.GroupNorm`` and torchvision's ``FrozenBatchNorm2d`` ->
    :class:`~oct3d.convert.layers.OctBranchNorm`.

    GroupNorm flows only when every group lies wholly in one branch (the channels per group divide
    both branches, in order); else the octave closes before it.
    """

    name = "instance/group norm"
    kind = "flow"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _BRANCH_NORMS)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _is_module(node, ctx, _BRANCH_NORMS)

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        module = ctx.module(node)
        if not _stock_forward(module, _BRANCH_NORMS):
            return f"{type(module).__name__} overrides the norm's forward"
        kept = _replacement_would_drop(module)
        if kept:
            return kept
        shape = ctx.shape(node)
        if shape is None or len(shape) < 3:
            return "norm over a map without spatial axes"
        return None

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]]

    def channel_map(self, node: fx.Node, splits: Sequence[Split], ctx: Context) -> Split:
        module = ctx.module(node)
        split = splits[0]
        if isinstance(module, nn.GroupNorm):
            per_group = module.num_channels // module.num_groups
            for part in (split.high, split.low):
                chunks = [part[i : i + per_group] for i in range(0, len(part), per_group)]
                if len(part) % per_group or any(
                    c != tuple(range(c[0], c[0] + per_group)) or c[0] % per_group for c in chunks
                ):
                    raise IncompatibleSplitError(
                        f"{node.name}: GroupNorm's groups of {per_group} channels straddle the branches"
                    )
        return split

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        module = em.ctx.module(node)
        split = em.split(node.args[0])
        c_h, c_l = len(split.high), len(split.low)
        if isinstance(module, nn.GroupNorm):
            per_group = module.num_channels // module.num_groups
            norm_h = nn.GroupNorm(c_h // per_group, c_h, module.eps, module.affine, **_bias_kwarg(module))
            norm_l = nn.GroupNorm(c_l // per_group, c_l, module.eps, module.affine, **_bias_kwarg(module))
        elif isinstance(module, FrozenBatchNorm2d):
            norm_h, norm_l = FrozenBatchNorm2d(c_h, module.eps), FrozenBatchNorm2d(c_l, module.eps)
        else:
            kind = type(module)
            kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                          track_running_stats=module.track_running_stats, **_bias_kwarg(module))
            norm_h, norm_l = kind(c_h, **kwargs), kind(c_l, **kwargs)
        branch = OctBranchNorm(norm_h, norm_l)
        state = module.state_dict()
        order = None if split.is_natural else split.order
        branch.load_state_dict(split_branch_norm(branch, state, "", order))
        _keep_channel_order(branch, order)
        ref = next(iter(state.values()), None)
        em.set_module(node.target, branch if ref is None else branch.to(ref.device, ref.dtype))
        # One call of the OctBranchNorm (not one per branch norm), so the module itself, with its channel
        # order for load_vanilla, stays in the converted network.
        return em.call_octave_module(node.target, node.args[0], node.name)


# --------------------------------------------------------------------------- elementwise, sums, concatenation

_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.PReLU,
)
_ELEMENTWISE_FUNCTIONS: set[Callable] = {
    torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clamp, torch.clip, operator.neg, torch.neg,
    torch.abs, torch.exp,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_", "contiguous",
    "clone", "neg", "abs", "exp", "float", "half", "bfloat16", "double",
}


def _stochastic_depth_types() -> tuple[type, ...]:
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # torchvision is a dependency, but the converter does not need it
        return ()
    return (StochasticDepth,)


class ElementwiseRule(Rule):
    """Activations, dropout, identity and other one-input elementwise ops: the same op on each branch.

    ``nn.PReLU`` flows only with a single shared slope.
    """

    name = "elementwise"
    kind = "flow"

    def __init__(
        self, modules: tuple[type, ...] | None = None, functions: set[Callable] | None = None,
        methods: set[str] | None = None,
    ) -> None:
        self.modules = _ELEMENTWISE_MODULES if modules is None else modules
        self.functions = _ELEMENTWISE_FUNCTIONS if functions is None else functions
        self.methods = _ELEMENTWISE_METHODS if methods is None else methods

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, self.modules)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            return _is_module(node, ctx, self.modules)
        if node.op == "call_function":
            return node.target in self.functions
        return node.op == "call_method" and node.target in self.methods

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        module = ctx.module(node)
        if isinstance(module, nn.PReLU) and module.num_parameters != 1:
            return "PReLU with a slope per channel"
        inputs = tensor_inputs(node)
        if len(inputs) != 1 or ctx.shape(inputs[0]) != ctx.shape(node):
            return "not a one-tensor elementwise call"
        return None

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return tensor_inputs(node)


class StochasticDepthRule(Rule):
    """torchvision's ``StochasticDepth`` -> :class:`~oct3d.convert.layers.OctStochasticDepth`: one mask for both
    branches. Traced as one op, not into its ``self.training`` test (which fx would freeze)."""

    name = "stochastic depth"
    kind = "flow"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _stochastic_depth_types())

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return _is_module(node, ctx, _stochastic_depth_types())

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]]

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        module = em.ctx.module(node)
        em.set_module(node.target, OctStochasticDepth(module.p, module.mode))
        return em.unpack(em.call_module(node.target, em.pair(node.args[0]), name=node.name), node.name)


_BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}


class BinaryRule(Rule):
    """Sums, differences and products of same-shaped maps (residual sums, in place too), or of a map and a
    scalar: the op per branch. A product with a broadcast tensor (channel gating, squeeze-excitation) closes."""

    name = "add/mul"
    kind = "flow"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_function":
            return node.target in _BINARY_FUNCTIONS
        return node.op == "call_method" and node.target in _BINARY_METHODS

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        out = ctx.shape(node)
        inputs = tensor_inputs(node)
        if not inputs or any(ctx.shape(n) != out for n in inputs):
            return "operands of different shapes (broadcasting, e.g. channel gating)"
        return None


class CatRule(Rule):
    """``torch.cat`` along the channel axis: the high pieces concatenate, and so do the low pieces."""

    name = "channel concat"
    kind = "flow"
    functions = (torch.cat, torch.concat, torch.concatenate)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return node.op == "call_function" and node.target in self.functions

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        shape = ctx.shape(node)
        dim = _arg(node, 1, "dim", 0)
        if shape is None or not isinstance(dim, int) or dim % len(shape) != 1:
            return "concatenation along another axis than the channels"
        pieces = _arg(node, 0, "tensors")
        if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
            return "concatenation of a computed sequence"
        return None

    def channel_map(self, node: fx.Node, splits: Sequence[Split], ctx: Context) -> Split:
        pieces = _arg(node, 0, "tensors")
        by_node = dict(zip(self.data_inputs(node, ctx), splits))
        high: list[int] = []
        low: list[int] = []
        offset = 0
        for piece in pieces:
            split = by_node[piece]
            high += [offset + c for c in split.high]
            low += [offset + c for c in split.low]
            offset += split.channels
        return Split(tuple(high), tuple(low))


# --------------------------------------------------------------------------- resampling

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_MAX_POOL_FNS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL_FNS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


def _pool_params(node: fx.Node, ctx: Context) -> dict | None:
    """``kind, kernel, stride, padding, dilation, count_include_pad`` of a pooling node, None if unsupported."""
    module = ctx.module(node)
    shape = ctx.shape(node)
    if shape is None:
        return None
    dims = len(shape) - 2
    if module is not None:
        if getattr(module, "return_indices", False) or getattr(module, "divisor_override", None):
            return None
        kind = "max" if isinstance(module, _MAX_POOLS) else "avg"
        kernel, stride, padding = module.kernel_size, module.stride, module.padding
        dilation = getattr(module, "dilation", 1)
        count_include_pad = getattr(module, "count_include_pad", True)
        ceil_mode = module.ceil_mode
    else:
        kind = "max" if node.target in _MAX_POOL_FNS else "avg"
        kernel = _arg(node, 1, "kernel_size")
        stride = _arg(node, 2, "stride") or kernel
        padding = _arg(node, 3, "padding", 0)
        if kind == "max":
            dilation = _arg(node, 4, "dilation", 1)
            ceil_mode = _arg(node, 5, "ceil_mode", False)
            count_include_pad = True
            if _arg(node, 6, "return_indices", False):
                return None
        else:
            dilation = 1
            ceil_mode = _arg(node, 4, "ceil_mode", False)
            count_include_pad = _arg(node, 5, "count_include_pad", True)
            if _arg(node, 6, "divisor_override", None):
                return None
    try:
        values = [_tuple(v, dims) for v in (kernel, stride or kernel, padding, dilation)]
    except TypeError:
        return None
    return dict(kind=kind, kernel_size=values[0], stride=values[1], padding=values[2], dilation=values[3],
                count_include_pad=bool(count_include_pad), ceil_mode=bool(ceil_mode))


class PoolRule(Rule):
    """Max and average pooling (modules and functions): the same window on each branch.

    The low branch pools in ceil mode and is cropped to the octave low size of the pooled high
    branch (:func:`~oct3d.convert.layers.pool_low`), so odd sizes stay aligned.
    """

    name = "max/avg pool"
    kind = "flow"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _MAX_POOLS + _AVG_POOLS)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            return _is_module(node, ctx, _MAX_POOLS + _AVG_POOLS)
        return node.op == "call_function" and (node.target in _MAX_POOL_FNS or node.target in _AVG_POOL_FNS)

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        params = _pool_params(node, ctx)
        if params is None:
            return "pooling with indices, a divisor override or unknown arguments"
        dims = len(ctx.shape(node)) - 2
        # On every input size, not only the example's: the converted network must run wherever the original does.
        size = pool_misaligns(params["kernel_size"], params["stride"], params["padding"], params["dilation"],
                              params["ceil_mode"], ctx.factors(dims))
        if size is not None:
            return (f"kernel {params['kernel_size']} / stride {params['stride']} / padding {params['padding']}"
                    f"{' / ceil_mode' if params['ceil_mode'] else ''} cannot keep the low branch at half the high "
                    f"one on every input size (e.g. a map of {size} on an octave axis)")
        return None

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]]

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        high, low = em.pair(node.args[0])
        high_out = em.copy_with(node, {node.args[0]: high}, f"{node.name}_h")
        params = _pool_params(node, em.ctx)
        factors = em.ctx.factors(len(em.ctx.shape(node)) - 2)
        low_out = em.call_function(
            pool_low,
            (low, high_out, factors, params["kind"], params["kernel_size"], params["stride"], params["padding"],
             params["dilation"], params["count_include_pad"]),
            name=f"{node.name}_l",
        )
        return high_out, low_out


_INTERPOLATE_FNS = {F.interpolate, F.upsample}


class LowFollowsHighRule(Rule):
    """A flow op on one map that changes its spatial size: the high branch runs the op as written, and
    :meth:`low_branch` fits the low branch to the high result (resize, pad, crop), so both stay aligned."""

    kind = "flow"

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]]

    def emit(self, node: fx.Node, em) -> tuple[fx.Node, fx.Node]:
        source = self.data_inputs(node, em.ctx)[0]
        high, low = em.pair(source)
        high_out = em.copy_with(node, {source: high}, f"{node.name}_h")
        factors = em.ctx.factors(len(em.ctx.shape(node)) - 2)
        return high_out, self.low_branch(node, em, high, low, high_out, factors)

    def low_branch(self, node: fx.Node, em, high: fx.Node, low: fx.Node, high_out: fx.Node,
                   factors: tuple[int, ...]) -> fx.Node:
        """The graph node of the low branch, from the input's branches and the high result."""
        raise NotImplementedError


class InterpolateRule(LowFollowsHighRule):
    """``F.interpolate`` and ``nn.Upsample``: the high branch as the original, the low branch resized to the
    octave low size of the result (:func:`~oct3d.convert.layers.resize_low`) with the same mode."""

    name = "interpolate/upsample"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Upsample)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            return _is_module(node, ctx, (nn.Upsample,))
        return node.op == "call_function" and node.target in _INTERPOLATE_FNS

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        shape = ctx.shape(node)
        if shape is None or len(shape) < 3:
            return "resize of a map without spatial axes"
        if node.op == "call_module" and not _stock_forward(ctx.module(node), (nn.Upsample,)):
            return "Upsample subclass with its own forward"
        return None

    def data_inputs(self, node: fx.Node, ctx: Context) -> list[fx.Node]:
        return [node.args[0]] if node.args else [node.kwargs["input"]]

    def low_branch(self, node: fx.Node, em, high: fx.Node, low: fx.Node, high_out: fx.Node,
                   factors: tuple[int, ...]) -> fx.Node:
        module = em.ctx.module(node)
        if module is not None:
            mode, align_corners = module.mode, module.align_corners
        else:
            mode, align_corners = _arg(node, 3, "mode", "nearest"), _arg(node, 4, "align_corners", None)
        return em.call_function(resize_low, (low, high_out, factors, mode, align_corners), name=f"{node.name}_l")


_PAD_MODULES = (
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d,
)


def _pad_params(node: fx.Node, ctx: Context) -> tuple[tuple[int, ...], str, float | None] | None:
    module = ctx.module(node)
    if module is not None:
        pad = module.padding
        if isinstance(module, (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)):
            mode, value = "replicate", None
        elif isinstance(module, (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)):
            mode, value = "reflect", None
        else:
            mode, value = "constant", getattr(module, "value", 0.0)
    else:
        pad, mode, value = _arg(node, 1, "pad"), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    if not isinstance(pad, (list, tuple)) or not all(isinstance(p, int) for p in pad) or not isinstance(mode, str):
        return None
    return tuple(pad), mode, value


class PadRule(LowFollowsHighRule):
    """``F.pad`` and the padding modules with fixed pads on spatial axes: the high branch as the original, the
    low branch padded to the octave low size of the result (:func:`~oct3d.convert.layers.pad_low`)."""

    name = "pad"

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, _PAD_MODULES)

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_module":
            return _is_module(node, ctx, _PAD_MODULES)
        return node.op == "call_function" and node.target in (F.pad, torch.constant_pad_nd)

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        params = _pad_params(node, ctx)
        shape = ctx.shape(node)
        if params is None or len(params[0]) % 2 or len(params[0]) > 2 * (len(shape) - 2):
            return "padding that is not fixed or reaches the channel axis"
        return None

    def low_branch(self, node: fx.Node, em, high: fx.Node, low: fx.Node, high_out: fx.Node,
                   factors: tuple[int, ...]) -> fx.Node:
        pad, mode, value = _pad_params(node, em.ctx)
        return em.call_function(pad_low, (low, high_out, pad, factors, mode, value), name=f"{node.name}_l")


class CropRule(LowFollowsHighRule):
    """``x[..., a:b, c:d]``: slices of spatial axes with step 1 (a U-Net cropping a skip to the upsampled map's
    size): the high branch as the original, the low branch cut to the matching region and to the octave low
    size of the result (:func:`~oct3d.convert.layers.crop_low`)."""

    name = "crop"

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
            return False
        shape = ctx.shape(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        index = node.args[1]
        items = index if isinstance(index, tuple) else (index,)
        return shape is not None and len(shape) >= 3 and all(isinstance(i, slice) or i is Ellipsis for i in items)

    def check(self, node: fx.Node, ctx: Context) -> str | None:
        if spatial_slices(node.args[1], len(ctx.shape(node.args[0]))) is None:
            return "slicing that is not a crop of spatial axes with step 1"
        return None

    def low_branch(self, node: fx.Node, em, high: fx.Node, low: fx.Node, high_out: fx.Node,
                   factors: tuple[int, ...]) -> fx.Node:
        index = fx.node.map_arg(node.args[1], em.plain)  # slice bounds read from shapes are graph values too
        return em.call_function(crop_low, (low, high, high_out, index, factors), name=f"{node.name}_l")


# --------------------------------------------------------------------------- metadata and closing ops


class MetaRule(Rule):
    """``x.shape``, ``x.size()``, ``x.dim()``, ``x.ndim``, ``x.dtype``, ``x.device`` read the vanilla map's metadata.

    On an octave map they are answered from both branches (:func:`~oct3d.convert.layers.octave_shape`),
    so the channel count stays the vanilla one.
    """

    name = "shape/metadata"
    kind = "meta"
    attributes = ("shape", "ndim", "dtype", "device", "is_cuda")

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] in self.attributes
        return node.op == "call_method" and node.target in ("size", "dim")

    def emit(self, node: fx.Node, em) -> fx.Node:
        source = node.args[0]
        high, low = em.pair(source)
        if node.op == "call_function" and node.args[1] == "shape":
            out = em.call_function(octave_shape, (high, low), name=node.name)
        elif node.op == "call_method" and node.target == "size":
            out = em.call_function(octave_size, (high, low, *node.args[1:]), dict(node.kwargs), name=node.name)
        else:
            out = em.copy_with(node, {source: high}, node.name)
        return out


class CloseRule(Rule):
    """Ops the octave representation cannot flow through: their tensor inputs must be plain tensors.

    The instances in :data:`RULES` only name common cases for messages and docs; anything no rule
    matches closes too.
    """

    kind = "close"

    def __init__(self, name: str, predicate: Callable[[fx.Node, Context], bool], leaf_types: tuple[type, ...] = ()):
        self.name = name
        self.predicate = predicate
        self.leaf_types = leaf_types

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return self.predicate(node, ctx)

    def leaf(self, module: nn.Module) -> bool:
        return isinstance(module, self.leaf_types)


def _targets(*targets: object) -> Callable[[fx.Node, Context], bool]:
    names = {t for t in targets if isinstance(t, str)}
    functions = {t for t in targets if not isinstance(t, str)}
    return lambda node, ctx: (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in names
    )


def _modules(*types: type) -> Callable[[fx.Node, Context], bool]:
    return lambda node, ctx: _is_module(node, ctx, types)


def _oct3d_modules() -> tuple[type, ...]:
    from oct3d.convert.layers import OctBranchNorm as _Branch
    from oct3d.nn import OctAvgPool, OctGlobalAvgPool, OctMap, OctMaxPool

    return (OctConv, OctBatchNorm, OctMap, OctMaxPool, OctAvgPool, OctGlobalAvgPool, OctConvTranspose, _Branch)


def _einops_layers() -> tuple[type, ...]:
    # einops' layers (MONAI's ViT, UNETR, SwinUNETR use Rearrange) parse their pattern on the first call,
    # which a torch.fx Proxy cannot answer: traced as one op, they close the octave instead of failing.
    try:
        from einops.layers import torch as einops_torch
    except ImportError:
        return ()
    names = ("Rearrange", "Reduce", "EinMix")
    return tuple(getattr(einops_torch, name) for name in names if hasattr(einops_torch, name))


_ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

#: The rule table, first match wins. Extend it by passing ``rules=[MyRule(), *RULES]`` to ``octavize``.
RULES: list[Rule] = [
    ConvRule(),
    DepthwiseConvRule(),
    ConvTransposeRule(),
    BatchNormRule(),
    BranchNormRule(),
    ElementwiseRule(),
    StochasticDepthRule(),
    BinaryRule(),
    CatRule(),
    PoolRule(),
    InterpolateRule(),
    PadRule(),
    CropRule(),
    MetaRule(),
    CloseRule("flatten/reshape", _targets(torch.flatten, torch.reshape, "flatten", "view", "reshape", "permute",
                                          "transpose", "squeeze", "unsqueeze", torch.squeeze, torch.unsqueeze)),
    CloseRule("global pooling", lambda node, ctx: _modules(*_ADAPTIVE_POOLS)(node, ctx) or _targets(
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
        F.adaptive_max_pool2d, F.adaptive_max_pool3d)(node, ctx)),
    CloseRule("mean/sum reduction", _targets(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax", "max")),
    CloseRule("linear", _modules(nn.Linear, nn.Bilinear, nn.LayerNorm)),
    CloseRule("attention", _modules(nn.MultiheadAttention), leaf_types=(nn.MultiheadAttention,)),
    CloseRule("einops layer", _modules(*_einops_layers()), leaf_types=_einops_layers()),
    CloseRule("oct3d octave module (already converted)", _modules(*_oct3d_modules()), leaf_types=_oct3d_modules()),
]
