"""A converted graph's conv -> BatchNorm (-> ReLU) chains, routed through :func:`oct3d.nn.conv_norm`.

The rewrite calls each replacement module on its own: the ``OctConv``, then the ``OctBatchNorm`` on
the ``Octave`` of the convolution's branches, then the model's ``nn.ReLU`` once per branch. This pass
replaces each such chain, where nothing else reads the values in between, by one
``conv_norm(conv, bn, x, relu)`` call, which folds the BatchNorm into the convolution in eval-mode
CPU inference (``oct3d/nn/fold.py``) and otherwise calls the same modules in the same order. The
modules stay where they are (``get_attr`` arguments), so state-dict keys, ``oct3d.fuse`` and export
see the network as before.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from oct3d.nn import Octave, OctBatchNorm, OctConv
from oct3d.nn.fold import conv_norm

__all__ = ["route_conv_norms"]


def route_conv_norms(gm: fx.GraphModule) -> int:
    """Route every conv -> BatchNorm (-> ReLU on both branches) chain of ``gm`` through ``conv_norm``,
    in place; returns how many chains were routed."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    routed = 0
    for norm_node in list(graph.nodes):
        chain = _chain(norm_node, modules)
        if chain is None:
            continue
        conv_node, packed, branches, relu_target, outputs = chain
        with graph.inserting_before(norm_node):
            conv_ref = graph.get_attr(conv_node.target)
            norm_ref = graph.get_attr(norm_node.target)
            relu_ref = graph.get_attr(relu_target) if relu_target is not None else None
            call = graph.call_function(conv_norm, (conv_ref, norm_ref, conv_node.args[0], relu_ref))
        with graph.inserting_after(call):
            low = graph.call_function(operator.getitem, (call, 1))
            high = graph.call_function(operator.getitem, (call, 0))
        outputs[0].replace_all_uses_with(high)
        outputs[1].replace_all_uses_with(low)
        for node in (*reversed(outputs), *reversed(_users_between(norm_node, outputs)), norm_node, packed,
                     *branches, conv_node):
            if not node.users:
                graph.erase_node(node)
        routed += 1
    graph.lint()
    gm.recompile()
    return routed


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _branch_items(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(node[0], node[1])`` when those two getitems are all that read ``node``."""
    items = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem or user.args[0] is not node:
            return None
        items[user.args[1]] = user
    return (items[0], items[1]) if set(items) == {0, 1} and len(node.users) == 2 else None


def _chain(norm_node: fx.Node, modules: dict[str, nn.Module]) -> tuple | None:
    """The nodes of the chain ending at BatchNorm call ``norm_node``, or None where it is not one."""
    if norm_node.op != "call_module" or type(modules.get(norm_node.target)) is not OctBatchNorm:
        return None
    if len(norm_node.args) != 1 or norm_node.kwargs:
        return None
    packed = norm_node.args[0]
    if not (isinstance(packed, fx.Node) and packed.op == "call_function" and packed.target is Octave
            and len(packed.args) == 2 and not packed.kwargs and _single_user(packed) is norm_node):
        return None
    high, low = packed.args
    if not (isinstance(high, fx.Node) and isinstance(low, fx.Node)):
        return None
    conv_node = high.args[0] if high.op == "call_function" and high.target is operator.getitem else None
    if (conv_node is None or conv_node.op != "call_module" or not isinstance(modules.get(conv_node.target), OctConv)
            or len(conv_node.args) != 1 or conv_node.kwargs or _branch_items(conv_node) != (high, low)
            or _single_user(high) is not packed or _single_user(low) is not packed):
        return None
    outputs = _branch_items(norm_node)
    if outputs is None:
        return None
    relu_target = None
    relus = [_single_user(out) for out in outputs]
    if all(r is not None and r.op == "call_module" and len(r.args) == 1 and not r.kwargs and r.args[0] is out
           for r, out in zip(relus, outputs)) and relus[0].target == relus[1].target \
            and type(modules.get(relus[0].target)) is nn.ReLU:
        relu_target = relus[0].target
        outputs = tuple(relus)
    return conv_node, packed, (high, low), relu_target, outputs


def _users_between(norm_node: fx.Node, outputs: tuple[fx.Node, ...]) -> list[fx.Node]:
    """The BatchNorm's getitems when the chain's outputs are the ReLU calls after them."""
    return [item for item in norm_node.users if item not in outputs]
