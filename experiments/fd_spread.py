#!/usr/bin/env python3
"""How much does one trained generator's `fd` move with the draw of its 2,000 z? And does the
release's generator, sampled and scored by this code, score as the release's own samples did?

Usage (from the repository root):
    python experiments/fd_spread.py RUN --data DIR [--draws 5]
    python experiments/fd_spread.py RUN --data DIR --release RELEASE_DIR --release-generator STATE

RUN is a run folder of this code (its checkpoint.pth.tar). With --release-generator (a state dict
of the release's Generator, or a dict holding one under "gen"), the release's trained weights are
copied into RUN's generator and sampled and scored the same way; RELEASE_DIR holds the release's
files. Each draw is generate_and_save_imgs.py's sampling (eval mode, z from a seeded generator,
seeds 100, 101, ...) scored by sample_quality.py's measure on the dataset's test split.
"""
import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import step_vs_release  # noqa: E402  (also puts the repository root on sys.path)
from generate_and_save_imgs import sample_noise  # noqa: E402
from sample_quality import QualityMeasure  # noqa: E402
from checkpoint import load_networks  # noqa: E402


def release_generator_into(nets, release_dir, path):
    """Copy the release's trained generator (a state dict file) into this code's generator."""
    T = step_vs_release.import_release(release_dir)
    cfg = nets.cfg
    args = T.parser.parse_args(["--dataset", "mnist", "--image-size", str(cfg.image_size), "--n-filters",
                                str(cfg.n_filters), "--noise-dim", str(cfg.noise_dim), "--divisive-normalization",
                                str(cfg.divisive_normalization)])
    rel = step_vs_release.release_networks(T, args)
    state = torch.load(path, map_location="cpu", weights_only=False)
    rel[1].load_state_dict(state.get("gen", state))
    with torch.no_grad():
        for name, mine, theirs in step_vs_release.pairs(nets, rel):
            if name == "generator":
                mine.copy_(theirs)


def fd_of_draws(generator, measure, noise_dim, draws, n_images, first_seed=100, chunk=500):
    """`fd` of `draws` sets of n_images samples, the k-th from z seeded first_seed + k, as
    generate_and_save_imgs.py draws them: in eval mode (no noise below the top), so that a draw's
    score depends on its z alone and the spread between draws is the spread of z."""
    generator.eval()
    fds = []
    with torch.no_grad():
        for draw in range(draws):
            z = sample_noise(n_images, noise_dim, first_seed + draw)
            fds.append(measure.score(torch.cat([generator(part)[0] for part in z.split(chunk)]))["fd"])
    return fds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run folder (its checkpoint.pth.tar) or a checkpoint file")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data", required=True)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--release", help="the release's files (with --release-generator)")
    p.add_argument("--release-generator", help="the release's trained Generator state dict")
    a = p.parse_args()
    _, nets = load_networks(a.run, "cpu")
    if a.release_generator:
        release_generator_into(nets, a.release, a.release_generator)
    measure = QualityMeasure(a.dataset, a.data, nets.cfg.image_size)
    fds = fd_of_draws(nets.generator, measure, nets.cfg.noise_dim, a.draws, a.n_images)
    print("fd " + " ".join(f"{v:.1f}" for v in fds) + f"  mean {np.mean(fds):.1f}  sd {np.std(fds, ddof=1):.1f}")


if __name__ == "__main__":
    main()
