#!/usr/bin/env python
"""What holds across runs: the effects neuromodulation.py recorded for several trained models, one
row per effect, the run (its seed) as the unit.

    python neuromodulation_summary.py RUN [RUN ...]                  # the table, on stdout only
    python neuromodulation_summary.py RUN [RUN ...] --out DIR        # also DIR/summary.json, .md, forest.png
    python neuromodulation_summary.py RUN [RUN ...] --only AUROC "ratio to familiar"

Each RUN is a run folder (its neuromodulation/records.json is read), a folder holding records.json,
or a JSON file: a list of records, any of which may carry "effects", a list of {"effect": name,
"value": number or null, "null": number} (and, from neuromodulation.py, the "networks" it was
measured on and its "measure", the name without them). A null or NaN value was not measured in that
run and is skipped. Per effect: the mean with its t-interval and the runs above and below the null;
per measure of the trained networks and each control beside them (--controls, --early), the
trained value minus the control's, run by run, as an effect of its own (null 0).

Tests (docs/neuromodulation.md, "Primary tests"): only the PRIMARY family, named before the runs,
is tested: an exact two-sided sign test and a sign-flip permutation test across runs, each
Holm-corrected over that family alone. Every other row is exploratory: its interval and its runs on
each side of the null, no p-value in the table. An effect of fewer than MIN_RUNS runs is not tested.
"""
import argparse
import fnmatch
import json
import math
import os
import shlex
import sys
import textwrap

import numpy as np

from collections import namedtuple

from stats import holm, mean_interval, sign_flip_test, sign_test, t_test
from utils import HelpFormatter, UserError, pyplot, run_main, unwritable_folder, write_atomically, write_figure, write_json

MIN_RUNS = 3  # a t-test over two runs has one degree of freedom: its p is not read

# The primary family, named before the runs (docs/neuromodulation.md): the trained networks' wake
# above sleep; the novel class above familiar (oddball design); the dose-response's correlation of
# signal and surprisal within levels, averaged over the axes; the gate's novelty response in a
# familiarization stream. Patterns of fnmatch (the novel class's name holds the labels left out).
PRIMARY = ("wake-sleep | trained | signal AUROC, wake > sleep",
           "novelty | trained | novel class: * | oddball | signal AUROC",
           "dose-response | trained | all axes | rho(signal, surprisal) within levels, mean over axes",
           "familiarization | trained | gate | novel vs batch auroc (mean over streams)")

# One effect of one run; measure and networks where the records give them (else None).
Effect = namedtuple("Effect", "value null measure networks")
NAN = float("nan")
BAR = "\\|"  # effect names hold "|", which would end a markdown cell


def get_parser():
    p = argparse.ArgumentParser(description="Summarize neuromodulation.py's effects across runs",
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, folder holding records.json, or a JSON file")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write summary.json, summary.md and forest.png here (default: print only)")
    p.add_argument("--only", nargs="+", default=None, metavar="SUBSTRING",
                   help="keep the effects whose name contains any of these (case-sensitive)")
    return p


def check_args(args, parser):
    """Every check needs the files, and is made in summarize, where its error is one line."""


def records_path(run):
    """The records.json a RUN argument names, in the order its three forms are tried."""
    if not os.path.exists(run):
        raise UserError(f"{run} does not exist")
    if os.path.isfile(run):
        return run
    for path in (os.path.join(run, "neuromodulation", "records.json"), os.path.join(run, "records.json")):
        if os.path.isfile(path):
            return path
    raise UserError(f"{run} holds no records.json nor neuromodulation/records.json: "
                    f"run python neuromodulation.py --path {run} first")


def read_records(path):
    """The records of one run: a JSON list, whose items that are not dicts are no records."""
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}, not a list of records")
    return [r for r in records if isinstance(r, dict)]


