#!/usr/bin/env python
"""The tables of docs/wake_sleep.md: Adversarial Wake-Sleep against classic Wake-Sleep, from the
evaluations of trained runs (docs/wake_sleep.md lists the commands that make each run and its files).

    python experiments/rule_comparison.py RUN [RUN ...] [--benchmark bench.json] [--json rows.json]

Each RUN is a train.py folder holding config.json and metrics.csv, and the outputs of
    python measure_inference.py --path RUN --n 2000                      (inference/inference_measures.json)
    python SVM_classify_from_model.py --path RUN -b 512 --n-folds 5 --json RUN/probe.jsonl
    python generate_and_save_imgs.py --path RUN --n-images 2000 --classifier-fd --out RUN/samples2000
Runs are grouped by (inference rule, gamma); a group of several seeds shows its mean and range. A run
folder of 0 steps (networks as a run starts them) is the untrained control.
Where a gamma has both rules with at least two seeds each, the difference of their means is given
with a Welch t-interval (the seed is the unit).
"""
import argparse
import csv
import json
import os
import sys

import numpy as np
from scipy import stats

SAMPLES = [("fd", "fd"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall")]
RECONSTRUCTION = [("mse5", "mse k=5"), ("mse4", "k=4"), ("mse3", "k=3"), ("mse2", "k=2"), ("mse1", "k=1"),
                  ("labels5", "label agreement k=5")]
PROBE = [(f"probe{l}", f"probe h{l}") for l in range(1, 6)]
TWO_SAMPLE = [(f"ts_h{l},h{l + 1}", f"h{l},h{l + 1}") for l in range(5)] + [("ts_h5", "h5"), ("ts_whole", "whole")]
NULL = [(f"null_{key[3:]}", title) for key, title in TWO_SAMPLE]
LAYER_NAMES = ("Input", "Layer1", "Layer2", "Layer3", "Layer4", "Layer5")


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def run_row(run):
    """One run's measures as a flat dict (missing evaluations are absent keys)."""
    args = _read_json(os.path.join(run, "config.json"))["args"]
    with open(os.path.join(run, "metrics.csv")) as f:
        steps = sum(int(r["steps"]) for r in csv.DictReader(f))
    row = {"run": run, "rule": args.get("inference_rule", "adversarial"), "gamma": args["gamma"],
           "seed": args["seed"], "steps": steps}
    quality = os.path.join(run, "samples2000", "samples.json")
    if os.path.exists(quality):
        row.update({k: _read_json(quality)["classifier_fd"][k] for k, _ in SAMPLES})
    measures = os.path.join(run, "inference", "inference_measures.json")
    if os.path.exists(measures):
        m = _read_json(measures)
        row.update({f"mse{k}": m["reconstruction"][str(k)]["mse"]["mean"] for k in range(1, 6)})
        if m["label_agreement_of_inputs"]:
            row["labels5"] = m["reconstruction"]["5"]["label_agreement"]["mean"]
            row["labels_inputs"] = m["label_agreement_of_inputs"]["mean"]
        row.update({f"ts_{name}": r["accuracy"] for name, r in m["wake_vs_sleep"].items()})
        row.update({f"null_{name}": r["accuracy"] for name, r in m["null"].items()})
    probe = os.path.join(run, "probe.jsonl")
    if os.path.exists(probe):
        with open(probe) as f:
            accuracy = json.loads(f.read().splitlines()[-1])["accuracy"]
        row.update({f"probe{l}": accuracy[LAYER_NAMES[l]]["mean"] for l in range(1, 6)})
    return row


def setting(rule, gamma, trained=True):
    if not trained:  # the control: the networks as a run starts them, measured the same way
        return f"untrained networks (gamma {gamma:g})"
    if gamma == 0:
        return "WGAN-GP (gamma 0)"
    name = "Adversarial Wake-Sleep" if rule == "adversarial" else "Wake-Sleep"
    return name + (" (pure, gamma 1)" if gamma == 1 else f" (doubly, gamma {gamma:g})")


def groups(rows):
    """{(rule, gamma, trained): [rows]}, ordered by gamma (pure first), adversarial before Wake-Sleep,
    untrained networks (a run folder of 0 steps) last."""
    keyed = {}
    for r in sorted(rows, key=lambda r: (r["steps"] == 0, -r["gamma"], r["rule"], r["seed"])):
        keyed.setdefault((r["rule"], r["gamma"], r["steps"] > 0), []).append(r)
    return keyed


def _fmt(x):
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def cell(rows, key):
    values = [r[key] for r in rows if key in r]
    if not values:
        return "-"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(np.mean(values))} ({_fmt(min(values))} - {_fmt(max(values))})"


def welch(a, b, level=0.95):
    """mean(a) - mean(b) and its Welch t-interval (a and b: one value per seed). Where every seed of
    both gives one value there is no spread to make an interval of: (diff, None, None)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff, se = a.mean() - b.mean(), np.sqrt(va + vb)
    if se == 0:
        return diff, None, None
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * se
    return diff, diff - half, diff + half


def difference_rows(keyed, columns):
    """Adversarial minus Wake-Sleep, per gamma where each rule has at least two seeds."""
    lines = []
    for gamma in sorted({g for _, g, _ in keyed}, reverse=True):
        adv, ws = keyed.get(("adversarial", gamma, True), []), keyed.get(("wake-sleep", gamma, True), [])
        if len(adv) < 2 or len(ws) < 2:
            continue
        lines.append(f"| adversarial - wake-sleep, gamma {gamma:g} (95 % Welch) | | "
                     + " | ".join(welch_cells(adv, ws, columns)) + " |")
    return lines


def welch_cells(first, second, columns):
    """Per column, mean(first) - mean(second) [its Welch interval], or '-' where either group has
    fewer than two values."""
    cells = []
    for key, _ in columns:
        a, b = [r[key] for r in first if key in r], [r[key] for r in second if key in r]
        if len(a) < 2 or len(b) < 2:
            cells.append("-")
            continue
        d, lo, hi = welch(a, b)
        cells.append(f"{_fmt(d)}, identical in every seed" if lo is None else f"{_fmt(d)} [{_fmt(lo)}, {_fmt(hi)}]")
    return cells


def table(keyed, columns):
    head = "| setting | seeds, steps | " + " | ".join(title for _, title in columns) + " |"
    lines = [head, "|---|---|" + "---:|" * len(columns)]
    for (rule, gamma, trained), rows in keyed.items():
        steps = sorted({r["steps"] for r in rows})
        lines.append(f"| {setting(rule, gamma, trained)} | {len(rows)}, {'/'.join(map(str, steps))} | "
                     + " | ".join(cell(rows, key) for key, _ in columns) + " |")
    return "\n".join(lines + difference_rows(keyed, columns))


BENCHMARK_SETTINGS = {("adversarial", 1.0, True): "mnist", ("wake-sleep", 1.0, True): "mnist-wake-sleep",
                      ("adversarial", 0.9, True): "mnist-doubly", ("wake-sleep", 0.9, True): "mnist-doubly-wake-sleep"}


def step_times(path):
    """{(rule, gamma, trained): ms per step} of tests/benchmark.py's default ("fast") step on the CPU."""
    report = _read_json(path)
    ms = {r["setting"]: r["ms_per_step"] for r in report["results"] if r["step"] == "fast" and r["device"] == "cpu"}
    return {key: ms[name] for key, name in BENCHMARK_SETTINGS.items() if name in ms}


def parse_runs(p, argv, marker):
    """The arguments, refusing in one line a run folder without the file `marker`."""
    args = p.parse_args(argv)
    not_runs = [r for r in args.runs if not os.path.isfile(os.path.join(r, marker))]
    if not_runs:
        p.error(f"not train.py run folders (no {marker}): {', '.join(not_runs)}")
    return args


def write_rows(path, rows):
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py run folders")
    p.add_argument("--benchmark", default=None, help="tests/benchmark.py --out JSON: the step time of each rule")
    p.add_argument("--json", default=None, help="write every run's row here")
    args = parse_runs(p, argv, "config.json")
    rows = [run_row(r) for r in args.runs]
    keyed = groups(rows)
    for title, columns in (("Samples (2,000, the digit classifier's features; fd and KID lower is better)", SAMPLES),
                           ("Inference: reconstruction error per pixel from layer k, the classifier's label "
                            "agreement, the linear probe", RECONSTRUCTION + PROBE),
                           ("Wake/sleep two-sample accuracy (0.5: indistinguishable)", TWO_SAMPLE),
                           ("Its null: wake against wake, two random halves of the training images", NULL)):
        print(f"\n{title}\n\n{table(keyed, columns)}")
    if args.benchmark:
        times = step_times(args.benchmark)
        print("\nms per step (tests/benchmark.py, CPU, median):",
              ", ".join(f"{setting(*k)} {v:.0f}" for k, v in times.items()))
    write_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
