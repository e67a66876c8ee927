"""Cost of a model: multiply-adds, parameters and activation memory of one forward pass.

Multiply-adds are counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts two
FLOPs per multiply-add (convolutions, matmuls) and nothing for pooling, so the counts here
are its total divided by two: the paper's "FLOPs" (ResNet-50 at 224x224: 4.1 G).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from oct3d.nn import Octave, OctConv

__all__ = ["ModelCost", "count_macs", "count_params", "activation_memory", "measure"]


def _example(input_size: Sequence[int] | Tensor, device: torch.device | None = None) -> Tensor:
    if isinstance(input_size, Tensor):
        return input_size
    return torch.zeros(tuple(input_size), device=device)


def count_macs(model: nn.Module, input_size: Sequence[int] | Tensor) -> int:
    """Multiply-adds of one forward pass of ``model`` on an input of ``input_size`` (or a tensor)."""
    x = _example(input_size, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def activation_memory(model: nn.Module, input_size: Sequence[int] | Tensor) -> int:
    """Bytes of the feature maps produced by every convolution (octave or vanilla) in one forward.

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
    x = _example(input_size, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
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


def measure(model: nn.Module, input_size: Sequence[int], memory: bool = True) -> ModelCost:
    """:class:`ModelCost` of ``model`` on an input of ``input_size`` (e.g. ``(1, 3, 224, 224)``)."""
    return ModelCost(
        macs=count_macs(model, input_size),
        params=count_params(model),
        activation_bytes=activation_memory(model, input_size) if memory else 0,
    )
