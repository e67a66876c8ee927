"""Shared vocabulary of the converter: the errors, a map's channel split and the conversion context."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import fx, nn

from oct3d.nn.octave import graph_leaf, octave_axes

__all__ = ["ConversionError", "Context", "IncompatibleSplitError", "Split", "graph_leaf", "tensor_inputs"]


class ConversionError(RuntimeError):
    """``octavize`` cannot convert the model as asked; the message names the module and the way out."""


class IncompatibleSplitError(Exception):
    """Raised by a rule when an octave map cannot flow through its op (the map is closed before it)."""


@dataclass(frozen=True)
class Split:
    """Which channels of the vanilla map each branch of an octave map holds.

    ``high`` and ``low`` are indices into the vanilla map's channels, in the order the branches
    store them. A convolution's output is "high channels first" (``high = 0..c_h-1``); a channel
    concatenation of octave maps interleaves its pieces (all high pieces, then all low pieces).
    """

    high: tuple[int, ...]
    low: tuple[int, ...]

    @classmethod
    def natural(cls, channels: int, low: int) -> Split:
        """The split of a freshly convolved map: the last ``low`` channels are low-frequency."""
        return cls(tuple(range(channels - low)), tuple(range(channels - low, channels)))

    @property
    def channels(self) -> int:
        """Channels of the vanilla map (both branches)."""
        return len(self.high) + len(self.low)

    @property
    def alpha(self) -> float:
        """The ratio that reproduces this split with ``oct3d.nn.split_channels`` (low / total)."""
        return len(self.low) / self.channels

    @property
    def is_natural(self) -> bool:
        """Whether the branches hold the vanilla channels in order (high first), as ``OctConv`` assumes."""
        return self.high + self.low == tuple(range(self.channels))

    @cached_property
    def order(self) -> torch.Tensor:
        """Vanilla channel indices in octave order (high, then low), for permuting weights."""
        return torch.tensor(self.high + self.low, dtype=torch.long)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments (nested lists included) that produce tensors."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if n.meta.get("oct3d_shape") else None)
    return list(dict.fromkeys(found))


@dataclass
class Context:
    """What the rules may consult: the traced graph, its modules, shapes and the octave mode."""

    gm: fx.GraphModule
    octave: str
    modules: dict[str, nn.Module] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.modules = dict(self.gm.named_modules())
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls, else None."""
        return self.modules.get(node.target) if node.op == "call_module" else None

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...] | None:
        """The example output shape of ``node`` when it is a tensor, else None."""
        return node.meta.get("oct3d_shape")

    def octave_for(self, dims: int) -> str:
        """The octave mode of a ``dims``-D map: the requested one for 3D, ``"spatial"`` otherwise."""
        return self.octave if dims == 3 else "spatial"

    def axes(self, dims: int) -> tuple[bool, ...]:
        """Which of the ``dims`` spatial axes are octave axes."""
        return octave_axes(dims, self.octave_for(dims))

    def factors(self, dims: int) -> tuple[int, ...]:
        """Resolution ratio high/low per spatial axis (2 on octave axes)."""
        return tuple(2 if a else 1 for a in self.axes(dims))
