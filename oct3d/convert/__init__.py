"""Bring your own network: :func:`octavize` turns a traceable CNN into an octave network, with its weights.

>>> import torch, torchvision
>>> from oct3d import octavize
>>> net = octavize(torchvision.models.resnet18(), alpha=0.5, example_input=torch.randn(1, 3, 64, 64))
>>> net.octave_plan["layer1.0.conv1"][:2]
(0.0, 0.5)

Layout: :mod:`~oct3d.convert.trace` (torch.fx tracing and example shapes), :mod:`~oct3d.convert.rules`
(the per-op rule table), :mod:`~oct3d.convert.plan` (where octaves go), :mod:`~oct3d.convert.rewrite`
(the per-branch graph), :mod:`~oct3d.convert.layers` (run-time helpers of converted graphs) and
:mod:`~oct3d.convert.table` (the cost table of the README). See docs/convert.md.
"""

from oct3d.convert.api import describe_plan, octavize
from oct3d.convert.core import ConversionError, IncompatibleSplitError, Split
from oct3d.convert.rules import RULES, Rule

__all__ = ["RULES", "ConversionError", "IncompatibleSplitError", "Rule", "Split", "describe_plan", "octavize"]
