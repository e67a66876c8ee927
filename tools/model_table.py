"""Cost table of the registered octave models next to their vanilla peers (see oct3d/model_table.py).

Usage: python tools/model_table.py [--task image|video|all] [--alphas ...] [--markdown] [--plot FILE.png]
"""

import sys

from oct3d.model_table import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
