#!/usr/bin/env python3
"""Train on digits resized in floating point, as the harness that runs the release here does.

Usage (from the repository root), with any train.py flags of a single process:
    python docs/ablations/float_digits.py --dataset mnist --data DIR ... --epochs 225

This code resizes the 28-pixel digits to --image-size in uint8 and rounds (as the release's own
torchvision pipeline did: PIL's resize, then ToTensor); the harness that trains the release on this
machine (../shared/tools/release/) interpolates bilinearly in floats and never rounds, so its
digits take values between the 256 grey levels. The two differ by at most one grey level, 0.0005
on average. This script trains on the harness's digits (F.interpolate, bilinear, no rounding),
to measure whether that matters. Nothing else changes (checkpoints, resume, metrics).
"""
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import train  # noqa: E402


def resize_in_floats(images, size, center_crop=False):
    """(N, C, H, W) uint8 -> (N, C, size, size) float in [0, 255], unrounded (data.to_unit_range takes it)."""
    if center_crop or images.shape[-1] != images.shape[-2]:
        sys.exit("error: float_digits.py resizes square images only, without cropping")
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)


def patch():
    data._resize = resize_in_floats


if __name__ == "__main__":
    patch()
    sys.exit(train.main())
