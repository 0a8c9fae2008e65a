#!/usr/bin/env python
"""Loss curves and the last sample grid of a training run, as figures for the README.

    python figures/make_training_figures.py RUN_DIR [--prefix mnist]

Reads RUN_DIR/metrics.csv and RUN_DIR/gen_images/imgs_epoch{E}.png (E the last epoch); writes
figures/{prefix}_losses.png and figures/{prefix}_samples.png. Needs matplotlib (figures only).
"""
import argparse
import csv
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder written by train.py")
    p.add_argument("--prefix", default="mnist")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(args.run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    col = lambda k: [float(r[k]) for r in rows]  # noqa: E731

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, col("d_wake"), label="D(wake)")
    axes[0].plot(epochs, col("d_sleep"), label="D(sleep)")
    axes[0].set_title("wake/sleep discriminator scores")
    axes[1].plot(epochs, col("loss_d"), label="L_D (with penalties)")
    axes[1].set_title("discriminator loss")
    axes[2].plot(epochs, col("loss_g"), label="L_G")
    axes[2].set_title("generator loss")
    if any(col("loss_r")):
        axes[2].plot(epochs, col("loss_r"), label="L_R")
        axes[2].set_title("generator and readout losses")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, f"{args.prefix}_losses.png"), dpi=110)

    grid = os.path.join(args.run, "gen_images", f"imgs_epoch{epochs[-1]}.png")
    shutil.copyfile(grid, os.path.join(HERE, f"{args.prefix}_samples.png"))
    print(f"wrote figures/{args.prefix}_losses.png and figures/{args.prefix}_samples.png (epoch {epochs[-1]})")


if __name__ == "__main__":
    main()
