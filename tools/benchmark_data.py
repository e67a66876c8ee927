"""Time training data loaders (clips/s per worker, decode vs transform): see `python tools/benchmark_data.py --help`."""

import sys

from oct3d.benchmark_data import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
