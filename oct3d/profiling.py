"""Cost of a model: multiply-adds, parameters and activation memory of one forward pass.

Multiply-adds are counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts two
FLOPs per multiply-add (convolutions, matmuls) and nothing for pooling, so the counts here
are its total divided by two: the paper's "FLOPs" (ResNet-50 at 224x224: 4.1 G).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from oct3d.nn import Octave, OctConv

__all__ = [
    "ExampleInput", "ModelCost", "count_macs", "count_params", "activation_memory", "describe_input", "example_args",
    "floating_dtype", "fresh_lists", "is_tensor_argument", "measure",
]

#: What the cost functions (and ``oct3d.fuse``) run a model on: an input shape, a tensor, an
#: ``Octave``, or a tuple of the model's positional arguments, each a tensor or a list of tensors.
ExampleInput = Sequence[int] | Tensor | Octave | Sequence[Tensor | Sequence[Tensor]]


def example_args(
    example: ExampleInput, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, ...]:
    """The positional arguments of one forward pass described by ``example``.

    An input shape (a sequence of ints) gives zeros of that shape on ``device`` with ``dtype`` (the
    model's, so that a half-precision model gets a half-precision input); a tensor or an
    ``Octave`` is the one argument; a tuple (or list) of tensors and lists of tensors is the
    arguments themselves, as ``oct3d.octavize`` takes them (SlowFast's one list argument:
    ``([slow, fast],)``).
    """
    if isinstance(example, (Tensor, Octave)):
        return (example,)
    if isinstance(example, Sequence) and not isinstance(example, str) and len(example) > 0:
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in example):
            if any(v < 0 for v in example):
                raise ValueError(f"an input shape must have non-negative sizes, got {tuple(example)}")
            return (torch.zeros(tuple(int(v) for v in example), device=device, dtype=dtype),)
        if all(is_tensor_argument(v) for v in example):
            return tuple(example)
    raise TypeError(
        "the example input must be an input shape, a tensor, an Octave, or a tuple of the model's positional "
        "arguments, each a tensor or a list of tensors (e.g. ([slow, fast],) for SlowFast); got "
        f"{describe_input(example)}"
    )


def is_tensor_argument(value: object) -> bool:
    """Whether ``value`` can be one positional argument of an example: a tensor, an ``Octave``, or a
    non-empty list or tuple of tensors."""
    return isinstance(value, (Tensor, Octave)) or (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(t, Tensor) for t in value)
    )


def describe_input(value: object) -> str:
    """A short description of an example input for error messages: shapes, not values."""
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, Octave):
        return "Octave(" + ", ".join(describe_input(v) for v in value) + ")"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe_input(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value) if isinstance(value, (int, float, str)) or value is None else type(value).__name__


def fresh_lists(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``args`` with each list argument copied: multi-pathway models (pytorchvideo's SlowFast) write
    their outputs into their input list, which would leave the caller's list changed after a run."""
    return tuple(list(a) if isinstance(a, list) else a for a in args)


def _call(model: nn.Module, args: tuple[Any, ...], example: ExampleInput) -> Any:
    try:
        return model(*fresh_lists(args))
    except TypeError as error:
        if isinstance(example, list) and len(args) > 1 and "positional argument" in str(error):
            raise TypeError(
                f"{error}. A list example input is taken as the model's positional arguments; if the model takes "
                "one list of tensors (SlowFast's [slow, fast]), pass ([...],)"
            ) from error
        raise


def _device_of(model: nn.Module) -> torch.device | None:
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def count_macs(model: nn.Module, input_size: ExampleInput) -> int:
    """Multiply-adds of one forward pass of ``model`` on an input of ``input_size``: an input shape,
    a tensor, or a tuple of positional arguments (see :func:`example_args`)."""
    args = example_args(input_size, _device_of(model), floating_dtype(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _call(model, args, input_size)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def activation_memory(model: nn.Module, input_size: ExampleInput) -> int:
    """Bytes of the feature maps produced by every convolution (octave or vanilla) in one forward
    on ``input_size`` (see :func:`example_args`).

    This is the quantity of the paper's Table 1 ("memory"): at alpha 0.5 an octave layer
    stores ``(1 - a) + a / 4 = 62.5 %`` of a vanilla layer's output in 2D.
    """
    total = 0

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        tensors = [output.high, output.low] if isinstance(output, Octave) else [output]
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))

    # The paths inside an OctConv are counted through the OctConv's own output.
    paths = {id(child) for m in model.modules() if isinstance(m, OctConv) for child in m.children()}
    convs = (OctConv, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, convs) and id(m) not in paths
    ]
    args = example_args(input_size, _device_of(model), floating_dtype(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _call(model, args, input_size)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


@dataclass(frozen=True)
class ModelCost:
    """Multiply-adds, parameters and activation bytes of one model at one input size."""

    macs: int
    params: int
    activation_bytes: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def mparams(self) -> float:
        return self.params / 1e6


def measure(model: nn.Module, input_size: ExampleInput, memory: bool = True) -> ModelCost:
    """:class:`ModelCost` of ``model`` on an input of ``input_size`` (e.g. ``(1, 3, 224, 224)``)."""
    return ModelCost(
        macs=count_macs(model, input_size),
        params=count_params(model),
        activation_bytes=activation_memory(model, input_size) if memory else 0,
    )
