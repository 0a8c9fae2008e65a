#!/usr/bin/env python3
"""How much can D's hidden noise (sigma 0.01, before its LeakyReLU) change? The release takes D's
score and its gradient penalty from separate passes, each with its own noise; this code takes both
from one pass. That matters only where the noise can move a pre-activation across the LeakyReLU's
kink: this prints, for a trained run's D on a batch of wake and of sleep states, the median
|pre-activation| and the fraction of units within one and three noise sigmas of zero.

Usage (from the repository root):
    python experiments/d_noise_reach.py RUN --dataset mnist --data DIR
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from checkpoint import load_networks  # noqa: E402


def kink_distances(discriminator, states):
    """How far D's hidden pre-activations of `states` sit from the LeakyReLU's kink, in units of
    D's noise: (median |pre-activation|, fraction within one sigma of 0, within three sigmas).
    Only a unit within reach of the noise can change its slope from one draw to the next."""
    sigma = discriminator.sigma.item()
    with torch.no_grad():
        u = discriminator.hidden(states).abs()
    return u.median().item(), (u < sigma).float().mean().item(), (u < 3 * sigma).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder (its checkpoint.pth.tar) or a checkpoint file")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    _, nets = load_networks(a.run, "cpu")
    cfg = nets.cfg
    nets.train()  # as in training: F's BatchNorm on batch statistics
    torch.manual_seed(a.seed)
    images, _ = data.load_in_memory(a.dataset, a.data, cfg.image_size)
    x = data.to_unit_range(images[:a.batch_size])
    sigma = nets.discriminator.sigma.item()
    with torch.no_grad():
        for name, states in (("wake", nets.inference(x)),
                             ("sleep", nets.generator(torch.randn(a.batch_size, cfg.noise_dim, 1, 1)))):
            median, near, near3 = kink_distances(nets.discriminator, states)
            print(f"{name:5s}  median |pre-activation| {median:.2f}   within sigma {sigma:g} of 0: "
                  f"{near:.2%}   within 3 sigma: {near3:.2%}")


if __name__ == "__main__":
    main()
