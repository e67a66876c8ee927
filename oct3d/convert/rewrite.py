"""Writing the converted graph: each octave map becomes two fx values, ``<name>_h`` and ``<name>_l``.

Plain nodes are copied as they are. Octave flow nodes are written by their rule (the same op on
each branch, or a rule-specific low branch). Convolutions call their replacement module (an
``OctConv`` under the original name) with an ``Octave(high, low)`` and unpack its result, so
state-dict keys follow the original names (``layer1.0.conv1.h2h.weight``) and ``oct3d.fuse`` finds
the conv -> BatchNorm pairs.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from oct3d.convert.core import Context, Split
from oct3d.convert.layers import octave_split
from oct3d.convert.plan import Plan
from oct3d.convert.trace import checked_codegen, mutable_copy
from oct3d.nn.octave import Octave

__all__ = ["Emitter", "rewrite"]

Pair = tuple[fx.Node, fx.Node]


class Emitter:
    """The state of one rewrite, handed to the rules' :meth:`~oct3d.convert.rules.Rule.emit`."""

    def __init__(self, ctx: Context, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node | Pair] = {}
        self.replaced: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------ values
    def is_octave(self, node: fx.Node) -> bool:
        """Whether ``node``'s value in the new graph is an octave pair."""
        return isinstance(self.env.get(node), tuple)

    def pair(self, node: fx.Node) -> Pair:
        """The ``(high, low)`` nodes of an octave map."""
        value = self.env[node]
        if not isinstance(value, tuple):
            raise AssertionError(f"{node.name} is not an octave map")
        return value

    def plain(self, node: fx.Node) -> fx.Node:
        """The new-graph node of a plain map (or of any non-tensor value)."""
        value = self.env[node]
        if isinstance(value, tuple):
            raise AssertionError(f"{node.name} is an octave map where a plain tensor is needed")
        return value

    def split(self, node: fx.Node) -> Split:
        """Which vanilla channels each branch of the octave map ``node`` holds."""
        return self.plan.splits[node]

    # ------------------------------------------------------------------ writing
    def call_function(self, fn: Any, args: tuple, kwargs: Mapping | None = None, name: str | None = None) -> fx.Node:
        """Append a call of ``fn`` to the new graph."""
        return self.graph.create_node("call_function", fn, args, dict(kwargs or {}), name=name)

    def call_module(self, target: str, args: tuple, name: str | None = None) -> fx.Node:
        """Append a call of the converted model's module ``target`` to the new graph."""
        return self.graph.create_node("call_module", target, args, {}, name=name)

    def set_module(self, target: str, module: nn.Module) -> None:
        """Put ``module`` in place of the original module ``target`` in the converted model."""
        self.replaced[target] = module

    def copy_with(self, node: fx.Node, substitute: Mapping[fx.Node, fx.Node], name: str) -> fx.Node:
        """``node`` with some inputs substituted (the others plain), under ``name``."""
        def arg(n: fx.Node) -> fx.Node:
            return substitute[n] if n in substitute else self.plain(n)

        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        return self.graph.create_node(node.op, node.target, args, kwargs, name=name)

    def replicate(self, node: fx.Node) -> Pair:
        """The same op once on the high branches and once on the low branches of its octave inputs."""
        out = []
        for branch, suffix in ((0, "h"), (1, "l")):
            def arg(n: fx.Node, branch: int = branch) -> fx.Node:
                return self.pair(n)[branch] if self.is_octave(n) else self.plain(n)

            args = fx.node.map_arg(node.args, arg)
            kwargs = fx.node.map_arg(node.kwargs, arg)
            out.append(self.graph.create_node(node.op, node.target, args, kwargs, name=f"{node.name}_{suffix}"))
        return out[0], out[1]

    def pack(self, node: fx.Node) -> fx.Node:
        """An ``Octave(high, low)`` of an octave map, or the plain node."""
        if not self.is_octave(node):
            return self.plain(node)
        high, low = self.pair(node)
        return self.call_function(Octave, (high, low), name=f"{node.name}_octave")

    def unpack(self, value: fx.Node, name: str) -> Pair:
        """``(value[0], value[1])``: the branches of an ``Octave`` returned by a module."""
        high = self.call_function(operator.getitem, (value, 0), name=f"{name}_h")
        low = self.call_function(operator.getitem, (value, 1), name=f"{name}_l")
        return high, low

    def call_octave_module(self, target: str, source: fx.Node, name: str) -> Pair:
        """Call module ``target`` on the octave map ``source`` and unpack the ``Octave`` it returns."""
        return self.unpack(self.call_module(target, (self.pack(source),), name=name), name)


