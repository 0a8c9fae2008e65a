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
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import monitor  # noqa: E402  (the same figure that train.py writes as curves.png)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder written by train.py")
    p.add_argument("--prefix", default="mnist")
    args = p.parse_args()
    with open(os.path.join(args.run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    monitor.plot_curves(rows, os.path.join(HERE, f"{args.prefix}_losses.png"))

    grid = os.path.join(args.run, "gen_images", f"imgs_epoch{epochs[-1]}.png")
    shutil.copyfile(grid, os.path.join(HERE, f"{args.prefix}_samples.png"))
    print(f"wrote figures/{args.prefix}_losses.png and figures/{args.prefix}_samples.png (epoch {epochs[-1]})")


if __name__ == "__main__":
    main()
