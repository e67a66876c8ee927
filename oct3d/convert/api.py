"""``octavize``: any traceable CNN into an octave network, with its weights."""

from __future__ import annotations

import copy
import numbers
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from oct3d.convert.core import Context, ConversionError
from oct3d.convert.fusion import route_conv_norms
from oct3d.convert.plan import Plan, make_plan
from oct3d.convert.rewrite import rewrite
from oct3d.convert.rules import RULES, DepthwiseConvRule, Rule
from oct3d.convert.trace import record_shapes, trace
from oct3d.nn.conv import OctConv, check_alpha
from oct3d.nn.octave import (
    OCTAVE_MODES,
    check_channels_last,
    in_model_layout,
    is_channels_last,
    keep_channels_last,
    weights_in_model_layout,
)
from oct3d.profiling import describe_input, fresh_lists, is_tensor_argument

__all__ = ["octavize", "describe_plan"]


def octavize(
    model: nn.Module,
    alpha: float | Callable[[str, nn.Module], float] = 0.5,
    *,
    example_input: Tensor | Sequence[Tensor],
    octave: str = "spatial",
    exclude: Sequence[str] = (),
    pool_first: bool | None = None,
    vanilla_coarsest: bool = True,
    rules: Sequence[Rule] | None = None,
    validate: bool = True,
    atol: float = 1e-4,
    channels_last: bool | None = None,
    fold_norms: bool = False,
) -> fx.GraphModule:
    """Convert ``model`` into an octave network, carrying its weights over as ``load_vanilla`` does.

    The model is traced with ``torch.fx``; every convolution that can carry octaves becomes an
    :class:`~oct3d.nn.OctConv` (or :class:`~oct3d.nn.transposed.OctConvTranspose`), every norm an
    octave norm, and activations, dropout, sums, channel concatenations, pooling and resizing run per
    branch. Where the octave cannot flow (flatten, global pooling, linear layers, gating, attention,
    unknown ops, ``exclude``), it closes first: the producing convolution gets ``alpha_out = 0`` and
    the next one opens it again. Placement follows the paper: the stem convolution and the
    convolutions at the network's coarsest resolution stay vanilla (docs/convert.md).

    Args:
        model: the vanilla network (left untouched; the result holds copies of its weights).
        alpha: the ratio of low-frequency channels, in [0, 1), or a callable ``(name, module) -> float``
            giving each convolution's output ratio (0 keeps it vanilla).
        example_input: an input the model accepts: a tensor, or a tuple of its positional arguments,
            each a tensor or a list of tensors (``([slow, fast],)`` for SlowFast, whose converted
            network then takes the same list), used to
            record shapes and to check the conversion. Its size does not change the placement unless
            some map shrinks to one pixel; a small input converts the same network as a large one.
        octave: for 3D maps, ``"spatial"`` (halve H, W: video, anisotropic volumes) or
            ``"spatiotemporal"`` (halve T, H, W).
        exclude: module names (and their submodules) to keep as opaque vanilla modules.
        pool_first: how strided ratio-0 convolutions stride, as in the oct3d builders
            (:func:`oct3d.models.blocks.resolve_pool_first`): None (default) pools by the stride and
            convolves at stride 1 when the result has any octave (the official code), True/False force it.
            The stem keeps its strided convolution.
        vanilla_coarsest: keep the convolutions at the network's coarsest resolution vanilla (the paper's
            res5 rule). Set False for dilated backbones (segmentation), whose coarsest maps stay large.
        rules: the rule table (default :data:`oct3d.convert.rules.RULES`), e.g. ``[MyRule(), *RULES]``.
        validate: check at conversion time that the trace reproduces ``model`` and that the converted
            network at ratio 0 computes exactly the original on ``example_input`` (within ``atol``).
        atol: tolerance of that check.
        channels_last: run the converted network in the channels_last(_3d) memory format: its 4D/5D
            tensor inputs are converted on entry (:func:`oct3d.nn.octave.in_model_layout`) and its
            outputs handed back in the caller's layout (:func:`restore_caller_layout`). ``None``
            (default): on CPU inputs only, where oneDNN would otherwise reorder every convolution's
            input and output (docs/speed.md). Unless ``False`` the convolution weights are stored
            channels_last too (:func:`oct3d.nn.octave.weights_in_model_layout`), which saves a training
            step oneDNN's weight copies; ``False`` keeps the original behaviour, e.g. for a model that
            calls ``.view()`` on its maps.
        fold_norms: route each convolution -> BatchNorm (-> ReLU) chain through
            :func:`oct3d.nn.conv_norm`, which folds the BatchNorm into the convolution in eval-mode
            CPU inference (a converted ResNet-50's batch-1 forward pass took 9% less time, docs/speed.md). The
            chain is then one graph node: feature extraction by node name (torchvision's
            ``create_feature_extractor``) can no longer take the convolution's or the BatchNorm's
            own output. Default False.

    Returns:
        a ``torch.fx.GraphModule`` (an ordinary ``nn.Module``) in the training mode of ``model``; its
        attribute ``octave_plan`` (also ``meta["octave_plan"]``, which survives ``copy.deepcopy``) maps each
        convolution to ``(alpha_in, alpha_out, note)``.

    Raises:
        ConversionError: the model cannot be traced (the message names the module to exclude), or the
            trace does not reproduce it.
        ValueError, TypeError: bad arguments.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if octave not in OCTAVE_MODES:
        raise ValueError(f"octave must be one of {OCTAVE_MODES}, got {octave!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    if not all(isinstance(e, str) for e in exclude):
        raise TypeError(f"exclude must be a sequence of module names, got {exclude!r}")
    if isinstance(alpha, Tensor) and alpha.numel() == 1 and alpha.is_floating_point():
        alpha = alpha.item()  # a one-element float tensor, as numpy scalars are taken
    if not callable(alpha) and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)):
        raise TypeError(f"alpha must be a float in [0, 1) or a callable (name, module) -> float, got {alpha!r}")
    if not callable(alpha):
        alpha = check_alpha(float(alpha))  # numpy scalars too, as OctConv and the builders take them
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real):
        raise TypeError(f"atol must be a non-negative number, got {atol!r}")
    if not atol >= 0:
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    if pool_first is not None and not isinstance(pool_first, bool):
        raise TypeError(f"pool_first must be None or a bool, got {pool_first!r}")
    if not isinstance(vanilla_coarsest, bool):
        raise TypeError(f"vanilla_coarsest must be a bool, got {vanilla_coarsest!r}")
    if not isinstance(fold_norms, bool):
        raise TypeError(f"fold_norms must be a bool, got {fold_norms!r}")
    check_channels_last(channels_last)
    _check_example(example_input)
    rules = list(RULES if rules is None else rules)
    if not all(isinstance(rule, Rule) for rule in rules):
        bad = next(rule for rule in rules if not isinstance(rule, Rule))
        raise TypeError(f"rules must be oct3d.convert.rules.Rule instances, got {type(bad).__name__}")

    source = copy.deepcopy(model)
    try:
        gm = trace(source, rules, exclude, example_input)
        traced_out = record_shapes(gm, example_input)
    except ConversionError as error:
        if isinstance(example_input, list):
            raise ConversionError(
                f"{error}. A list example_input is taken as the model's positional arguments; if the model takes "
                "one list of tensors (SlowFast's [slow, fast]), pass example_input=([...],)"
            ) from error
        try:
            _run(copy.deepcopy(model), example_input, training=model.training)
        except Exception as model_error:
            # The trace's failure blames whatever module it was in; the input is the cause here.
            raise ConversionError(
                f"the model itself fails on example_input ({type(model_error).__name__}: {model_error}); pass an "
                "input the model accepts (its channels, and a size every downsampling and skip connection fits)"
            ) from model_error
        raise
    ctx = Context(gm, octave)
    plan = make_plan(gm, ctx, rules, alpha, exclude, pool_first, vanilla_coarsest)
    class_name = f"Octave{type(model).__name__}"

    if validate:
        expected = _run(model, example_input)
        try:
            _compare(traced_out, expected, atol, "the torch.fx trace of the model")
        except ConversionError as error:
            if model.training and _structure(_run(copy.deepcopy(model), example_input, training=True)) != \
                    _structure(expected):
                raise ConversionError(
                    f"{error}. The model returns other outputs in training mode than in eval mode (deep "
                    "supervision, auxiliary or VAE heads): its forward branches on self.training, and a torch.fx "
                    "trace keeps only the branch of the mode it was traced in. Convert a copy in eval mode "
                    "(model.eval()) for inference, or turn the training-only outputs off (e.g. MONAI's "
                    "deep_supervision=False) to train the octave network"
                ) from error
            raise
        twin_plan = make_plan(gm, ctx, rules, 0.0, exclude, None)
        twin = rewrite(gm, ctx, twin_plan, class_name)
        _compare(_run(twin, example_input), expected, atol, "the converted network at alpha 0")

    result = rewrite(gm, ctx, plan, class_name)
    if channels_last is not False:
        _run_in_model_layout(result, channels_last)
        weights_in_model_layout(result, channels_last)
    if fold_norms:
        route_conv_norms(result)
    result.octave_plan = _octave_plan(plan, ctx)
    result.meta["octave_plan"] = result.octave_plan  # GraphModule.meta survives copy.deepcopy
    if (callable(alpha) or alpha > 0) and result.octave_plan and not any(
            a_out > 0 for _, a_out, _ in result.octave_plan.values()):
        already = any(isinstance(m, OctConv) and (m.alpha_in > 0 or m.alpha_out > 0) for m in model.modules())
        warnings.warn(
            f"octavize converted none of {type(model).__name__}'s {len(result.octave_plan)} convolution(s) into "
            "octave ones: the model is already an octave network (its OctConv layers are kept as they are)"
            if already else
            f"octavize converted none of {type(model).__name__}'s {len(result.octave_plan)} convolution(s) into "
            f"octave ones: every octave closed where it would open ({_reasons(result.octave_plan)}; "
            "describe_plan(net) says why for each convolution)",
            stacklevel=2,
        )
    tiny = [conv.name for node, conv in plan.convs.items() if _single_pixel(ctx, node)]
    if tiny and (callable(alpha) or alpha > 0):
        shape = tuple(example_input.shape) if isinstance(example_input, Tensor) else "the example input"
        warnings.warn(
            f"example_input {shape} shrinks the output of {len(tiny)} convolution(s) to a single pixel "
            f"({', '.join(tiny[:4])}{', ...' if len(tiny) > 4 else ''}): a map of one pixel cannot be halved and "
            "the resolution levels stop counting there, so the octave placement can differ from the one for an "
            "input of the size the network will see; pass an example of that size",
            stacklevel=2,
        )
    _copy_training_flags(model, result)
    if validate:
        try:
            got = _run(result, example_input)
        except RuntimeError as error:
            if channels_last is False or "view" not in str(error):
                raise
            raise ConversionError(
                f"the converted network fails in the channels_last memory format ({error}); the model probably "
                "calls .view() on a feature map: pass channels_last=False, or use .reshape() in the model"
            ) from error
        if _structure(got) != _structure(expected):
            raise ConversionError(
                f"the converted network returns {_structure(got)} on example_input, the original {_structure(expected)}"
            )
    return result


def _single_pixel(ctx: Context, node: fx.Node) -> bool:
    """Whether a convolution shrinks an octave axis to size 1 (it cannot be halved; the resolution
    levels stop counting there). A map already pooled to one pixel (squeeze-and-excitation, a 1x1
    head) is not counted: it has that size at any input size."""
    shape = ctx.shape(node)
    source = ctx.shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if shape is None or source is None or len(shape) < 3 or len(source) != len(shape):
        return False
    axes = ctx.axes(len(shape) - 2)
    return any(n < 2 <= m for n, m, on in zip(shape[2:], source[2:], axes) if on)


def _run_in_model_layout(gm: fx.GraphModule, channels_last: bool | None) -> None:
    """Route every input of ``gm`` through :func:`in_model_layout`, keep the layout after each vanilla
    ``nn.Conv2d``/``nn.Conv3d`` (:func:`keep_channels_last`), and hand the outputs back in the layout of
    its first input (a segmentation network's logits come back as the caller sent the volume)."""
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if not placeholders:
        return
    for placeholder in placeholders:
        with graph.inserting_after(placeholder):
            converted = graph.call_function(in_model_layout, (placeholder, channels_last))
        placeholder.replace_all_uses_with(converted, delete_user_cb=lambda user, new=converted: user is not new)
    for node in list(graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) in (nn.Conv2d, nn.Conv3d) and node.args:
            with graph.inserting_after(node):
                kept = graph.call_function(keep_channels_last, (node, node.args[0]))
            node.replace_all_uses_with(kept, delete_user_cb=lambda user, new=kept: user is not new)
    output = next(node for node in graph.nodes if node.op == "output")
    with graph.inserting_before(output):
        restored = graph.call_function(restore_caller_layout, (output.args[0], placeholders[0]))
    output.args = (restored,)
    graph.lint()
    gm.recompile()


def restore_caller_layout(outputs: Any, like: Any) -> Any:
    """``outputs`` (tensors, or tuples, NamedTuples, lists and dicts of them) in the caller's layout.

    When ``like``, the network's first input, was not channels_last, each channels_last 4D/5D map
    is made contiguous, and so is any other non-contiguous tensor of 3 or more dims (a view such
    as ``flatten(2)`` of a channels_last map), so a caller's ``.view()`` works as on the original.
    """
    if isinstance(like, fx.Proxy):  # a GraphModule's unpickling re-traces its code: keep the node
        if isinstance(outputs, (list, tuple)) and not hasattr(outputs, "_fields"):
            # One node per output: a list-input network's output handling unpacks the structure.
            return type(outputs)(restore_caller_layout(value, like) for value in outputs)
        return like.tracer.create_proxy("call_function", restore_caller_layout, (outputs, like), {})
    if not isinstance(like, Tensor) or is_channels_last(like):
        return outputs
    if isinstance(outputs, Tensor):
        if outputs.dim() in (4, 5):
            return outputs.contiguous() if is_channels_last(outputs) else outputs
        return outputs if outputs.dim() < 3 or outputs.is_contiguous() else outputs.contiguous()
    if isinstance(outputs, dict):
        return {key: restore_caller_layout(value, like) for key, value in outputs.items()}
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):
        return type(outputs)(*(restore_caller_layout(value, like) for value in outputs))
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(restore_caller_layout(value, like) for value in outputs)
    return outputs


