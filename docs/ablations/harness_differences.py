#!/usr/bin/env python3
"""Train with every difference left between this code and the harness that runs the release here
removed at once: partial batches kept, digits resized in floats, permutation and noise from
unrelated streams (partial_batches.py, float_digits.py, separate_streams.py; each says why).

Usage (from the repository root), with any train.py flags of a single process:
    python docs/ablations/harness_differences.py --dataset mnist --data DIR ... --epochs 225

If this closes the pure setting's gap to the release (docs/fidelity.md), one of the three makes it
and each script alone says which; if it does not, none of them does. 225 epochs of 8,000 digits at
batch 256 are the release's 7,200 steps (32 an epoch, the last on 64 digits).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import float_digits  # noqa: E402  (each puts the repository root on sys.path)
import partial_batches  # noqa: E402
import separate_streams  # noqa: E402
import train  # noqa: E402


def patch(argv=None):
    partial_batches.patch(argv)
    float_digits.patch()
    separate_streams.patch()


if __name__ == "__main__":
    patch()
    sys.exit(train.main())
