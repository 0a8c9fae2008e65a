#!/usr/bin/env python3
"""Train the pure setting as the original release computes it, on the digits its runs saw.

Usage (from the repository root), with any train.py flags of a single process at gamma 1:
    python experiments/release_replica.py --dataset mnist --data DIR ... --epochs 225

Two changes to this code's training, and nothing else (checkpoints, resume, metrics as train.py's):

1. F follows D by the release's rule. In the pure setting the release's step is this code's
   default step except for that rule (docs/fidelity.md, "One step, term by term"): the default
   takes F's adversarial gradient from a fresh pass through the stepped D; the release, whose
   graphs kept the weights by reference and the activations by value (PyTorch 1.3's in-place
   optimizer updates), took it through D's stepped weights with the activations of D's pass
   before the step. release_rule_step does the latter (step_vs_release.stale).
2. The digits are resized as the harness that ran the release did: bilinearly in floats and never
   rounded, where this code, like the release's own torchvision pipeline, rounds to 8 bits. The two
   differ by at most one grey level, 0.0005 on average.

The other differences between this code and that harness (the epoch's last, partial batch, and a
permutation drawn apart from the training noise) are this code's default now. The rows of
docs/fidelity.md made with this script ran at commit 5a0e61a, where it patched those in as well.
"""
import copy
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_vs_release import stale  # noqa: E402  (also puts the repository root on sys.path)
import data  # noqa: E402
import losses  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402


def resize_in_floats(images, size, center_crop=False):
    """(N, C, H, W) uint8 -> (N, C, size, size) float in [0, 255], unrounded: the harness's digits
    (data.to_unit_range takes floats as well as uint8)."""
    if center_crop or images.shape[-1] != images.shape[-2]:
        sys.exit("error: release_replica.py resizes square images only, without cropping")
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)


def release_rule_step(nets, optimizers, x, hp, **kwargs):
    """step.training_step in the alternating order, with D's state gradients for F (the one call of
    losses.d_terms with graph=False, made after D stepped) taken as the release's backward pass took
    them: through the stepped weights, with the activations of D before its step."""
    d_before = copy.deepcopy(nets.discriminator)
    d_terms = losses.d_terms

    def release_d_terms(D, states, hp, graph=True):
        if graph:
            return d_terms(D, states, hp, graph)
        with stale(D, d_before):
            return losses.score_and_state_gradients(D, states, create_graph=False)

    losses.d_terms = release_d_terms
    try:
        return step.training_step(nets, optimizers, x, hp, **kwargs)
    finally:
        losses.d_terms = d_terms


def main(argv=None):
    args = train.parse_args(train.get_parser(), argv)
    if args.gamma != 1 or args.update_order != "alternating" or args.amp:
        sys.exit("error: release_replica.py rebuilds the pure setting's step: --gamma 1, the default "
                 "--update-order, no --amp")
    # train.py's loop calls the step and resizes the data through these two names.
    train.training_step = release_rule_step
    data._resize = resize_in_floats
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
