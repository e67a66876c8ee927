"""Tracing a model into a ``torch.fx`` graph, and recording each node's example shape.

The tracer stops at ``torch.nn`` modules (fx's default), at the module types a rule asks for
(:meth:`~oct3d.convert.rules.Rule.leaf`) and at every name in ``exclude``. When tracing fails,
the error names the innermost module being traced and says how to keep it out of the trace.

Python control flow on traced values (``if x.shape[-1] != y.shape[-1]``, ``for t in x.shape``),
which plain ``torch.fx`` refuses, is *specialised*: the tracer evaluates the condition on the
example input and follows that branch, and the graph gets a guard (:func:`specialised`) that
raises on inputs that would take the other branch. So a converted model is never silently wrong;
at worst it asks to be converted with an example of the size it is used at. ``torch.jit.isinstance(x,
torch.Tensor)`` (MONAI's optional inputs) is answered True for traced tensors.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import torch
from torch import Tensor, fx, nn
from torch.fx import _symbolic_trace
from torch.utils import _pytree as pytree

from oct3d.convert.core import ConversionError, graph_leaf
from oct3d.convert.rules import Rule

__all__ = ["check_inputs", "checked_codegen", "length_of", "record_shapes", "specialised", "trace"]


@graph_leaf
def length_of(value: Any) -> int:
    """``len(value)``, as one graph node (the builtin cannot be re-traced on a Proxy)."""
    return len(value)


@graph_leaf
def specialised(value: Any, expected: Any, message: str) -> Any:
    """Guard of a specialised Python branch: ``value`` must be what it was on the example input."""
    if value != expected:
        raise RuntimeError(message)
    return value


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in exclude)


class _Tracer(fx.Tracer):
    def __init__(self, rules: Sequence[Rule], exclude: Sequence[str], example: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.rules = rules
        self.exclude = exclude
        self.example = example
        self.stack: list[str] = []
        self.values: dict[fx.Node, Any] = {}

    # ------------------------------------------------------------------ specialised control flow
    def _evaluate(self, node: fx.Node) -> Any:
        """The value of ``node`` on the example input (its ancestors evaluated once, in eval mode)."""
        pending = [node]
        while pending:
            current = pending[-1]
            if current in self.values:
                pending.pop()
                continue
            missing = [n for n in current.all_input_nodes if n not in self.values]
            if missing:
                pending.extend(missing)
                continue
            pending.pop()
            args = _mutable(fx.node.map_arg(current.args, self.values.__getitem__))
            kwargs = _mutable(fx.node.map_arg(current.kwargs, self.values.__getitem__))
            if current.op == "placeholder":
                index = [n for n in current.graph.nodes if n.op == "placeholder"].index(current)
                value = self.example[index] if index < len(self.example) else (args[0] if args else None)
            elif current.op == "get_attr":
                value = self.root
                for part in current.target.split("."):
                    value = getattr(value, part)
            elif current.op == "call_module":
                value = self.root.get_submodule(current.target)(*args, **kwargs)
            elif current.op == "call_function":
                value = current.target(*args, **kwargs)
            else:
                value = getattr(args[0], current.target)(*args[1:], **kwargs)
            self.values[current] = value
        return self.values[node]

    def _concrete(self, obj: fx.Proxy) -> Any:
        was_training = self.root.training
        self.root.eval()
        # fx patches nn.Module.__call__/__getattr__ while tracing; real evaluation needs the originals.
        patched = nn.Module.__call__, nn.Module.__getattr__
        nn.Module.__call__ = getattr(_symbolic_trace, "_orig_module_call", patched[0])
        nn.Module.__getattr__ = getattr(_symbolic_trace, "_orig_module_getattr", patched[1])
        try:
            with torch.no_grad():
                return self._evaluate(obj.node)
        except Exception as error:
            raise fx.proxy.TraceError(
                f"control flow on a traced value ({obj.node.name}) could not be evaluated on example_input: {error}"
            ) from error
        finally:
            nn.Module.__call__, nn.Module.__getattr__ = patched
            self.root.train(was_training)

    def _guard(self, proxy: fx.Proxy, expected: Any, what: str) -> None:
        if self.stack:
            where = self.stack[-1]
            message = (
                f"octavize traced {where!r} for inputs where {what} was {expected!r} (as on example_input); this "
                f"input takes another branch there. Convert with an example_input like this one, or pass "
                f"exclude=({where!r},) to keep that module opaque"
            )
        else:  # the top-level forward itself: nothing around it to exclude
            message = (
                f"octavize traced the model's forward for inputs where {what} was {expected!r} (as on "
                "example_input); this input takes another branch there. Convert with an example_input like this "
                "one (the converted network serves inputs that take the same branches)"
            )
        self.create_proxy("call_function", specialised, (proxy, expected, message), {})

    def length(self, obj: fx.Proxy) -> int:
        length = len(self._concrete(obj))
        self._guard(self.create_proxy("call_function", length_of, (obj,), {}), length, f"the length of {obj.node.name}")
        return length

    def to_bool(self, obj: fx.Proxy) -> bool:
        concrete = self._concrete(obj)
        value = bool(concrete)
        if isinstance(concrete, Tensor):
            # A test on tensor values (not shapes): no example input makes the trace hold for every input.
            where = f"module {self.stack[-1]!r}" if self.stack else "the model's forward"
            advice = f"exclude=({self.stack[-1]!r},) keeps that module's own code" if self.stack else \
                "move the test into a module and exclude it"
            warnings.warn(
                f"{where} branches on a tensor's values ({obj.node.name}); the converted network follows the branch "
                f"the example took and raises on inputs that would take the other one; {advice}",
                stacklevel=2,
            )
        self._guard(obj, value, f"the test {obj.node.name}")
        return value

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter([obj[i] for i in range(self.length(obj))])

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _excluded(module_qualified_name, self.exclude) or any(rule.leaf(m) for rule in self.rules):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(m)
        self.stack.append(name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:
            if not hasattr(error, "_oct3d_module"):
                error._oct3d_module = (name, type(m).__name__)
            raise
        finally:
            self.stack.pop()


def _is_tensor(proxy: fx.Proxy) -> bool:
    """Whether a traced value is a tensor on the example input (False where it cannot be evaluated)."""
    try:
        return isinstance(proxy.tracer._concrete(proxy), Tensor)
    except fx.proxy.TraceError:
        return False


@contextlib.contextmanager
def _specialising() -> Iterator[None]:
    """While tracing: ``torch.jit.isinstance(proxy, torch.Tensor)`` is True (it is False for an fx Proxy),
    ``len(proxy)`` is answered by a converter tracer from the example input (fx refuses it), and
    ``torch.as_tensor(proxy)`` is the proxy (as it is the tensor for a tensor)."""
    original_isinstance = torch.jit.isinstance
    original_len = fx.Proxy.__len__

    def patched_isinstance(obj: Any, target_type: Any) -> bool:
        if isinstance(obj, fx.Proxy):
            return target_type is Tensor
        return original_isinstance(obj, target_type)

    def patched_len(proxy: fx.Proxy) -> int:
        if isinstance(proxy.tracer, _Tracer):
            return proxy.tracer.length(proxy)
        return original_len(proxy)

    original_as_tensor = torch.as_tensor

    def patched_as_tensor(data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, fx.Proxy):
            # torch.as_tensor(tensor) is the tensor itself (MONAI's HighResBlock wraps a module's output in
            # it): no node, so the octave flows through. Anything else is recorded as the call it is.
            if not args and not kwargs and isinstance(data.tracer, _Tracer) and _is_tensor(data):
                return data
            return data.tracer.create_proxy("call_function", original_as_tensor, (data, *args), kwargs)
        return original_as_tensor(data, *args, **kwargs)

    torch.jit.isinstance = patched_isinstance
    fx.Proxy.__len__ = patched_len
    torch.as_tensor = patched_as_tensor
    try:
        yield
    finally:
        torch.jit.isinstance = original_isinstance
        fx.Proxy.__len__ = original_len
        torch.as_tensor = original_as_tensor


def trace(
    model: nn.Module, rules: Sequence[Rule], exclude: Sequence[str] = (),
    example_input: Tensor | Sequence[Tensor] = (),
) -> fx.GraphModule:
    """``torch.fx``-trace ``model`` with the converter's leaf policy; a failure raises :class:`ConversionError`.

    ``example_input`` answers the control flow on traced values (see the module docstring).
    """
    names = {name for name, _ in model.named_modules()}
    unknown = [p for p in exclude if p not in names]
    if unknown:
        raise ValueError(f"exclude names modules the model does not have: {unknown}; see model.named_modules()")
    example = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    concrete_args = _structured_args(model, example)
    tracer = _Tracer(rules, tuple(exclude), tuple(pytree.tree_leaves(example)))
    try:
        with _specialising():
            graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as error:
        _raise_trace_error(model, error)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    _follow_the_mode(gm, model, _other_mode_graph(model, rules, exclude, example, concrete_args))
    _warn_dropped_parameters(model, gm)
    return gm


#: Dropout functions whose ``training`` argument a trace freezes, and the module that follows the mode instead.
_DROPOUT_MODULES = {
    torch.nn.functional.dropout: nn.Dropout, torch.nn.functional.dropout1d: nn.Dropout1d,
    torch.nn.functional.dropout2d: nn.Dropout2d, torch.nn.functional.dropout3d: nn.Dropout3d,
    torch.nn.functional.alpha_dropout: nn.AlphaDropout,
    torch.nn.functional.feature_alpha_dropout: nn.FeatureAlphaDropout,
}


def _other_mode_graph(model: nn.Module, rules: Sequence[Rule], exclude: Sequence[str], example: tuple,
                      concrete_args: dict | None) -> fx.Graph | None:
    """The trace of a copy of the model in the other train/eval mode, or None where that trace fails."""
    other = copy.deepcopy(model)  # (the model keeps its own per-module flags, and gains no traced constants)
    other.train(not model.training)
    try:
        with _specialising(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first trace already warned
            return _Tracer(rules, tuple(exclude), tuple(pytree.tree_leaves(example))).trace(
                other, concrete_args=concrete_args)
    except Exception:
        return None


_TENSOR_CONSTANT = re.compile(r"_tensor_constant\d+$")


def _node_signatures(graph: fx.Graph) -> list[tuple]:
    """Per node, what it does, with its inputs as node positions and fx's tensor constants (named in
    the order a trace met them) as their rank, so two traces of the same code compare equal."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    constants: dict[str, int] = {}

    def target(node: fx.Node) -> str:
        if node.op == "get_attr" and _TENSOR_CONSTANT.match(str(node.target)):
            return f"<tensor constant {constants.setdefault(str(node.target), len(constants))}>"
        return str(node.target)

    def arg(value: Any) -> Any:
        return fx.node.map_arg(value, lambda n: ("node", index[n]))

    return [(node.op, target(node), repr(arg(node.args)), repr(arg(node.kwargs))) for node in graph.nodes]


