"""Time octave models against their vanilla peers: see `python tools/benchmark.py --help`."""

import sys

from oct3d.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
