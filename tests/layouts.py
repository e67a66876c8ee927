"""Helpers for the tests that check memory layouts: what layout each map has, and whether two
networks that differ only in layout give the same gradients."""

from __future__ import annotations

import torch
from torch import nn

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def map_layouts(x) -> list[str]:
    """``"contiguous"``, ``"channels_last"`` or ``"other"`` for each map of ``x`` (a tensor, an
    ``Octave`` or a ``(high, low)`` pair); maps of one pixel are left out (they have every layout)."""
    parts = [x] if isinstance(x, torch.Tensor) else [t for t in x if t is not None]
    return [
        "contiguous" if t.is_contiguous()
        else "channels_last" if t.is_contiguous(memory_format=_CHANNELS_LAST[t.dim()])
        else "other"
        for t in parts if t.shape[2:].numel() > 1
    ]


def assert_same_gradients(
    net_a: nn.Module, out_a: torch.Tensor, net_b: nn.Module, out_b: torch.Tensor, rtol: float, atol: float,
) -> None:
    """The parameter gradients of ``out.square().sum()`` agree between the two networks."""
    grads_a = torch.autograd.grad(out_a.square().sum(), list(net_a.parameters()))
    grads_b = torch.autograd.grad(out_b.square().sum(), list(net_b.parameters()))
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
