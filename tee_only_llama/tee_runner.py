#!/usr/bin/env python3
"""TEE-only runner: the whole model on the CPU, the baseline the split must beat."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from splitinfer.cli import TEE_ONLY, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(os.path.join(HERE, "config.py"), scheme=TEE_ONLY))