def _dropout_training(node: fx.Node) -> bool | None:
    """The ``training`` argument of a dropout-function node (as bound to its signature), None for other nodes."""
    if node.op != "call_function" or node.target not in _DROPOUT_MODULES:
        return None
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    training = bound.arguments.get("training")
    return training if isinstance(training, bool) else None


def _follow_the_mode(gm: fx.GraphModule, model: nn.Module, other: fx.Graph | None) -> None:
    """Make the converted network follow ``train()``/``eval()`` as the model does, or say where it cannot.

    A trace freezes ``self.training``: ``F.dropout(x, p, training=self.training)`` (DenseNet's
    ``drop_rate``) becomes a constant, and ``if self.training:`` keeps one branch. The model is traced
    in both modes; dropout calls whose ``training`` flips with the mode become dropout modules (which
    follow the mode), and any other difference gets a warning.
    """
    mode = "training" if model.training else "eval"
    if other is None:
        if any(_dropout_training(node) is not None for node in gm.graph.nodes):
            warnings.warn(
                f"{type(model).__name__} could not be traced in the other train/eval mode, so whether its dropout "
                f"calls follow the mode was not checked: they keep their {mode}-mode setting",
                stacklevel=4,
            )
        return
    nodes, other_nodes = list(gm.graph.nodes), list(other.nodes)
    if len(nodes) != len(other_nodes):
        difference = f"{len(nodes)} against {len(other_nodes)} operations"
    else:
        flips, difference = [], None
        signatures = zip(nodes, other_nodes, _node_signatures(gm.graph), _node_signatures(other))
        for node, twin, signature, twin_signature in signatures:
            if signature == twin_signature:
                continue
            mine, theirs = _dropout_training(node), _dropout_training(twin)
            if mine is not None and theirs is not None and mine != theirs and node.target is twin.target:
                flips.append(node)
                continue
            difference = f"at {node.name} ({node.format_node()})"
            break
        if difference is None:
            for node in flips:
                bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
                bound.apply_defaults()
                module = _DROPOUT_MODULES[node.target](p=bound.arguments["p"], inplace=bound.arguments["inplace"])
                name = f"oct3d_{node.name}"
                gm.add_submodule(name, module)
                with gm.graph.inserting_before(node):
                    replacement = gm.graph.call_module(name, (bound.arguments["input"],))
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
            if flips:
                gm.recompile()
            return
    warnings.warn(
        f"{type(model).__name__}'s forward does other things in training than in eval mode beyond dropout (its "
        f"traces differ {difference}): it branches on self.training (deep supervision, auxiliary heads), and the "
        f"converted network keeps the {mode}-mode code in both modes. Convert it in the mode you will run it in, "
        "or turn the mode-dependent outputs off (e.g. MONAI's deep_supervision=False)",
        stacklevel=4,
    )