def rewrite(gm: fx.GraphModule, ctx: Context, plan: Plan, class_name: str) -> fx.GraphModule:
    """The converted ``GraphModule`` of ``gm`` under ``plan``; replaced modules are new, the rest shared."""
    em = Emitter(ctx, plan)
    for node in gm.graph.nodes:
        kind = plan.kinds[node]
        if kind == "conv":
            conv = plan.convs[node]
            stem = node in plan.stems
            module = plan.rules[node].build(node, ctx, conv.split_in, conv.split_out, plan.pool_first and not stem)
            if module is not None:
                em.set_module(node.target, module)
            if conv.split_in is None and conv.split_out is None:
                em.env[node] = em.graph.node_copy(node, em.plain)
            else:
                out = em.call_module(node.target, (em.pack(node.args[0]),), name=node.name)
                em.env[node] = em.unpack(out, node.name) if conv.split_out is not None else out
        elif kind == "flow" and plan.is_octave(node) and node in plan.resplit:
            # The plain operands of a residual sum or concatenation with octaves: split them first.
            dims = len(ctx.shape(node)) - 2
            saved = {}
            for operand in plan.resplit[node]:
                low = len(plan.resplit_splits[(node, operand)].low)
                packed = em.call_function(
                    octave_split, (em.plain(operand), low, ctx.factors(dims)), name=f"{operand.name}_split"
                )
                saved[operand] = em.env[operand]
                em.env[operand] = em.unpack(packed, f"{operand.name}_split")
            em.env[node] = plan.rules[node].emit(node, em)
            em.env.update(saved)
        elif (kind == "flow" and plan.is_octave(node)) or (
            kind == "meta" and any(em.is_octave(n) for n in node.all_input_nodes)
        ):
            em.env[node] = plan.rules[node].emit(node, em)
        else:
            if kind == "flow" and node.op == "call_module":
                # A plain strided depthwise convolution still follows pool_first.
                module = plan.rules[node].build(node, ctx, None, None, plan.pool_first and node not in plan.stems)
                if module is not None:
                    em.set_module(node.target, module)
            copied = em.graph.node_copy(node, em.plain)
            if node.op == "call_module":
                # A kept module may write into a list it is given (pytorchvideo's SlowFast blocks do). fx's
                # Interpreter, which torch.export runs the converted graph through, hands lists over as
                # immutable: give such arguments a fresh copy, as the original model's own code would.
                with em.graph.inserting_before(copied):
                    copied.args = tuple(
                        em.call_function(mutable_copy, (new,), name=f"{node.name}_arg{i}") if _may_be_list(old)
                        else new
                        for i, (old, new) in enumerate(zip(node.args, copied.args))
                    )
            em.env[node] = copied
    root = _root_with(gm, em.replaced)
    # The input/output handling of the traced graph (list arguments flattened into placeholders) carries over.
    em.graph._codegen = checked_codegen(gm.graph._codegen)
    result = fx.GraphModule(root, em.graph, class_name=class_name)
    result.graph.lint()
    return result


def _may_be_list(arg: Any) -> bool:
    """Whether a module argument may be a list at run time: a literal list, or a node whose example value
    was not a tensor (the example run records tensor shapes only)."""
    if isinstance(arg, (list, tuple)):
        return any(isinstance(a, fx.Node) for a in arg)
    return isinstance(arg, fx.Node) and arg.op != "placeholder" and "oct3d_shape" in arg.meta \
        and arg.meta["oct3d_shape"] is None


def _root_with(gm: fx.GraphModule, replaced: Mapping[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``gm``'s module tree with ``replaced`` swapped in (the original is untouched)."""
    if not replaced:
        return gm
    root = copy.copy(gm)
    root._modules = dict(gm._modules)
    copied: dict[str, nn.Module] = {"": root}
    for target, module in replaced.items():
        parts = target.split(".")
        parent = root
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix not in copied:
                child = copy.copy(parent._modules[parts[depth - 1]])
                child._modules = dict(child._modules)
                parent._modules[parts[depth - 1]] = child
                copied[prefix] = child
            parent = copied[prefix]
        _freeze_like(module, gm.get_submodule(target))
        parent._modules[parts[-1]] = module
    return root


def _freeze_like(new: nn.Module, original: nn.Module) -> None:
    """Give each parameter of a replacement the ``requires_grad`` of the original parameter it was cut
    from (``h2l.weight`` and ``bn_l.bias`` from ``weight`` and ``bias``), so frozen layers stay frozen."""
    sources = dict(original.named_parameters())
    for name, parameter in new.named_parameters():
        source = sources.get(name.rsplit(".", 1)[-1])
        if source is not None:
            parameter.requires_grad_(source.requires_grad)
