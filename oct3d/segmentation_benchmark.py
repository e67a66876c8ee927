"""Training cost of ``oct_unet3d`` at several alphas: time per step, peak memory, and the largest patch a budget allows.

``python tools/benchmark_segmentation.py`` builds one ``oct_unet3d`` per alpha (same width and
depth) and times a whole training step (forward, MONAI Dice + cross-entropy, backward, AdamW)
round-robin, after a warm-up, so every alpha sees the same machine state; it reports medians and
the peak tensor memory of one step (on CPU from the profiler's allocation events, on CUDA from
``max_memory_allocated``; see :mod:`oct3d.benchmark`). With ``--sweep``, it measures the peak memory
of a step at growing cubic patches and gives, per memory budget, the largest patch that fits:
activation memory, not compute, is what limits the patch size of 3D networks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from oct3d.benchmark import _peak_memory, _timed
from oct3d.inference import resolve_device
from oct3d.models import oct_unet3d
from oct3d.nn.conv import minimum_channels

__all__ = ["StepCost", "measure_steps", "patch_sweep", "largest_patch", "main"]


@dataclass(frozen=True)
class StepCost:
    """One alpha's training step: median and fastest milliseconds, and peak bytes, at one patch size."""

    alpha: float
    patch: int
    batch_size: int
    median_ms: float | None
    peak_bytes: int | None
    min_ms: float | None = None


