#!/usr/bin/env python3
"""Train with the pure setting's step exactly as the original release computes it: F's adversarial
gradient through D's stepped weights with the activations of D's pass before the step.

Usage (from the repository root), with any train.py flags at gamma 1:
    python docs/ablations/release_rule.py --dataset mnist --data DIR ... --gamma 1

In the pure setting the release's step is this code's default step except for F's rule of following
D (docs/fidelity.md, "One step, term by term"): the default takes F's gradient from a fresh pass
through the stepped D, --update-order simultaneous at the D before the step, and the release, whose
graphs kept the weights by reference and the activations by value, through the stepped weights with
the old activations. This script trains with that third rule (step_vs_release.stale), so that a
gap between this code's samples and the release's that remains is the randomness of the runs,
not the rule. It patches train.py's step; nothing else changes (checkpoints, resume, metrics).
"""
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from step_vs_release import stale  # noqa: E402  (also puts the repository root on sys.path)
import losses  # noqa: E402
import train  # noqa: E402

_d_terms, _training_step = losses.d_terms, train.training_step


def release_rule_step(nets, optimizers, x, hp, **kwargs):
    """train.training_step in the alternating order, with D's state gradients for F (the one call of
    d_terms with graph=False, after D stepped) taken as the release's backward pass took them."""
    D_before = copy.deepcopy(nets.discriminator)

    def d_terms(D, states, hp, graph=True):
        if graph:
            return _d_terms(D, states, hp, graph)
        with stale(D, D_before):
            return losses.score_and_state_gradients(D, states, create_graph=False)

    losses.d_terms = d_terms
    try:
        return _training_step(nets, optimizers, x, hp, **kwargs)
    finally:
        losses.d_terms = _d_terms


def main(argv=None):
    args = train.parse_args(train.get_parser(), argv)
    if args.gamma != 1 or args.update_order != "alternating" or args.amp:
        sys.exit("error: release_rule.py rebuilds the pure setting's step: --gamma 1, the default "
                 "--update-order, no --amp")
    train.training_step = release_rule_step
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