def run_effects(records, path):
    """{effect: Effect} of one run, in the records' order; value None where not measured."""
    if any(not isinstance(r.get("effects", []), list) for r in records):
        raise UserError(f"{path}: a record's \"effects\" is not a list")
    effects = {}
    for entry in (e for r in records for e in r.get("effects", [])):
        try:
            name, value, null = str(entry["effect"]), entry["value"], float(entry["null"])
            value = None if value is None or not math.isfinite(float(value)) else float(value)
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: not an effect {{effect, value, null}}: {str(entry)[:80]}") from None
        if name in effects:
            raise UserError(f"{path}: the effect {name!r} appears twice in one run")
        effects[name] = Effect(value, null, entry.get("measure"), entry.get("networks"))
    return with_differences(effects)


def with_differences(effects):
    """The run's effects and, for each measure of the trained networks and each control measured
    beside them, the trained value minus the control's ("novelty | trained - initialization | ...",
    null 0): the effect of training, the run the unit."""
    trained = {e.measure: e for e in effects.values() if e.networks == "trained" and e.measure}
    differences = {}
    for e in effects.values():
        if e.networks in (None, "trained") or e.measure not in trained:
            continue
        experiment, rest = e.measure.split(" | ", 1)
        value = None if None in (e.value, trained[e.measure].value) else trained[e.measure].value - e.value
        differences[f"{experiment} | trained - {e.networks} | {rest}"] = Effect(value, 0.0, e.measure,
                                                                                f"trained - {e.networks}")
    return {**effects, **differences}


def label_of(path):
    """The run folder's name: the folder of records.json, or the one above neuromodulation/."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "neuromodulation":
        folder = os.path.dirname(folder)
    return os.path.basename(folder) or folder


def unique_labels(labels, records):
    """Equal labels told apart by the folder above their run's, from the checkpoint's path, else by
    their place among the RUN arguments (#1, #2...)."""
    def above(rs):
        found = [r["checkpoint"] for r in rs if isinstance(r.get("checkpoint"), str)]
        return os.path.basename(os.path.dirname(os.path.dirname(found[0]))) if found else ""
    named = [f"{label} ({above(rs)})" if labels.count(label) > 1 and above(rs) else label
             for label, rs in zip(labels, records)]
    return [name if named.count(name) == 1 else f"{label} #{i + 1}"
            for i, (label, name) in enumerate(zip(labels, named))]


def load_runs(runs):
    """[(label, {effect: Effect})], one per RUN argument, in their order."""
    paths = [records_path(run) for run in runs]
    records = [read_records(path) for path in paths]
    labels = unique_labels([label_of(path) for path in paths], records)
    return list(zip(labels, (run_effects(rs, path) for rs, path in zip(records, paths))))


def collect(runs, only=None):
    """{effect: (null, {label: value})} in order of first appearance; unmeasured values left out."""
    effects = {}
    for label, values in runs:
        for name, (value, null, _, _) in values.items():
            if only and not any(s in name for s in only):
                continue
            first_null, by_run = effects.setdefault(name, (null, {}))
            if null != first_null:
                raise UserError(f"the effect {name!r} has null {first_null:g} in one run and {null:g} in {label}")
            if value is not None:
                by_run[label] = value
    return effects


def is_primary(name):
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in PRIMARY)


