#!/usr/bin/env python3
"""How much can D's hidden noise (sigma 0.01, before its LeakyReLU) change? The release takes D's
score and its gradient penalty from separate passes, each with its own noise; this code takes both
from one pass. That matters only where the noise can move a pre-activation across the LeakyReLU's
kink: this prints, for a trained run's D on a batch of wake and of sleep states, the median
|pre-activation| and the fraction of units within one and three noise sigmas of zero.

Usage (from the repository root):
    python docs/ablations/d_noise_reach.py RUN --dataset mnist --data DIR
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
from models import ModelConfig, Networks, minibatch_stddev  # noqa: E402
from utils import load_checkpoint  # noqa: E402


def pre_activations(D, states):
    """D's 640 hidden pre-activations, before its noise, as Discriminator.forward computes them."""
    feats = [minibatch_stddev(h) for h in states]
    return torch.cat([pair(torch.cat([feats[l], feats[l + 1]], dim=1)) for l, pair in enumerate(D.pairs)], dim=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder (its checkpoint.pth.tar) or a checkpoint file")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = os.path.join(a.run, "checkpoint.pth.tar") if os.path.isdir(a.run) else a.run
    state = load_checkpoint(path)
    cfg = ModelConfig.from_dict(state["model"])
    nets = Networks(cfg)
    nets.load_state_dict(state["networks"])
    nets.train()  # as in training: F's BatchNorm on batch statistics
    torch.manual_seed(a.seed)
    images, _ = data.load_in_memory(a.dataset, a.data, cfg.image_size)
    x = data.to_unit_range(images[:a.batch_size])
    sigma = nets.discriminator.sigma.item()
    with torch.no_grad():
        for name, states in (("wake", nets.inference(x)),
                             ("sleep", nets.generator(torch.randn(a.batch_size, cfg.noise_dim, 1, 1)))):
            u = pre_activations(nets.discriminator, states).abs()
            print(f"{name:5s}  median |pre-activation| {u.median().item():.2f}   within sigma {sigma:g} of 0: "
                  f"{(u < sigma).float().mean().item():.2%}   within 3 sigma: {(u < 3 * sigma).float().mean().item():.2%}")


if __name__ == "__main__":
    main()
