#!/usr/bin/env python3
"""Train the pure setting as the release computes it, on the harness's data: the release's rule for F
(release_rule.py) and the harness's differences (harness_differences.py) at once. The runs of
docs/fidelity.md made with it ran at commit 5a0e61a, before this code kept partial batches and
seeded the permutation apart (there harness_differences.py patched those in too).

Usage (from the repository root), with any train.py flags of a single process at gamma 1:
    python docs/ablations/release_replica.py --dataset mnist --data DIR ... --epochs 225

Neither alone closed the pure setting's gap to the release (docs/fidelity.md). Together they leave
no difference that one step or the data can show: what separates this script's samples from the
release's is then the randomness of the runs (the order and number of the noise draws) or a
difference not yet found.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness_differences  # noqa: E402  (puts the repository root on sys.path)
import release_rule  # noqa: E402

if __name__ == "__main__":
    harness_differences.patch()
    sys.exit(release_rule.main())