def _reasons(octave_plan: dict[str, tuple[float, float, str]]) -> str:
    """The commonest notes of a plan, counted: ``"coarsest resolution x3; stem x1"``."""
    counts = Counter(note for _, _, note in octave_plan.values() if note)
    return "; ".join(f"{note} x{count}" for note, count in counts.most_common(3)) or "no convolution had a note"


def _octave_plan(plan: Plan, ctx: Context) -> dict[str, tuple[float, float, str]]:
    """``name -> (alpha_in, alpha_out, note)`` of every convolution, depthwise ones included, in graph order;
    one that no rule converts (an even kernel, a parametrized weight, a shared module) is ``(0, 0, why)``."""
    out: dict[str, tuple[float, float, str]] = {}
    for node, rule in plan.rules.items():
        if node in plan.convs:
            conv = plan.convs[node]
            out[conv.name] = (conv.alpha_in, conv.alpha_out, conv.note)
        elif isinstance(rule, DepthwiseConvRule) and plan.kinds[node] == "flow":
            alpha = plan.splits[node].alpha if node in plan.splits else 0.0
            out[node.target] = (alpha, alpha, "depthwise")
        elif node.op == "call_module" and isinstance(ctx.module(node), nn.modules.conv._ConvNd) \
                and node.target not in out:
            out[node.target] = (0.0, 0.0, f"stays vanilla: {plan.reasons.get(node, 'no rule converts it')}")
    return out


