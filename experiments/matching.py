#!/usr/bin/env python
"""The tables and the figure of docs/matching.md: do wake and sleep states match, and what differs
where they do not, for runs that each change one thing from a baseline run.

    python experiments/matching.py BASELINE_RUN [RUN ...] [--figure curves.png] [--json rows.json]

Each RUN is a train.py folder made with --matching-every (metrics.csv), holding the outputs of
    python measure_inference.py --path RUN --n 1000                      (inference/inference_measures.json)
    python SVM_classify_from_model.py --path RUN -b 512 --n-folds 5 --json RUN/probe.jsonl
A run's change is the flags of its config.json that differ from the first run's (not the seed or the
folder); runs of one change are its seeds, shown as the mean and range across them. Where a change and
the baseline have at least two seeds each, the difference of their means is given with a Welch
t-interval (the seed is the unit). The graded distance H (matching_metrics) is printed with a * where
it lies inside its permutation null (p > 0.01), beside the same networks at initialization; the block
diagnostics say where the match breaks. --figure draws H of h0..h5 and the whole state over training,
and D's AUROC, one line per run. How far each network moved from its initial weights (rebuilt from the
run's seed, as train.py draws them) shows whether a network learned at all: "D moved" is D's largest
weight change over the most Adam can move a weight in the run's steps, lr_d x steps x
max(1, (1 - beta1) / sqrt(1 - beta2)) (Kingma & Ba 2015, section 2.1: 3.16 lr a step at beta1 0,
beta2 0.9), so 1 is a weight pushed the same way as far as it can go at every step.
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from rule_comparison import cell, parse_runs, welch_cells, write_rows  # noqa: E402
from checkpoint import load_networks, resolve_checkpoint_path  # noqa: E402
from models import Networks  # noqa: E402

IGNORED = {"out", "seed", "resume", "epochs", "device", "gpu", "workers", "data", "save_imgs", "quality_every",
           "matching_every", "probe_folds"}
# Flags a run made before an option existed did not record: it ran the option's default.
DEFAULTS = {"norm_order": "release", "inference_batchnorm": True, "inference_noise": 0.01, "generator_noise": 0.01,
            "d_hidden": 128, "dream_noise": "release", "d_penalty": "one-sided-l1", "lr_scale": 0.01}
LAYERS = range(1, 6)
GRADED = [(f"H_h{l}", f"h{l}") for l in range(6)] + [("H_whole", "whole")]
UNTRAINED = [(f"H0_h{l}", f"h{l}") for l in range(6)] + [("H0_whole", "whole")]
BLOCKS = ([(f"explained{k}", f"G explains h{k - 1}") for k in LAYERS] + [(f"down{k}", f"H one block down to h{k - 1}")
                                                                         for k in LAYERS])
CONTROL = [(f"pc_error{l}", f"F's error h{l}") for l in LAYERS] + [(f"pc_H{l}", f"H h{l}") for l in LAYERS] + [
    ("pc_top_r2", "R2 of N(z)")]
MATCHING = [(f"ts_h{l}", f"h{l}") for l in LAYERS] + [("ts_h1-h4", "h1..h4 mean"), ("ts_whole", "whole")]
D_AND_SAMPLES = [("d_auroc", "D's AUROC"), ("d_auroc_min", "its least over training"), ("d_margin_sd", "D's margin (sd)"), ("d_moved", "D moved"), ("fd", "fd"),
                 ("precision", "precision"), ("recall", "recall")]
PROBE = [(f"probe{l}", f"probe h{l}") for l in LAYERS] + [("mse5", "reconstruction error from h5"),
                                                           ("labels5", "its label agreement")]
LAYER_NAMES = ("Input", "Layer1", "Layer2", "Layer3", "Layer4", "Layer5")
CURVES = [f"h{l}" for l in range(6)] + ["whole"]


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _metrics(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def curves(run, measure="two_sample"):
    """{feature set: [(epoch, value)]} of train.py --matching-every: measure "two_sample" (the
    accuracy) or "distance" (H); "d_auroc" under the key "D"."""
    found = {}
    for r in _metrics(run):
        for name, key in [(n, f"{measure}_{n}") for n in CURVES] + [("D", "d_auroc")]:
            value = r.get(key)
            if value:
                found.setdefault(name, []).append((int(r["epoch"]), float(value)))
    return found


def graded_row(m):
    """The graded distance, its untrained reference and the block diagnostics of one
    inference_measures.json, as flat keys (p of each H kept beside it)."""
    g, row = m["graded"], {}
    for prefix, found in (("H", g["distance"]), ("H0", g["untrained"]["distance"])):
        for name, r in found.items():
            row[f"{prefix}_{name}"], row[f"{prefix}_{name}_p"] = r["distance"], r["p"]
    for k in LAYERS:
        row[f"explained{k}"] = g["generator_fit"][str(k)]["explained"]
        one_down = g["descents"][str(k)][f"h{k - 1}"]
        row[f"down{k}"], row[f"down{k}_p"] = one_down["distance"], one_down["p"]
        control = g["positive_control"][str(k)]
        row[f"pc_error{k}"], row[f"pc_H{k}"], row[f"pc_H{k}_p"] = (control["relative_error"], control["distance"],
                                                                     control["p"])
    row["pc_top_r2"] = g["positive_control"]["top_r2"]
    return row


def weight_change(state, nets):
    """{network: {"relative": ||w - w0|| / ||w0|| over its weights, "largest": max |w - w0| over
    its parameters}} against the initial weights w0, rebuilt as train.py draws them (seeded by the
    run's seed, before anything else)."""
    torch.manual_seed(state["seed"])
    initial = Networks(nets.cfg).parts()
    found = {}
    for name, net in nets.parts().items():
        now, then = dict(net.named_parameters()), dict(initial[name].named_parameters())
        weights = [k for k in now if k.endswith("weight")]
        moved = sum((now[k] - then[k]).pow(2).sum() for k in weights).sqrt()
        found[name] = {"relative": (moved / sum(then[k].pow(2).sum() for k in weights).sqrt()).item(),
                       "largest": max((now[k] - then[k]).abs().max().item() for k in now)}
    return found


def run_row(run):
    """One run's measures as a flat dict (missing evaluations are absent keys)."""
    args = _read_json(os.path.join(run, "config.json"))["args"]
    rows = _metrics(run)
    row = {"run": run, "args": {k: args.get(k, DEFAULTS.get(k)) for k in set(args) | set(DEFAULTS)},
           "seed": args["seed"], "steps": sum(int(r["steps"]) for r in rows)}
    during = [float(r["d_auroc"]) for r in rows if r.get("d_auroc")]
    if during:
        row["d_auroc_min"] = min(during)
    last = [r for r in rows if r.get("fd")]
    if last:
        row.update({k: float(last[-1][k]) for k in ("fd", "precision", "recall") if last[-1].get(k)})
    measures = os.path.join(run, "inference", "inference_measures.json")
    if os.path.exists(measures):
        m = _read_json(measures)
        row.update({f"ts_{name}": r["accuracy"] for name, r in m["wake_vs_sleep"].items()})
        row["ts_h1-h4"] = float(np.mean([row[f"ts_h{l}"] for l in range(1, 5)]))
        if "reconstruction" in m:
            row["mse5"] = m["reconstruction"]["5"]["mse"]["mean"]
            if "label_agreement" in m["reconstruction"]["5"]:
                row["labels5"] = m["reconstruction"]["5"]["label_agreement"]["mean"]
        if "graded" in m:
            row.update(graded_row(m))
        differ = m.get("differences")
        if differ:
            row["layers"], row["residual"] = differ["layers"], differ["prediction_residual"]
            if differ["discriminator"]:
                row["d_auroc"], row["d_margin_sd"] = differ["discriminator"]["auroc"], differ["discriminator"]["margin_sd"]
    probe = os.path.join(run, "probe.jsonl")
    if os.path.exists(probe):
        with open(probe) as f:
            accuracy = json.loads(f.read().splitlines()[-1])["accuracy"]
        row.update({f"probe{l}": accuracy[LAYER_NAMES[l]]["mean"] for l in LAYERS})
    if os.path.exists(os.path.join(run, "checkpoint.pth.tar")):
        state, nets = load_networks(resolve_checkpoint_path(run), "cpu")
        row["moved"] = weight_change(state, nets)
        if "discriminator" in row["moved"] and row["steps"]:
            adam = max(1.0, (1 - args.get("beta1", 0.5)) / np.sqrt(1 - args.get("beta2", 0.99)))
            row["d_moved"] = row["moved"]["discriminator"]["largest"] / (args["lr_d"] * row["steps"] * adam)
    return row


def change(row, baseline):
    """The flags that differ from the baseline run's, as a command-line fragment ('' for none)."""
    parts = []
    for k in sorted(set(row["args"]) - IGNORED):
        if row["args"][k] != baseline["args"].get(k):
            parts.append(f"--{k.replace('_', '-')} {row['args'][k]}")
    steps = "" if row["steps"] == baseline["steps"] else f"{row['steps']} steps"
    return " ".join(parts + ([steps] if steps else []))


def groups(rows):
    """{change: [rows]}, the baseline's ('' : the baseline's flags) first, in the order given."""
    keyed = {}
    for r in rows:
        keyed.setdefault(change(r, rows[0]) or "baseline", []).append(r)
    return keyed


def inside_null(rows, key):
    """' *' where the key's H lies inside its permutation null (p > 0.01) in every seed that has it."""
    ps = [r[f"{key}_p"] for r in rows if r.get(f"{key}_p") is not None]
    return " *" if ps and min(ps) > 0.01 else ""


def table(keyed, columns, differences=True):
    lines = ["| change | seeds | " + " | ".join(title for _, title in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for name, rows in keyed.items():
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cell(rows, key) + inside_null(rows, key)
                                                               for key, _ in columns) + " |")
    base = keyed.get("baseline", []) if differences else []
    for name, rows in keyed.items():
        if name == "baseline" or len(rows) < 2 or len(base) < 2:
            continue
        lines.append(f"| {name} - baseline (95 % Welch) | | " + " | ".join(welch_cells(rows, base, columns)) + " |")
    return "\n".join(lines)


def statistics_table(keyed):
    """Per change and layer, wake / sleep: channel RMS, zeros, mean, an entry's sd across samples,
    distance from G's noiseless block of the layer above (the mean over the change's seeds)."""
    lines = ["| change | layer | channel RMS | zeros | mean | sd across samples | residual from G (layer below) |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in keyed.items():
        rows = [r for r in rows if "layers" in r]
        if not rows:
            continue
        for l in LAYERS:
            def pair(part, key=None):
                def value(r, kind):
                    v = r[part][kind][str(l)]
                    return v.get(key, np.nan) if key else v  # sd: not in measures made before it
                return "/".join(f"{np.mean([value(r, kind) for r in rows]):.3f}" for kind in ("wake", "sleep"))
            lines.append(f"| {name if l == 1 else ''} | h{l} | {pair('layers', 'channel_rms')} | {pair('layers', 'zeros')} "
                         f"| {pair('layers', 'mean')} | {pair('layers', 'sd')} | {pair('residual')} |")
    return "\n".join(lines)


def plot(rows, keyed, path):
    """H per feature set over training and D's AUROC, one line per run, a colour per change."""
    from utils import pyplot, write_figure
    plt = pyplot("the figure")
    if plt is None:
        return
    panels = CURVES + ["D"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, group) in enumerate(keyed.items()):
        for j, r in enumerate(group):
            found = curves(r["run"], "distance")
            for ax, feature in zip(axes, panels):
                if feature in found:
                    e, v = zip(*found[feature])
                    ax.plot(e, v, color=colours[i % len(colours)], marker=".", lw=1, label=name if j == 0 else None)
    for ax, feature in zip(axes, panels):
        ax.set_title("D's AUROC" if feature == "D" else f"H {feature}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02 if feature == "D" else None)
    axes[-1].axhline(0.5, color="grey", lw=0.5, ls=":")
    axes[0].set_ylabel("graded wake/sleep distance H")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(keyed)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * ((len(keyed) - 1) // 4), 1, 1))
    write_figure(fig, plt, path)
    print(f"figure: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py run folders, the baseline first")
    p.add_argument("--figure", default=None, help="write the curves of H and D's AUROC over training here")
    p.add_argument("--json", default=None, help="write every run's row here")
    args = parse_runs(p, argv, "metrics.csv")
    rows = [run_row(r) for r in args.runs]
    keyed = groups(rows)
    for title, text in (("Graded wake/sleep distance H (measure_inference.py; 0: matched; * inside its permutation "
                         "null, p > 0.01, in every seed)", table(keyed, GRADED)),
                        ("The same, the networks at initialization (no Welch rows: the same seed starts "
                         "a change from the baseline's weights)",
                         table(keyed, UNTRAINED, differences=False)),
                        ("Where the match breaks, block k of G: the fraction of the inferred h(k-1)'s variance G's "
                         "noiseless block of hk explains; H of G's descent one block down from wake hk of other "
                         "images", table(keyed, BLOCKS)),
                        ("The positive control, F on G's own dreams: F's relative error and H against the states "
                         "dreamed, and the R2 of N(z) from F's h5", table(keyed, CONTROL)),
                        ("Wake/sleep two-sample accuracy (measure_inference.py; 0.5: matched)",
                         table(keyed, MATCHING)),
                        ("D's separation of the same states, how far D's weights moved, and the samples (fd, "
                         "precision, recall of 2,000)", table(keyed, D_AND_SAMPLES)),
                        ("The linear probe (SVM_classify_from_model.py, test digits) and reconstruction from the top "
                         "(measure_inference.py)", table(keyed, PROBE)),
                        ("Wake / sleep statistics of the same states", statistics_table(keyed))):
        print(f"\n{title}\n\n{text}")
    if args.figure:
        plot(rows, keyed, args.figure)
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