def effect_row(name, null, by_run):
    """The numbers of one effect over the runs that measured it: mean, sd and t-interval, the runs on
    each side of the null, and (nan where not tested: too few runs, or no spread) the p of a t-test,
    the exact sign test and the sign-flip test; only a primary row's are read (PRIMARY)."""
    values = np.array(list(by_run.values()), dtype=np.float64)
    n = len(values)
    interval = mean_interval(values) if n else {"mean": NAN, "low": NAN, "high": NAN}
    above, below = int((values > null).sum()), int((values < null).sum())
    # Equal values are tested by no t-test; t_test's sd == 0 misses them (three 0.7s have an sd of 1e-16).
    tested = n >= MIN_RUNS and n > 1 and values.max() > values.min()
    flags = ([f"fewer than {MIN_RUNS} runs: not tested"] if n < MIN_RUNS else []) + \
            (["no spread across runs: not tested"] if n >= MIN_RUNS and not tested else []) + \
            (["runs disagree in sign"] if above and below else [])
    return {"effect": name, "primary": is_primary(name), "null": null, "n": n, "mean": interval["mean"],
            "sd": float(values.std(ddof=1)) if n > 1 else NAN, "low": interval["low"], "high": interval["high"],
            "above": above, "below": below, "equal": n - above - below,
            "p": t_test(values, null) if tested else NAN, "p_sign": sign_test(values, null) if tested else NAN,
            "p_permutation": sign_flip_test(values, null) if tested else NAN,
            "p_sign_holm": NAN, "p_permutation_holm": NAN, "flags": flags, "values": dict(by_run)}


def summarize(runs, only=None):
    """One row per effect; Holm's adjustment of the sign and the sign-flip tests over the primary
    family alone (the rows of PRIMARY that are tested), every other row exploratory."""
    rows = [effect_row(name, null, by_run) for name, (null, by_run) in collect(runs, only).items()]
    primary = [row for row in rows if row["primary"]]
    for test in ("p_sign", "p_permutation"):
        for row, adjusted in zip(primary, holm([row[test] for row in primary])):
            row[test + "_holm"] = adjusted
    return rows


def fmt(x, p=False):
    """A number of the table; "-" where there is none (not measured, not tested)."""
    if not math.isfinite(x):
        return "-"
    if p:
        return f"{x:.2g}" if x >= 0.001 else f"{x:.1e}"
    return f"{x:.3g}"


def _signs(r):
    return f"{r['above']}+ {r['below']}-" + (f" {r['equal']}=" if r["equal"] else "")


def _against_control(row, rows):
    """The cell of a primary row's trained - initialization difference: its mean and t-interval."""
    experiment, _, rest = row["effect"].split(" | ", 2)
    found = [r for r in rows if r["effect"] == f"{experiment} | trained - initialization | {rest}"]
    return f"{fmt(found[0]['mean'])} [{fmt(found[0]['low'])}, {fmt(found[0]['high'])}] ({found[0]['n']})" \
        if found else "-"