def describe_plan(model: fx.GraphModule) -> str:
    """A table of the converted convolutions: name, ``alpha_in -> alpha_out`` and why a side is plain."""
    plan = getattr(model, "octave_plan", None) or getattr(model, "meta", {}).get("octave_plan")
    if plan is None:
        raise TypeError(
            "describe_plan needs a model returned by octavize (a copy.deepcopy of a network loaded with torch.load "
            "keeps neither octave_plan nor meta: take the plan from the loaded network, see docs/convert.md)"
        )
    width = max((len(n) for n in plan), default=4)
    lines = [f"{'conv':<{width}}  alpha_in  alpha_out  note"]
    for name, (a_in, a_out, note) in plan.items():
        lines.append(f"{name:<{width}}  {a_in:8.3f}  {a_out:9.3f}  {note}")
    return "\n".join(lines)


def _check_example(example_input: Any) -> None:
    items = (example_input,) if isinstance(example_input, Tensor) else example_input
    if not isinstance(items, (tuple, list)) or not items or not all(is_tensor_argument(t) for t in items):
        raise TypeError(
            "example_input must be a tensor the model accepts, or a tuple of its positional arguments, each a "
            f"tensor or a list of tensors (e.g. ([slow, fast],) for SlowFast); got {describe_input(example_input)}"
        )


