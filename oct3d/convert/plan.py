"""Placement: which maps of the traced graph carry the octave representation.

The graph's tensors are grouped into *regions*: maps joined by flow ops (a convolution's output
with the norm, activation and residual sum after it, the pieces of a concatenation, ...). A
region is produced by convolutions and read by convolutions (or by closing ops). A region
carries octaves when

1. every producer is a convolution that opens an octave: not the stem (the first convolution on the path from the
   network input), not at the network's coarsest resolution, and with ``alpha(name, module) > 0``;
2. every reader takes octaves (a convolution; no closing op, excluded module or graph output);
3. at least one reading convolution is not one of the vanilla ones of (1), so no octave is
   opened for layers that would immediately close it (ResNet's ``layer4.0.conv1``);
4. every map in it can be halved (no octave axis of size 1) and its channel splits agree
   (e.g. the two operands of a sum split the same channels).

The *resolution level* of a map counts the halvings from the network input, op by op (a stride-2
convolution adds one, a x2 upsampling takes one away), so the placement does not change with the
example input's size as long as no map shrinks to a single pixel.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from oct3d.convert.core import Context, IncompatibleSplitError, Split, tensor_inputs
from oct3d.convert.rules import BinaryRule, CatRule, Rule
from oct3d.nn.conv import check_alpha
from oct3d.nn.octave import low_channels

__all__ = ["ConvPlan", "Plan", "make_plan"]

AlphaFn = Callable[[str, nn.Module], float]


@dataclass
class ConvPlan:
    """What becomes of one convolution: its input and output splits (None = plain) and why."""

    name: str
    alpha: float
    split_in: Split | None = None
    split_out: Split | None = None
    note: str = ""

    @property
    def alpha_in(self) -> float:
        """The input's ratio (0 for a plain input)."""
        return 0.0 if self.split_in is None else self.split_in.alpha

    @property
    def alpha_out(self) -> float:
        """The output's ratio (0 for a plain output)."""
        return 0.0 if self.split_out is None else self.split_out.alpha


