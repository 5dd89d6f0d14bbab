#!/usr/bin/env python3
"""Split runner with matrix-transformation masks: token mixing for linears, permutations and diagonals for matmuls."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from splitinfer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(os.path.join(HERE, "config.py"), scheme="matrix"))
