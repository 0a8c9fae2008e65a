#!/usr/bin/env python
"""Plot per-layer linear-probe accuracy from the JSON lines of `SVM_classify_from_model.py --json`.

    python figures/make_probe_figure.py PROBE.jsonl --out figures/probe_mnist.png --title "..."

One line per record (mean over folds, error bars one std), labelled with the checkpoint's
folder and epoch. Needs matplotlib (for figures only; not a requirement of the code).
"""
import argparse
import json
import os
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", help="results appended by SVM_classify_from_model.py --json")
    p.add_argument("--out", default="figures/probe.png", help="image file to write")
    p.add_argument("--title", default=None, help="title (default: dataset, images and folds of the first record)")
    p.add_argument("--chance", type=float, default=0.1, help="chance accuracy, drawn as a dashed line")
    args = p.parse_args(argv)

    with open(args.jsonl) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        p.error(f"{args.jsonl} holds no results")
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in records:
        layers = list(r["accuracy"])
        means = [100 * r["accuracy"][name]["mean"] for name in layers]
        stds = [100 * r["accuracy"][name]["std"] for name in layers]
        run = os.path.basename(os.path.dirname(r["checkpoint"]))
        ax.errorbar(range(len(layers)), means, yerr=stds, marker="o", capsize=3,
                    label=f"{run}, epoch {r['epoch']}")
        for i, m in enumerate(means):
            ax.annotate(f"{m:.1f}", (i, m), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax.axhline(100 * args.chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("linear SVM accuracy (%)")
    first = records[0]
    title = args.title or f"{first['dataset']} test split: {first['n_images']} images, {first['n_folds']}-fold"
    ax.set_title(textwrap.fill(title, 75), fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
