"""Time octave models against their vanilla peers: see `python tools/benchmark.py --help`."""

import sys

from oct3d.benchmark import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
