#!/usr/bin/env python
"""Samples and reconstructions of trained runs side by side: the figure of docs/wake_sleep.md.

    python figures/make_rule_figure.py RUN [RUN ...] --out figures/wake_sleep_rules.png [--titles T ...]

For each run, a column: 48 samples of G (a fixed noise, eval mode), then 8 test images with their
reconstructions from the top (k = 5) and from h3 (k = 3), as measure_inference.py makes them.
Titles name the rule and gamma from the checkpoint. Needs matplotlib.
"""
import argparse
import os
import sys

import torch
from torchvision.utils import make_grid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import inference_metrics  # noqa: E402
from checkpoint import load_networks, resolve_checkpoint_path  # noqa: E402
from measure_inference import draw_batches  # noqa: E402
from utils import pyplot, to_unit_interval, write_figure  # noqa: E402


def title(config):
    gamma, rule = config["gamma"], config.get("inference_rule", "adversarial")
    if gamma == 0:
        return "WGAN-GP (gamma 0)"
    return ("Adversarial Wake-Sleep" if rule == "adversarial" else "Wake-Sleep") + f"\ngamma {gamma:g}, seed {config['seed']}"


@torch.no_grad()
def panel(run, n_samples=48, n_images=8, seed=0):
    """(samples grid, reconstruction grid, title) of one run, as (C, H, W) images in [0, 1]."""
    path = resolve_checkpoint_path(run)
    state, nets = load_networks(path, "cpu")
    config = state["config"]
    nets.generator.eval()
    z = torch.randn(n_samples, nets.cfg.noise_dim, 1, 1, generator=torch.Generator().manual_seed(seed))
    samples = nets.generator(z)[0]
    (x, _), = draw_batches(config["dataset"], config["data"], nets.cfg.image_size, n_images, n_images, seed,
                           train=False)
    torch.manual_seed(seed)  # F's sampling noise
    rows = [x] + [inference_metrics.reconstructions(nets, x, k) for k in (5, 3)]
    return (make_grid(to_unit_interval(samples), nrow=8, padding=1, pad_value=1),
            make_grid(to_unit_interval(torch.cat(rows)), nrow=n_images, padding=1, pad_value=1), title(config))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders written by train.py")
    p.add_argument("--out", default=os.path.join(HERE, "wake_sleep_rules.png"))
    p.add_argument("--titles", nargs="+", default=None, help="a title per run (default: its rule, gamma and seed)")
    args = p.parse_args()
    if args.titles and len(args.titles) != len(args.runs):
        p.error(f"--titles gives {len(args.titles)} titles for {len(args.runs)} runs")
    plt = pyplot("the figure")
    if plt is None:
        return 1
    panels = [panel(r) for r in args.runs]
    if args.titles:
        panels = [(samples, recon, name) for (samples, recon, _), name in zip(panels, args.titles)]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.6),
                             gridspec_kw={"height_ratios": [6, 3]}, squeeze=False)
    for j, (samples, recon, name) in enumerate(panels):
        axes[0, j].imshow(samples.permute(1, 2, 0).numpy())
        axes[0, j].set_title(name, fontsize=9)
        axes[1, j].imshow(recon.permute(1, 2, 0).numpy())
        axes[1, j].set_title("inputs; from h5; from h3", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    write_figure(fig, plt, args.out)


if __name__ == "__main__":
    sys.exit(main())
