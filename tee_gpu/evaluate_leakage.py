#!/usr/bin/env python3
"""Leakage evaluation: how much of the prompt each split scheme gives away to an attacker on the GPU."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splitinfer.leakage import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
