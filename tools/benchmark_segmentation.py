"""Time per training step, peak memory and the largest patch per memory budget of oct_unet3d at several alphas.

    python tools/benchmark_segmentation.py [--alphas 0 0.5] [--patch 48] [--sweep 32 48 64 80 96] [--budgets 256 512]

See ``oct3d.segmentation_benchmark``.
"""

import sys

from oct3d.segmentation_benchmark import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