def _warn_dropped_parameters(model: nn.Module, gm: fx.GraphModule) -> None:
    """Warn about parameters of modules the forward never calls: a GraphModule keeps only the called ones."""
    kept = {id(p) for p in gm.parameters()}  # (a module shared under two names is kept once: not dropped)
    dropped = [(name, p.numel()) for name, p in model.named_parameters() if id(p) not in kept]
    if dropped:
        total = sum(n for _, n in dropped)
        names = ", ".join(repr(name) for name, _ in dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        warnings.warn(
            f"{total} parameter(s) of {type(model).__name__} belong to modules its forward never calls ({names}); "
            "the converted network leaves them out, so a checkpoint of the original loads into it only with "
            "strict=False",
            stacklevel=4,
        )


def _raise_trace_error(model: nn.Module, error: Exception) -> NoReturn:
    """Raise the :class:`ConversionError` for a failed trace, naming the module it failed in."""
    where = getattr(error, "_oct3d_module", None)
    cause = _likely_cause(error)
    if where is None:
        raise ConversionError(
            f"octavize could not trace {type(model).__name__} with torch.fx ({type(error).__name__}: {error}). "
            f"The failing code is in the model's own forward{cause or ''}; make the forward traceable (no "
            "Python control flow on tensor values), or convert a traceable submodule and keep the rest around it"
        ) from error
    name, kind = where
    # Deep inside a block (a transformer's attention), the siblings often fail the same way one
    # after the other: name the enclosing block and the top-level module too.
    parts = name.split(".")
    around = dict.fromkeys([".".join(parts[:-1]), parts[0]]) if len(parts) >= 3 else {}
    also = f" (or a module around it: {' or '.join(map(repr, around))})" if around else ""
    raise ConversionError(
        f"octavize could not trace module {name!r} ({kind}) of {type(model).__name__} with torch.fx "
        f"({type(error).__name__}: {error}){cause or ''}. Pass exclude=({name!r},){also} to keep it as one "
        "opaque module "
        "(it stays vanilla and the octave closes around it), or make its forward traceable, e.g. by moving "
        "data-dependent control flow into a function marked with torch.fx.wrap"
    ) from error


def _likely_cause(error: Exception) -> str | None:
    """What a few common tracing errors mean, for the message (``None`` where there is nothing to add)."""
    text = str(error)
    if isinstance(error, TypeError) and "Proxy" in text and any(
            f in text for f in ("int()", "float()", "index", "interpreted as an integer")):
        return (": the code turns a traced size into a Python number (int(), float(), an index), which a torch.fx "
                "trace cannot do; keep size arithmetic on x.shape values without int(), or compute it in a function "
                "marked with torch.fx.wrap")
    if isinstance(error, NameError) and "not installed as a submodule" in text:
        return (": the module builds another module inside its forward (only modules assigned in __init__ can be "
                "traced)")
    return None


def _structured_args(model: nn.Module, example: tuple[Any, ...]) -> dict[str, Any] | None:
    """fx ``concrete_args`` for positional arguments that are lists or tuples of tensors (SlowFast's
    ``[slow, fast]``): one placeholder per tensor, and the traced module takes the same structure."""
    if all(isinstance(a, Tensor) for a in example):
        return None
    names = list(inspect.signature(model.forward).parameters)
    if len(names) < len(example):
        raise ValueError(f"example_input has {len(example)} positional arguments, {type(model).__name__}.forward "
                         f"takes {len(names)}")
    return {name: pytree.tree_map(lambda _: fx.PH, arg) for name, arg in zip(names, example)}


def check_inputs(values: list[Any], spec: pytree.TreeSpec) -> None:
    """Guard of a list-input network: fx's generated code reads exactly as many tensors as the example
    had (it would silently ignore extra ones), so a call with another count is an error.

    ``values`` is the generated forward's ``[self, *arguments]``, flattened against ``spec`` right after.
    """
    check_input_count(list(values[1:]), spec.num_leaves - 1)


def check_input_count(arguments: list[Any], expected: int) -> None:
    """Raise unless the positional ``arguments`` of a list-input network hold ``expected`` tensors.

    Unpickling re-traces the generated code into a graph without :func:`checked_codegen`'s guard;
    called on fx proxies there, this records itself as a node of that graph, so a loaded network
    and its copies keep the check.
    """
    leaves = pytree.tree_leaves(arguments)
    proxy = next((leaf for leaf in leaves if isinstance(leaf, fx.Proxy)), None)
    if proxy is not None:
        proxy.tracer.create_proxy("call_function", check_input_count, (arguments, expected), {})
        return
    if len(leaves) != expected:
        raise ValueError(f"this network was converted for inputs of {expected} tensors in its example's "
                         f"structure, got {len(leaves)}; convert it with an example of the structure it is "
                         "called with")


# A guard whose result nothing uses: keep fx's dead-code elimination from dropping its node.
fx.node.has_side_effect(check_input_count)

try:
    from torch.fx.graph import _PyTreeCodeGen
except ImportError:  # a torch without it has no list-input tracing either
    _PyTreeCodeGen = None


def checked_codegen(codegen: Any) -> Any:
    """A copy of ``codegen``; for fx's pytree input handling (list arguments), one that also calls
    :func:`check_inputs` at the top of the generated forward."""
    if _PyTreeCodeGen is None or type(codegen) is not _PyTreeCodeGen:
        return copy.deepcopy(codegen)
    return _CheckedPyTreeCodeGen(copy.deepcopy(codegen.pytree_info))


if _PyTreeCodeGen is not None:

    class _CheckedPyTreeCodeGen(_PyTreeCodeGen):
        def gen_var_bindings(self, fn_args: list[str], free_vars: list[str], expanded_def: bool) -> str:
            check = f"\n    oct3d_check_inputs([{', '.join(fn_args)}], self._in_spec)"
            return check + super().gen_var_bindings(fn_args, free_vars, expanded_def)

        def additional_globals(self) -> list[tuple[str, Any]]:
            return [*super().additional_globals(), ("oct3d_check_inputs", check_inputs)]


class _ShapeRecorder(fx.Interpreter):
    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # fx hands list arguments over as its immutable_list; the generated code of the same graph
        # builds ordinary lists, which modules may mutate (pytorchvideo's PoolConcatPathway does).
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        n.meta["oct3d_shape"] = tuple(value.shape) if isinstance(value, Tensor) and value.dim() > 0 else None
        return value


def _mutable(value: Any) -> Any:
    if isinstance(value, fx.immutable_collections.immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_mutable(v) for v in value)
    return value


@graph_leaf
def mutable_copy(value: Any) -> Any:
    """``value`` with fx's immutable lists in it rebuilt as plain lists (tensors shared): the argument of
    a kept module that may write into it. Plain lists pass unchanged, so in eager runs a module's writes
    stay visible wherever the original code would see them."""
    return _mutable(value)


def record_shapes(gm: fx.GraphModule, example_input: Tensor | Sequence[Tensor]) -> Any:
    """Run ``gm`` once on the example (eval mode, no autograd); store shapes in ``node.meta["oct3d_shape"]``.

    Returns the graph's output, for checking the trace against the original model.
    """
    args = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            # One placeholder per tensor (list arguments are flattened); run() rebuilds the output's structure.
            return _ShapeRecorder(gm).run(*pytree.tree_leaves(args))
    except Exception as error:
        raise ConversionError(
            f"running the traced model on example_input failed ({type(error).__name__}: {error}). Check that the "
            "model accepts this input (e.g. a fixed-size pooling head needs its full input size); if it does, the "
            "trace froze a Python branch that depends on the input, see docs/convert.md"
        ) from error
    finally:
        gm.train(was_training)