@dataclass
class Plan:
    """The placement of a whole graph (see the module docstring)."""

    rules: dict[fx.Node, Rule | None] = field(default_factory=dict)
    kinds: dict[fx.Node, str] = field(default_factory=dict)
    reasons: dict[fx.Node, str] = field(default_factory=dict)
    levels: dict[fx.Node, int | None] = field(default_factory=dict)
    splits: dict[fx.Node, Split] = field(default_factory=dict)
    convs: dict[fx.Node, ConvPlan] = field(default_factory=dict)
    stems: set[fx.Node] = field(default_factory=set)
    resplit: dict[fx.Node, dict[fx.Node, float | None]] = field(default_factory=dict)
    resplit_splits: dict[tuple[fx.Node, fx.Node], Split] = field(default_factory=dict)
    pool_first: bool = False

    def is_octave(self, node: fx.Node) -> bool:
        """Whether ``node``'s map carries octaves."""
        return node in self.splits

    @property
    def any_octave(self) -> bool:
        """Whether any map carries octaves."""
        return bool(self.splits)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, x: fx.Node) -> fx.Node:
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _level_step(n_in: int, n_out: int) -> int:
    """Halvings from a size ``n_in`` to ``n_out`` (negative for upsampling), ties to the smallest step."""
    best, best_cost = 0, None
    for k in sorted(range(-6, 7), key=abs):
        if k >= 0:
            cost = min(abs(n_out - -(-n_in // 2**k)), abs(n_out - n_in // 2**k))
        else:
            cost = abs(n_out - n_in * 2**-k)
        if best_cost is None or cost < best_cost:
            best, best_cost = k, cost
    return best


def _levels(graph: fx.Graph, ctx: Context, kinds: dict[fx.Node, str]) -> dict[fx.Node, int | None]:
    """Resolution level of every map; None after a closing op that pools away the octave axes (global
    pooling: a squeeze-excitation's 1x1 convolutions are not the network's coarsest stage)."""
    levels: dict[fx.Node, int | None] = {}
    for node in graph.nodes:
        shape = ctx.shape(node)
        if node.op == "placeholder":
            levels[node] = 0 if shape is not None and len(shape) >= 3 else None
            continue
        inputs = [i for i in tensor_inputs(node) if levels.get(i) is not None]
        if shape is None or len(shape) < 3 or not inputs or len(ctx.shape(inputs[0])) != len(shape):
            levels[node] = None
            continue
        source = ctx.shape(inputs[0])
        axes = ctx.axes(len(shape) - 2)
        if kinds[node] == "close" and all(n == 1 for n, on in zip(shape[2:], axes) if on):
            levels[node] = None
            continue
        steps = [_level_step(a, b) for a, b, on in zip(source[2:], shape[2:], axes) if on]
        levels[node] = max(levels[i] for i in inputs) + (max(steps, key=abs) if steps else 0)
    return levels


def _classify(node: fx.Node, rules: Sequence[Rule], ctx: Context, exclude: Sequence[str]) -> tuple:
    if node.op in ("placeholder", "output", "get_attr"):
        return None, "close", None
    rule = next((r for r in rules if r.matches(node, ctx)), None)
    if node.op == "call_module" and any(node.target == p or node.target.startswith(p + ".") for p in exclude):
        return rule, "close", "excluded"
    if rule is None:
        return None, "close", "no rule matches it"
    if rule.kind in ("close", "meta"):
        return rule, rule.kind, None if rule.kind == "meta" else rule.name
    module = ctx.module(node)
    if module is not None and ctx.calls[node.target] > 1 and any(True for _ in module.parameters()):
        return rule, "close", "a module with parameters called more than once"
    shape = ctx.shape(node)
    if shape is None or len(shape) < 3:
        return rule, "close", "its output is not a map with spatial axes"
    if rule.kind == "flow" and any(
        ctx.shape(i) is None or len(ctx.shape(i)) != len(shape) for i in rule.data_inputs(node, ctx)
    ):
        return rule, "close", "inputs of another rank than its output"
    reason = rule.check(node, ctx)
    return rule, ("close" if reason else rule.kind), reason


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _learned(module: nn.Module) -> bool:
    """Whether a module is a learned layer that ends the stem's input path: it has parameters (or holds
    a convolution) and is not a normalisation."""
    if isinstance(module, _NORMS):
        return False
    return any(True for _ in module.parameters()) or any(
        isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def make_plan(
    gm: fx.GraphModule, ctx: Context, rules: Sequence[Rule], alpha: float | AlphaFn, exclude: Sequence[str],
    pool_first: bool | None, vanilla_coarsest: bool = True,
) -> Plan:
    """Place the octaves in ``gm`` (shapes recorded) for ``alpha``; see the module docstring.

    ``vanilla_coarsest=False`` drops the coarsest-resolution rule (dilated backbones keep large maps there).
    """
    from oct3d.models.blocks import resolve_pool_first

    plan = Plan()
    nodes = list(gm.graph.nodes)
    for node in nodes:
        rule, kind, reason = _classify(node, rules, ctx, exclude)
        plan.rules[node], plan.kinds[node] = rule, kind
        if reason:
            plan.reasons[node] = reason
    plan.levels = _levels(gm.graph, ctx, plan.kinds)

    convs = [n for n in nodes if plan.kinds[n] == "conv"]
    for node in convs:
        module = ctx.module(node)
        value = alpha(node.target, module) if callable(alpha) else alpha
        plan.convs[node] = ConvPlan(node.target, check_alpha(value, f"alpha for {node.target!r}"))
    conv_levels = [plan.levels[n] for n in convs if plan.levels[n] is not None]
    coarsest = max(conv_levels) if vanilla_coarsest and conv_levels and max(conv_levels) > min(conv_levels) else None
    plan.resplit = _residual_resplits(nodes, plan, ctx, coarsest)

    def data_inputs(node: fx.Node) -> list[fx.Node]:
        rule = plan.rules[node]
        if plan.kinds[node] == "conv":
            return [node.args[0]]
        if plan.kinds[node] != "flow":
            return []
        return [n for n in rule.data_inputs(node, ctx) if n not in plan.resplit.get(node, ())]

    regions = _UnionFind()
    for node in nodes:
        if ctx.shape(node) is not None:
            regions.find(node)
            if plan.kinds[node] == "flow":
                for source in data_inputs(node):
                    regions.union(node, source)
    members: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        if ctx.shape(node) is not None:
            members.setdefault(regions.find(node), []).append(node)

    def has_placeholder(root: fx.Node) -> bool:
        return any(m.op == "placeholder" for m in members[root])

    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    # A stem is a convolution on the path from the input with no learned layer before it, whatever
    # parameter-free ops sit between (input normalisation by a buffer, channel slicing: ops without a rule
    # break the regions). A module with weights (a convolution, a linear or attention layer, an excluded
    # block) ends that path, except a norm layer (an input BatchNorm).
    after_conv: dict[fx.Node, bool] = {}
    from_input: dict[fx.Node, bool] = {}
    for node in nodes:  # fx graphs are in topological order
        inputs = node.all_input_nodes
        is_conv = node.op == "call_module" and isinstance(ctx.module(node), conv_types)
        learned = node.op == "call_module" and _learned(ctx.module(node))
        from_input[node] = node.op == "placeholder" or any(from_input[i] for i in inputs)
        after_conv[node] = learned or any(after_conv[i] for i in inputs)
        if (
            is_conv
            and plan.kinds[node] in ("conv", "flow")
            and isinstance(node.args[0], fx.Node)
            and (has_placeholder(regions.find(node.args[0]))
                 or (from_input[node.args[0]] and not after_conv[node.args[0]]))
        ):
            plan.stems.add(node)

    vanilla: set[fx.Node] = set()
    for node in convs:
        conv = plan.convs[node]
        if conv.alpha == 0:
            conv.note = "alpha 0"
        elif node in plan.stems:
            conv.note = "stem"
        elif coarsest is not None and plan.levels[node] == coarsest:
            conv.note = "coarsest resolution"
        else:
            continue
        vanilla.add(node)

    octave: dict[fx.Node, bool] = {}
    blocked: dict[fx.Node, str] = {}
    for root, values in members.items():
        reason = _region_can_carry(values, plan, ctx, data_inputs, vanilla)
        octave[root] = reason is None
        if reason:
            blocked[root] = reason

    while True:
        splits: dict[fx.Node, Split] = {}
        failed: set[fx.Node] = set()
        for node in nodes:
            if ctx.shape(node) is None:
                continue
            root = regions.find(node)
            if not octave[root] or root in failed:
                continue
            if plan.kinds[node] == "conv":
                channels = ctx.shape(node)[1]
                low = low_channels(channels, plan.convs[node].alpha)
                if 0 < low < channels:
                    splits[node] = Split.natural(channels, low)
                else:
                    failed.add(root)
                    blocked[root] = f"{node.target}: alpha {plan.convs[node].alpha} leaves no channels in a branch"
            elif plan.kinds[node] == "flow":
                try:
                    inputs = [splits[i] for i in data_inputs(node)]
                    if node in plan.resplit:
                        inputs = _with_resplit_operands(node, plan, ctx, splits, data_inputs(node))
                    splits[node] = plan.rules[node].channel_map(node, inputs, ctx)
                except (IncompatibleSplitError, KeyError) as error:
                    failed.add(root)
                    blocked[root] = str(error)
        for node in convs:  # each side on its own: a refused side stays plain
            for side, split_in, split_out in (
                (node.args[0], splits.get(node.args[0]), None), (node, None, splits.get(node))
            ):
                if split_in is None and split_out is None:
                    continue
                reason = plan.rules[node].check_splits(node, ctx, split_in, split_out)
                if reason:
                    failed.add(regions.find(side))
                    blocked[regions.find(side)] = f"{node.target}: {reason}"
        if not failed:
            break
        for root in failed:
            octave[root] = False
    plan.splits = splits

    for node in convs:
        conv = plan.convs[node]
        conv.split_in = splits.get(node.args[0])
        conv.split_out = splits.get(node)
        if conv.split_out is None and not conv.note:
            conv.note = f"closes: output {blocked.get(regions.find(node), 'stays plain')}"
    plan.pool_first = resolve_pool_first(pool_first, [1.0 if plan.any_octave else 0.0])
    return plan


def _region_can_carry(
    values: list[fx.Node], plan: Plan, ctx: Context, data_inputs: Callable[[fx.Node], list[fx.Node]],
    vanilla: set[fx.Node],
) -> str | None:
    """None when a region passes conditions 1-3 and the size part of 4 of the module docstring, else why not."""
    readers_open = False
    for value in values:
        kind = plan.kinds[value]
        if kind == "conv":
            if value in vanilla:
                return f"written by {value.target} ({plan.convs[value].note})"
        elif kind != "flow":
            what = {"placeholder": "the network input", "get_attr": "a constant"}.get(value.op, value.name)
            return f"written by {what}" + (f" ({plan.reasons[value]})" if value in plan.reasons else "")
        shape = ctx.shape(value)
        dims = len(shape) - 2
        if dims < 1 or any(n < 2 for n, on in zip(shape[2:], ctx.axes(dims)) if on):
            return f"{value.name} is too small to halve {tuple(shape[2:])}"
        for user in value.users:
            user_kind = plan.kinds[user]
            if user_kind == "meta" or (user_kind == "flow" and value in data_inputs(user)):
                continue
            if value in plan.resplit.get(user, ()):
                continue  # the sum splits this plain operand itself
            if user_kind == "conv" and user.args[0] is value and value not in tensor_inputs(user)[1:]:
                readers_open = readers_open or user not in vanilla
                continue
            if user.op == "output":
                return "read by the graph output"
            target = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", user.name)
            return f"read by {target} ({plan.reasons.get(user, 'closes')})"
    return None if readers_open else "read only by vanilla convolutions"


_IN_PLACE = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _with_resplit_operands(
    node: fx.Node, plan: Plan, ctx: Context, splits: dict[fx.Node, Split], octave_inputs: list[fx.Node]
) -> list[Split]:
    """The splits of all of ``node``'s data inputs, the re-split plain operands' included (recorded in
    ``plan.resplit_splits``): a sum's plain operand takes the other operand's (natural) split, a
    concatenation's plain piece the natural split at the ratio of the octave pieces' convolutions."""
    out = []
    for source in plan.rules[node].data_inputs(node, ctx):
        if source not in plan.resplit[node]:
            out.append(splits[source])
            continue
        alpha = plan.resplit[node][source]
        if alpha is None:
            split = splits[octave_inputs[0]]
        else:
            channels = ctx.shape(source)[1]
            split = Split.natural(channels, low_channels(channels, alpha))
        if not split.is_natural or not 0 < len(split.low) < split.channels:
            raise IncompatibleSplitError(f"{node.name}: cannot split its plain operand {source.name}")
        plan.resplit_splits[(node, source)] = split
        out.append(split)
    return out


def _residual_resplits(
    nodes: Sequence[fx.Node], plan: Plan, ctx: Context, coarsest: int | None
) -> dict[fx.Node, dict[fx.Node, float | None]]:
    """Residual sums and channel concatenations that join maps coming only from vanilla layers (the stem,
    the network input) with maps coming only from octave-opening convolutions: the plain operands are
    split into octaves there (``to_octave``, as the hand-written models' ``OctaveResplit``), so the
    residual chain or dense block can carry octaves (ResNet-18's and R3D's ``layer1``, DenseNet's first
    block) while the vanilla layers stay vanilla. Maps each such node to ``{operand: ratio}``: None for a
    sum (the operand takes the other operand's split), the octave pieces' ratio for a concatenation."""
    resplit: dict[fx.Node, dict[fx.Node, float | None]] = {}

    def sources(node: fx.Node) -> set[fx.Node]:
        found, stack, seen = set(), [node], set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if plan.kinds.get(current) == "flow":
                inputs = plan.rules[current].data_inputs(current, ctx)
                stack.extend(n for n in inputs if n not in resplit.get(current, ()))
            else:
                found.add(current)
        return found

    def plain_source(node: fx.Node) -> bool:
        if node.op == "placeholder":
            return True
        if plan.kinds.get(node) != "conv":
            return False
        conv = plan.convs[node]
        return (
            conv.alpha == 0
            or (coarsest is not None and plan.levels[node] == coarsest)
            or any(s.op == "placeholder" for s in sources(node.args[0]))
        )

    def octave_source(node: fx.Node) -> bool:
        return plan.kinds.get(node) == "conv" and not plain_source(node)

    for node in nodes:
        rule = plan.rules[node]
        if plan.kinds[node] != "flow" or not isinstance(rule, (BinaryRule, CatRule)):
            continue
        operands = rule.data_inputs(node, ctx)
        found = [sources(o) for o in operands]
        plain = [bool(f) and all(plain_source(s) for s in f) for f in found]
        octave = [bool(f) and all(octave_source(s) for s in f) for f in found]
        if not any(octave) or not any(plain) or not all(p or o for p, o in zip(plain, octave)):
            continue
        if isinstance(rule, BinaryRule):
            in_place = (node.op == "call_method" and node.target.endswith("_")) or node.target in _IN_PLACE
            if len(operands) != 2 or (in_place and plain[operands.index(node.args[0])]):
                continue  # updating a split operand in place would change only its high slice
            resplit[node] = {o: None for o, p in zip(operands, plain) if p}
        else:
            ratio = next(plan.convs[s].alpha for f, o in zip(found, octave) if o for s in f)
            resplit[node] = {o: ratio for o, p in zip(operands, plain) if p}
    return resplit