def _step(alpha: float, patch: int, batch_size: int, base_width: int, depth: int, num_classes: int,
          device: torch.device) -> Callable[[], None]:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = oct_unet3d(1, num_classes, alpha=alpha, octave="spatial", base_width=base_width, depth=depth).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(batch_size, 1, patch, patch, patch, device=device)
    y = torch.randint(0, num_classes, (batch_size, 1, patch, patch, patch), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def measure_steps(alphas: Sequence[float], patch: int = 48, batch_size: int = 2, base_width: int = 8, depth: int = 3,
                  num_classes: int = 3, warmup: int = 2, rounds: int = 10, device: str = "cpu") -> list[StepCost]:
    """Median time and peak memory of a training step per alpha, timed interleaved (round-robin)."""
    dev = torch.device(device)
    steps = [_step(a, patch, batch_size, base_width, depth, num_classes, dev) for a in alphas]
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for i, step in enumerate(steps):
            times[i].append(_timed(step, dev))
    peaks = []
    for step in steps:
        with _peak_memory(dev) as peak:
            step()
        peaks.append(peak[0])
    return [StepCost(a, patch, batch_size, statistics.median(t), p, min(t)) for a, t, p in zip(alphas, times, peaks)]


def patch_sweep(alphas: Sequence[float], patches: Sequence[int], batch_size: int = 2, base_width: int = 8,
                depth: int = 3, num_classes: int = 3, device: str = "cpu") -> list[StepCost]:
    """Peak memory of one training step (after one warm-up step) for every alpha and cubic patch size."""
    dev = torch.device(device)
    out = []
    for patch in patches:
        for alpha in alphas:
            step = _step(alpha, patch, batch_size, base_width, depth, num_classes, dev)
            step()  # optimizer state and one-time buffers are allocated outside the measured step
            with _peak_memory(dev) as peak:
                step()
            out.append(StepCost(alpha, patch, batch_size, None, peak[0]))
    return out


def largest_patch(costs: Sequence[StepCost], alpha: float, budget_bytes: int) -> int | None:
    """The largest measured patch whose step peak fits ``budget_bytes`` at ``alpha`` (None: not even the smallest)."""
    fitting = [c.patch for c in costs if c.alpha == alpha and c.peak_bytes is not None and c.peak_bytes <= budget_bytes]
    return max(fitting) if fitting else None


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def format_steps(costs: Sequence[StepCost]) -> str:
    """Markdown: one row per alpha with median and fastest ms, peak MiB, and ratios to the first alpha.

    On a shared machine the fastest step is the least disturbed one, so both are shown.
    """
    base = costs[0]
    ratio = lambda a, b: a / b if a and b else float("nan")
    lines = ["| alpha | median ms / step | time ratio | fastest ms / step | ratio | peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for c in costs:
        lines.append(f"| {c.alpha:g} | {c.median_ms:.0f} | {ratio(c.median_ms, base.median_ms):.2f}x | "
                     f"{c.min_ms:.0f} | {ratio(c.min_ms, base.min_ms):.2f}x | {_mib(c.peak_bytes)} | "
                     f"{ratio(c.peak_bytes, base.peak_bytes):.2f}x |")
    return "\n".join(lines)


def format_sweep(costs: Sequence[StepCost], alphas: Sequence[float], budgets_mib: Sequence[int]) -> str:
    """Markdown: the peak per patch and alpha, then the largest patch per budget and alpha."""
    patches = sorted({c.patch for c in costs})
    peak = {(c.alpha, c.patch): c.peak_bytes for c in costs}
    header = " | ".join(f"peak MiB, alpha {a:g}" for a in alphas)
    lines = [f"| patch (batch {costs[0].batch_size}) | {header} |", "|---|" + "---|" * len(alphas)]
    lines += [f"| {p}^3 | " + " | ".join(_mib(peak.get((a, p))) for a in alphas) + " |" for p in patches]
    lines += ["", "| memory budget | " + " | ".join(f"largest patch, alpha {a:g}" for a in alphas) + " |",
              "|---|" + "---|" * len(alphas)]
    for budget in budgets_mib:
        cells = []
        for a in alphas:
            best = largest_patch(costs, a, budget * 2**20)
            cells.append("none measured" if best is None else f"{best}^3 ({best**3 / 1e3:.0f} K voxels)")
        lines.append(f"| {budget} MiB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: print the step table (and, with ``--sweep``, the patch tables)."""
    parser = argparse.ArgumentParser(prog="benchmark_segmentation", description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--patch", type=int, default=48, help="cubic training patch of the timed steps")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per alpha (interleaved)")
    parser.add_argument("--sweep", type=int, nargs="*", help="cubic patches whose peak memory to measure")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024], help="memory budgets in MiB")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", help="also write the tables to this markdown file")
    parser.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="as for tools/benchmark.py: steady raises glibc's mmap/trim thresholds")
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    if args.rounds < 1 or args.patch < 4 or args.batch_size < 1:
        parser.error("--rounds and --batch-size must be >= 1 and --patch >= 4")
    bad_alphas = [a for a in args.alphas if not 0.0 <= a < 1.0]
    if bad_alphas:
        parser.error(f"--alphas must each be in [0, 1), got {bad_alphas}")
    if args.depth < 2:
        parser.error(f"--depth must be >= 2, got {args.depth}")
    smallest = max((minimum_channels(a) for a in args.alphas if a > 0), default=1)
    if args.base_width < smallest:
        parser.error(f"--base-width must be >= {smallest} for --alphas {args.alphas} (each branch needs a channel), "
                     f"got {args.base_width}")
    if any(b <= 0 for b in args.budgets):
        parser.error(f"--budgets must be positive MiB, got {args.budgets}")
    if args.sweep and any(p < 4 for p in args.sweep):
        parser.error(f"--sweep patches must be >= 4, got {args.sweep}")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        parser.error(f"--output: folder {Path(args.output).resolve().parent} does not exist")
    from oct3d.system import steady_malloc

    malloc = "steady" if args.malloc == "steady" and steady_malloc() else "default"
    text = [f"Training step of oct_unet3d(base_width={args.base_width}, depth={args.depth}, octave='spatial'), "
            f"batch {args.batch_size} x 1 x {args.patch}^3, {args.device}, {torch.get_num_threads()} threads, "
            f"{malloc} malloc:", "",
            format_steps(measure_steps(args.alphas, args.patch, args.batch_size, args.base_width, args.depth,
                                       rounds=args.rounds, device=args.device))]
    if args.sweep:
        sweep = patch_sweep(args.alphas, args.sweep, args.batch_size, args.base_width, args.depth, device=args.device)
        text += ["", format_sweep(sweep, args.alphas, args.budgets)]
    out = "\n".join(text)
    print(out)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
