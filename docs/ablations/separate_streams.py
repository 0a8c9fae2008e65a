#!/usr/bin/env python3
"""Train with the shuffling and the training noise drawn from two unrelated random streams.

Usage (from the repository root), with any train.py flags of a single process:
    python docs/ablations/separate_streams.py --dataset mnist --data DIR ... --epochs 232

At each epoch this code seeds torch's global generator (every noise of the step: z, G's, F's,
DeReLU's and D's) and the generator that permutes the images with one number, seed * 1,000,003 +
epoch, so on a CPU an epoch's permutation and its first noise draws are read from the same
Mersenne-twister words. The release draws both from one generator seeded once, each word used
once. Arbitrary image indices should make this harmless; docs/fidelity.md names it as a
difference left in the pure setting, and this script tests it: the permutation's seed is moved
by 2 ** 40 + 1. A CPU generator keeps only a seed's low 32 bits (torch.Generator().manual_seed(s)
and manual_seed(s + 2 ** 32) draw the same numbers), so on a CPU epoch e's permutation reads the
words of epoch e + 1's noise: apart from its own epoch's noise, though not from every epoch's.
The runs in docs/fidelity.md used this offset. Nothing else changes (checkpoints, resume, metrics).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import train  # noqa: E402

OFFSET = 2 ** 40 + 1
_seed_shards = data._seed_shards


def seed_shards_apart(sampler, seed, epoch):
    _seed_shards(sampler, seed, epoch)
    sampler.seed += OFFSET


def patch():
    data._seed_shards = seed_shards_apart


if __name__ == "__main__":
    patch()
    sys.exit(train.main())