def table(rows, n_runs):
    """The markdown tables, primary then exploratory, under headers that say what each test and its
    family are."""
    runs = f"{n_runs} run" + ("s" if n_runs != 1 else "")
    primary = [r for r in rows if r["primary"]]
    m = sum(math.isfinite(r["p_sign"]) for r in primary)
    lines = [f"Primary tests across {runs} (the run, its seed, is the unit; named before the runs): mean and 95 % "
             f"t-interval of the mean; +/-: runs above/below the null; the exact two-sided sign test and the "
             f"sign-flip permutation test of the mean, each Holm-corrected over this family of {m} tested effects "
             f"alone (n >= {MIN_RUNS}); beside them the trained networks minus the same networks at initialization "
             f"(mean, 95 % t-interval, runs).", "",
             "| effect | null | n | mean | 95 % t-interval | +/- | sign p | Holm | permutation p | Holm | "
             "trained - initialization | note |", "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
    lines += [f"| {r['effect'].replace('|', BAR)} | {r['null']:g} | {r['n']} | {fmt(r['mean'])} | "
              f"[{fmt(r['low'])}, {fmt(r['high'])}] | {_signs(r)} | {fmt(r['p_sign'], True)} | "
              f"{fmt(r['p_sign_holm'], True)} | {fmt(r['p_permutation'], True)} | "
              f"{fmt(r['p_permutation_holm'], True)} | {_against_control(r, rows)} | {'; '.join(r['flags'])} |"
              for r in primary]
    lines += ["", f"Exploratory effects across {runs}: mean, sd and 95 % t-interval of the mean, runs above/below "
              f"the null; no test (\"trained - X\": the trained networks' value minus control X's, run by run).", "",
              "| effect | null | n | mean | sd | 95 % t-interval | +/- | note |", "|---|---:|---:|---:|---:|---|---|---|"]
    lines += [f"| {r['effect'].replace('|', BAR)} | {r['null']:g} | {r['n']} | {fmt(r['mean'])} | {fmt(r['sd'])} | "
              f"[{fmt(r['low'])}, {fmt(r['high'])}] | {_signs(r)} | {'; '.join(r['flags'])} |"
              for r in rows if not r["primary"]]
    return "\n".join(lines)


def draw_forest(rows, path):
    """One panel per null (AUROCs, ratios and correlations have scales of their own), a row per effect:
    each run's value a dot, the mean and its t-interval a bar, the null a vertical line."""
    plt = pyplot("the forest plot")
    if plt is None:
        return
    nulls = sorted({r["null"] for r in rows})
    panels = [[r for r in rows if r["null"] == null] for null in nulls]
    fig, axes = plt.subplots(len(nulls), 1, squeeze=False, figsize=(10, 1.2 + 0.45 * len(rows) + 0.6 * len(nulls)),
                             gridspec_kw={"height_ratios": [len(panel) for panel in panels]}, layout="constrained")
    for ax, null, panel in zip(axes[:, 0], nulls, panels):
        for y, r in enumerate(panel):
            ax.plot(list(r["values"].values()), [y] * r["n"], "o", color="tab:blue", alpha=0.5, ms=4)
            tested = math.isfinite(r["p"])
            ax.plot([r["low"], r["high"]], [y, y], "-", color="black" if tested else "gray", lw=2)
            ax.plot([r["mean"]], [y], "D", color="black" if tested else "gray", ms=5)
        ax.axvline(null, color="tab:red", lw=1)
        ax.set_yticks(range(len(panel)))
        ax.set_yticklabels([textwrap.fill(r["effect"], 45, break_on_hyphens=False) for r in panel], fontsize=6)
        ax.set_ylim(len(panel) - 0.5, -0.5)
        ax.set_title(f"null {null:g} (red); dots: runs; bar: mean and 95 % t-interval (gray: not tested)", fontsize=8)
    write_figure(fig, plt, path)


def command(args):
    """The command line that made a summary.md, for its reader to make it again."""
    return shlex.join(["python", "neuromodulation_summary.py", *args.runs] + (["--out", args.out] if args.out else [])
                      + (["--only", *args.only] if args.only else []))


def summary(args):
    """Read every run, then print the table and, with --out, write it, its numbers and the figure."""
    if args.out:
        problem = unwritable_folder(args.out)  # before the work, which nothing could then keep
        if problem:
            raise UserError(f"--out {args.out} cannot be written ({problem}); nothing was computed")
    runs = load_runs(args.runs)
    rows = summarize(runs, args.only)
    if not rows:
        read = ", ".join(records_path(run) for run in args.runs)
        raise UserError(f"no effects{' matching --only ' + ' '.join(args.only) if args.only else ''} "
                        f"in any run (read {read})")
    text = table(rows, len(runs))
    print(text)
    if args.out:
        labels = [label for label, _ in runs]
        plain = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731 (JSON has no NaN)
        write_json(os.path.join(args.out, "summary.json"), [{k: plain(v) for k, v in r.items()} for r in rows])
        md = f"{text}\n\nruns: {', '.join(labels)}\n\ncommand: `{command(args)}`\n"
        write_atomically(os.path.join(args.out, "summary.md"), lambda f: f.write(md.encode()))
        draw_forest(rows, os.path.join(args.out, "forest.png"))
        print(f"summary: {os.path.join(args.out, 'summary.json')}, summary.md")
    return 0


def main(argv=None):
    return run_main(get_parser(), check_args, summary, argv)


if __name__ == "__main__":
    sys.exit(main())