def _run(model: nn.Module, example_input: Tensor | Sequence[Tensor], training: bool = False) -> Any:
    args = fresh_lists((example_input,) if isinstance(example_input, Tensor) else tuple(example_input))
    # Each module's own flag, not just the top one: model.train(flag) would reset a frozen (eval) BatchNorm.
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        with torch.no_grad():
            # nn.Module.__call__, not the GraphModule's own wrapper: that one prints the generated code's
            # traceback to stderr on an error, which the caller turns into a ConversionError anyway.
            return nn.Module.__call__(model, *args)
    finally:
        for module, flag in flags:
            module.training = flag


def _copy_training_flags(model: nn.Module, result: nn.Module) -> None:
    """Give ``result`` the train/eval flag of ``model``, module by module where names match.

    Parents come before their children in ``named_modules``, so a converted module (an
    ``OctBatchNorm`` in place of a frozen ``BatchNorm2d``) passes its original's flag on to the
    modules it is built of, and a submodule with a flag of its own keeps it.
    """
    result.train(model.training)
    for name, module in model.named_modules():
        if name:
            try:
                target = result.get_submodule(name)
            except AttributeError:
                continue  # folded into another module or traced through
            if target.training != module.training:
                target.train(module.training)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _structure(value: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _tensors(value)]


def _compare(got: Any, expected: Any, atol: float, what: str) -> None:
    got_t, exp_t = _tensors(got), _tensors(expected)
    if _structure(got) != _structure(expected):
        raise ConversionError(f"{what} returns {_structure(got)} on example_input, the original {_structure(expected)}")
    for a, b in zip(got_t, exp_t):
        error = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
        scale = float(b.float().abs().max()) if b.numel() else 0.0
        if error > atol * max(1.0, scale):
            raise ConversionError(
                f"{what} differs from the original model by {error:.3g} on example_input: the trace froze a "
                "branch or an op is not what it seems; exclude the module involved (see docs/convert.md)"
            )

