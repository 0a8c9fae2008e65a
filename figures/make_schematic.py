#!/usr/bin/env python
"""Draw the schematic of Adversarial Wake-Sleep: figures/schematic.png.

    python figures/make_schematic.py [--out figures/schematic.png]

The wake pass up through the inference network F, the sleep pass down through the generator G,
the wake/sleep discriminator D reading pairs of adjacent layers of either, the readout R on F's
h4 (gamma < 1), and the two neuromodulators of the paper's reading: D's score (#1), which gates
F's plasticity, and the switch between wake and sleep (#2). docs/algorithm.md says what each
part computes. Needs matplotlib (for figures only; not a requirement of the code).
"""
import argparse

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

WAKE, SLEEP, NEURO, CRITIC = "#1f5fa8", "#c8621b", "#7b3fa0", "#3a7d3a"
LAYER_Y = [0.6 + k for k in range(6)]  # h0 at the bottom, h5 at the top, in both columns
PAIR_Y = [y + 0.5 for y in LAYER_Y[:5]]  # D's pair (h_l, h_l+1) sits between its two layers
X_R, X_WAKE, X_D, X_SLEEP = 1.0, 3.2, 6.5, 9.8
BOX_W, BOX_H, PAIR_W, PAIR_H = 1.6, 0.5, 1.3, 0.42


def box(ax, x, y, w, h, text, edge, face="white", size=10, weight="normal", style="round,pad=0.02,rounding_size=0.08"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=style, linewidth=1.4,
                                edgecolor=edge, facecolor=face, zorder=3))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, weight=weight, zorder=4)


def arrow(ax, start, end, color, width=1.6, style="-|>", dashed=False, connection="arc3", zorder=2):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=14, linewidth=width, color=color,
                                 linestyle="--" if dashed else "-", connectionstyle=connection, zorder=zorder,
                                 shrinkA=0, shrinkB=0))


def draw(ax):
    wake_names = ["h0 = x (image)", "h1", "h2", "h3", "h4", "h5"]
    sleep_names = ["h0 (image)", "h1", "h2", "h3", "h4", "h5 = N(z)"]
    for k, y in enumerate(LAYER_Y):
        box(ax, X_WAKE, y, BOX_W, BOX_H, wake_names[k], WAKE)
        box(ax, X_SLEEP, y, BOX_W, BOX_H, sleep_names[k], SLEEP)
    # The two passes: feedforward up (F), feedback down (G).
    for k in range(5):
        lo, hi = LAYER_Y[k] + BOX_H / 2, LAYER_Y[k + 1] - BOX_H / 2
        arrow(ax, (X_WAKE, lo), (X_WAKE, hi), WAKE, width=2.2)
        ax.text(X_WAKE - 0.18, (lo + hi) / 2, "F", color=WAKE, ha="right", va="center", fontsize=10, weight="bold")
        # Neuromodulator #1 acts on these synapses: a marker on every feedforward connection.
        ax.plot([X_WAKE + 0.16], [(lo + hi) / 2], marker="o", markersize=6, color=NEURO, zorder=4)
        arrow(ax, (X_SLEEP, hi), (X_SLEEP, lo), SLEEP, width=2.2)
        ax.text(X_SLEEP + 0.18, (lo + hi) / 2, "G", color=SLEEP, ha="left", va="center", fontsize=10, weight="bold")
    box(ax, X_SLEEP, 6.5, 1.5, 0.42, "z ~ N(0, I)", SLEEP, face="#fbeee4", size=9)
    arrow(ax, (X_SLEEP, 6.5 - 0.21), (X_SLEEP, LAYER_Y[5] + BOX_H / 2), SLEEP, width=2.2)

    # D: one Linear per adjacent pair of layers; each reads its two layers of a wake or a sleep state.
    ax.add_patch(FancyBboxPatch((X_D - 0.95, 0.1), 1.9, 5.52, boxstyle="round,pad=0.02,rounding_size=0.15",
                                linewidth=1.2, edgecolor="#888888", facecolor="#f3f3f3", zorder=1))
    ax.text(X_D, 0.45, "D: wake/sleep\ndiscriminator", ha="center", va="center", fontsize=9, color="#444444",
            zorder=4)
    for l, y in enumerate(PAIR_Y):
        box(ax, X_D, y, PAIR_W, PAIR_H, f"(h{l}, h{l + 1})", "#555555", size=9)
        for k in (l, l + 1):
            ax.plot([X_WAKE + BOX_W / 2, X_D - PAIR_W / 2], [LAYER_Y[k], y], color=WAKE, alpha=0.35, linewidth=1,
                    zorder=2)
            ax.plot([X_SLEEP - BOX_W / 2, X_D + PAIR_W / 2], [LAYER_Y[k], y], color=SLEEP, alpha=0.35,
                    linewidth=1, zorder=2)
    # Neuromodulator #1: D's score of the state, fed back to gate F's plasticity.
    nm1_y = 6.55
    arrow(ax, (X_D, PAIR_Y[-1] + PAIR_H / 2), (X_D, nm1_y - 0.36), "#555555", width=1.4)
    box(ax, X_D, nm1_y, 4.0, 0.72, "neuromodulator #1 (putatively ACh) = D's score\n"
                                   "rises in wake, pushed down in sleep", NEURO, face="#f1e8f6", size=9)
    arrow(ax, (X_D - 2.0, nm1_y), (X_WAKE + 0.16, LAYER_Y[5] + BOX_H / 2), NEURO, width=1.8, dashed=True,
          connection="angle,angleA=180,angleB=90,rad=0")
    ax.text(X_WAKE, nm1_y - 0.05, "gates F's plasticity (\u25cf):\nF follows D's gradient\nw.r.t. its states",
            color=NEURO, fontsize=8.5, ha="right", va="center")

    # R: the readout discriminator on F's h4, only when gamma < 1.
    y4 = LAYER_Y[4]
    box(ax, X_R, y4, 1.3, 0.62, "R on h4\n(\u03b3 < 1)", CRITIC, face="#eaf4ea", size=9)
    arrow(ax, (X_WAKE - BOX_W / 2, y4), (X_R + 0.65, y4), CRITIC, width=1.6)
    ax.text(X_R, y4 - 0.5, "image critic\nR(F4(.))", ha="center", va="top", fontsize=8.5, color=CRITIC)

    # Neuromodulator #2: which pass drives the state.
    ax.text(X_WAKE, -0.05, "WAKE: the image drives\nthe state (feedforward, F);\nG learns to predict each\n"
                           "layer from the one above", ha="center", va="top", fontsize=9, color=WAKE)
    ax.text(X_SLEEP, -0.05, "SLEEP: the top drives\nthe state (feedback, G)", ha="center", va="top", fontsize=9,
            color=SLEEP)
    arrow(ax, (X_WAKE + 1.7, -0.3), (X_SLEEP - 1.5, -0.3), "#555555", width=1.4, style="<|-|>")
    ax.text(X_D, -0.42, "neuromodulator #2:\nthe switch between wake and sleep", ha="center", va="top", fontsize=9,
            color="#333333")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="figures/schematic.png", help="image file to write")
    args = p.parse_args(argv)
    fig, ax = plt.subplots(figsize=(11, 7.6))
    ax.set_xlim(0, 11.4)
    ax.set_ylim(-1.1, 7.4)
    ax.set_aspect("equal")
    ax.axis("off")
    draw(ax)
    ax.set_title("Adversarial Wake-Sleep: the two passes, the wake/sleep discriminator D and the readout R",
                 fontsize=11)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
