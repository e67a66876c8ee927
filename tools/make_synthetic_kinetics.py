"""Write a synthetic Kinetics-layout dataset whose classes only motion tells apart.

Usage: ``python tools/make_synthetic_kinetics.py OUT [--classes N] [--train-per-class N] ...``
(see ``--help``); the work is done by :func:`datamodules.synthetic.main`.
"""

import sys

from datamodules.synthetic import main
from oct3d.system import run_tool

if __name__ == "__main__":
    sys.exit(run_tool(main))
