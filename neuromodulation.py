#!/usr/bin/env python
"""The wake/sleep discriminator as a neuromodulator: record it, and put a trained model through
the protocols by which cholinergic and novelty responses are studied (docs/neuromodulation.md).

    python neuromodulation.py --path RUN                       # every experiment, on the run's data
    python neuromodulation.py --path RUN --experiments dose-response --controls init RUN/checkpoint_epoch2.pth.tar
    python neuromodulation_summary.py RUN1 RUN2 ...            # each effect across runs (seeds)

The paper maps D's score of the network's state onto a neuromodulator (#1, putatively
acetylcholine): high in wake, pushed down in sleep, and projected back to gate the plasticity of
the feedforward (inference) connections. recording.py records each input's signal, gate, weight
and generative surprisal by the training step's own code; neuromodulation_experiments.py holds the
experiments. This script turns their recordings into effects (each with an interval whose unit is
the scored batch, flagged where there are fewer than stats.MIN_BLOCKS of them), prints tables,
draws figures into --out and writes the records, each carrying the effects that
neuromodulation_summary.py compares across runs.
"""
import argparse
import datetime
import os
import sys
import warnings

import numpy as np
import torch

import neuromodulation_experiments as ex
import train
from checkpoint import add_checkpoint_flags, dataset_of, load_networks, resolve_checkpoint_path
from data import DATASETS, channels_of
from losses import StepConfig
from stats import MIN_BLOCKS, auroc, bootstrap_interval, mean_interval, spearman
from step import check_d_gradients
from utils import HelpFormatter, UserError, append_jsonl, pick_device, pyplot, run_main, unwritable_folder, write_figure, \
    write_json

EXPERIMENTS = ("wake-sleep", "novelty", "dose-response", "plasticity", "familiarization")


def get_parser():
    p = argparse.ArgumentParser(description="Record the wake/sleep discriminator as a neuromodulator",
                                formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    p.add_argument("-b", "--batch-size", type=int, default=100,
                   help="the one size of every scored batch (D's minibatch std couples a batch's samples)")
    p.add_argument("--n-images", type=int, default=1000,
                   help="inputs per condition in the whole-batch design (a multiple of -b is used)")
    p.add_argument("--oddballs", type=int, default=5, metavar="M",
                   help="oddball design: probes per batch, the other -b minus M familiar")
    p.add_argument("--n-oddball", type=int, default=200, help="oddball design: probes per condition")
    p.add_argument("--controls", nargs="*", default=["init"], metavar="init|CHECKPOINT",
                   help="dose-response: the same curves for other networks: init (the run's networks untrained, "
                        "same flags and seed) and checkpoints of the run (e.g. an early checkpoint_epochE.pth.tar)")
    p.add_argument("--sustained-steps", type=int, default=20,
                   help="plasticity: training steps on a condition over which F's update is measured")
    p.add_argument("--ood-dataset", default=None, choices=DATASETS,
                   help="an out-of-distribution dataset (its test split), e.g. cifar10 for an MNIST model; "
                        "converted to the model's channels and resized to its image size")
    p.add_argument("--ood-data", default=None, metavar="DIR", help="the root of --ood-dataset")
    p.add_argument("--repeats", type=int, default=32, metavar="K",
                   help="familiarization: the repeated set, K test images (also the batch of every step)")
    p.add_argument("--presentations", type=int, default=100, help="familiarization: training steps on a stream")
    p.add_argument("--streams", type=int, default=5,
                   help="familiarization: independent streams (their own images and seeds): the unit of its intervals")
    p.add_argument("--novel-rate", type=float, default=0.25,
                   help="familiarization: chance that a step's batch has one repeated image replaced by a novel one")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of each bootstrap interval")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs drawn, the networks' noise and the streams")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    p.add_argument("--json", default=None, metavar="FILE.jsonl", help="append one record per condition here")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the figures and records.json (default: neuromodulation/ beside the checkpoint)")
    return p


def check_args(args, parser):
    problems = [f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}"
                for k in ("n_images", "repeats", "presentations", "bootstrap", "streams", "n_oddball", "sustained_steps")
                if getattr(args, k) < 1]
    if args.seed < 0:  # numpy's generators (the bootstrap) take no negative seed
        problems.append(f"--seed must not be negative, got {args.seed}")
    if args.batch_size < 2:
        problems.append(f"-b must be at least 2 (BatchNorm and the minibatch std need two samples), got "
                        f"{args.batch_size}")
    elif args.n_images < args.batch_size:
        problems.append(f"--n-images {args.n_images} is less than one batch (-b {args.batch_size})")
    elif not 1 <= args.oddballs < args.batch_size:
        problems.append(f"--oddballs must lie in 1 .. {args.batch_size - 1} (-b minus one), got {args.oddballs}")
    elif args.n_oddball < args.oddballs:
        problems.append(f"--n-oddball {args.n_oddball} is less than one batch's probes (--oddballs {args.oddballs})")
    if args.repeats < 2:
        problems.append("--repeats must be at least 2 (the stream's batch)")
    if not 0 <= args.novel_rate <= 1:
        problems.append(f"--novel-rate must lie in [0, 1], got {args.novel_rate}")
    if (args.ood_dataset is None) != (args.ood_data is None) and args.ood_dataset != "digits":
        problems.append("--ood-dataset and --ood-data go together (digits needs no --ood-data)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        problems.append(f"--json {args.json}: its folder does not exist")
    if problems:
        parser.error("; ".join(problems))


# --- Effects ----------------------------------------------------------------------------------------

def effect(name, value, null):
    """One entry of a record's "effects": what neuromodulation_summary.py compares across runs."""
    return {"effect": name, "value": None if value is None or np.isnan(value) else float(value), "null": null}


def summary(values):
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "median": float(np.median(values)), "n": int(len(values))}


def compare(a, b, reps, seed, batch_size):
    """Whole-batch design: a against b, each scored in batches of its own. AUROC P(a > b) and the
    difference of means, each with a 95 % bootstrap interval over those batches (the unit: a batch
    shares its BatchNorm statistics and minibatch std), flagged below MIN_BLOCKS batches."""
    diff = lambda x, y: float(x.mean() - y.mean())  # noqa: E731
    blocks = min(len(a), len(b)) // batch_size
    return {"auroc": auroc(a, b), "auroc_ci": bootstrap_interval(auroc, (a, b), reps, seed, batch_size),
            "mean_difference": diff(a, b),
            "mean_difference_ci": bootstrap_interval(diff, (a, b), reps, seed, batch_size),
            "batches": blocks, "few_batches": blocks < MIN_BLOCKS}


def oddball_compare(probes, mates, per_batch):
    """Oddball design: each batch's probes against their own familiar batch-mates. Per batch, the
    AUROC P(probe > mate) and the difference of means; their mean over batches with a t-interval
    (the batches are independent draws, the unit)."""
    p, m = probes.reshape(-1, per_batch), mates.reshape(len(probes) // per_batch, -1)
    a = mean_interval([auroc(pi, mi) for pi, mi in zip(p, m)])
    d = mean_interval(p.mean(axis=1) - m.mean(axis=1))
    return {"auroc": a["mean"], "auroc_ci": [a["low"], a["high"]], "mean_difference": d["mean"],
            "mean_difference_ci": [d["low"], d["high"]], "batches": len(p), "few_batches": len(p) < MIN_BLOCKS}


def rank_correlation(x, y, reps, seed, batch_size):
    """Spearman's rho of paired per-input values, with a 95 % bootstrap interval over whole batches."""
    return {"rho": spearman(x, y), "ci": bootstrap_interval(spearman, (x, y), reps, seed, batch_size, paired=True),
            "batches": len(x) // batch_size}


# --- Records of each experiment -----------------------------------------------------------------------

def condition_record(s, experiment, name, recording, keys):
    values = recording.numpy()
    record = {"experiment": experiment, "condition": name, "n": len(recording.signal),
              **{k: summary(values[k]) for k in keys}, "effects": []}
    if "gate" in keys:
        record["gate_by_layer"] = recording.gate.mean(dim=0).tolist()
        record["signal_gate_spearman"] = rank_correlation(values["signal"], values["gate"], s.args.bootstrap,
                                                          s.args.seed, s.args.batch_size)
        record["effects"].append(effect(f"{experiment} | {name} | rho(signal, gate) within the condition",
                                        record["signal_gate_spearman"]["rho"], 0.0))
    return record


def recorded_keys(s):
    # The weight 2 sigmoid(-D) acts only in a run trained with --scale-gen-surprisal-by-D: elsewhere
    # it is a number nothing uses, and is not recorded.
    return ("signal", "gate", "surprisal") + (("weight",) if s.run_flags.scale_gen_surprisal_by_D else ())


def wake_sleep_records(s, conditions, reference):
    """Wake against sleep. F never learns from sleep states, so they carry the signal alone: no gate."""
    ref = dict(conditions)[reference].numpy()
    records = []
    for name, rec in conditions:
        keys = recorded_keys(s) if name != reference else ("signal", "surprisal")
        record = condition_record(s, "wake-sleep", name, rec, keys)
        if name != reference:
            values, a = rec.numpy(), s.args
            record.update(against=reference, comparison={k: compare(values[k], ref[k], a.bootstrap, a.seed,
                                                                    a.batch_size) for k in ("signal", "surprisal")})
            record["effects"].append(effect("wake-sleep | signal AUROC, wake > sleep",
                                            record["comparison"]["signal"]["auroc"], 0.5))
        records.append(record)
    return records


def novelty_records(s, whole, oddball):
    """One record per condition; every one but the familiar compared with it in both designs, and
    the batch effect: the oddball AUROC minus the whole-batch AUROC."""
    a, records = s.args, []
    ref = whole[ex.FAMILIAR].numpy()
    for name, rec in whole.items():
        record = condition_record(s, "novelty", name, rec, recorded_keys(s))
        if name != ex.FAMILIAR:
            values = rec.numpy()
            probes, mates = (r.numpy() for r in oddball[name])
            record["against"] = ex.FAMILIAR
            record["whole_batch"] = {k: compare(values[k], ref[k], a.bootstrap, a.seed, a.batch_size)
                                     for k in ("signal", "gate", "surprisal")}
            record["oddball"] = {k: oddball_compare(probes[k], mates[k], a.oddballs) for k in ("signal", "gate", "surprisal")}
            record["batch_effect"] = {k: record["oddball"][k]["auroc"] - record["whole_batch"][k]["auroc"]
                                      for k in ("signal", "gate", "surprisal")}
            for design in ("whole_batch", "oddball"):
                for k in ("signal", "gate", "surprisal"):
                    record["effects"].append(effect(f"novelty | {name} | {design.replace('_', '-')} | {k} AUROC",
                                                    record[design][k]["auroc"], 0.5))
        records.append(record)
    return records


def median_band(values, s):
    """The median of per-input values with a 95 % bootstrap interval over the batches they were scored in."""
    a = s.args
    return {"median": float(np.median(values)),
            "ci": bootstrap_interval(lambda v: float(np.median(v)), (values,), a.bootstrap, a.seed, a.batch_size)}


CURVE_PAIRS = (("signal", "surprisal"), ("gate", "surprisal"), ("signal", "level"), ("gate", "level"),
               ("surprisal", "level"))


def dose_records(s, model, curves):
    """Per axis and level: medians with bands, the level against level 0 (whole-batch) and the probes
    against familiar batch-mates (oddball). Per axis: Spearman's rho of signal and gate with the
    surprisal and the level, over every input of every level."""
    a, records = s.args, []
    for axis, points in curves.items():
        base = points[0][1].numpy()
        for level, rec, oddball in points:
            values, (probes, mates) = rec.numpy(), (r.numpy() for r in oddball)
            record = {"experiment": "dose-response", "model": model, "axis": axis, "level": level,
                      "n": len(rec.signal), **{k: median_band(values[k], s) for k in ("signal", "gate", "surprisal")},
                      "oddball": {k: oddball_compare(probes[k], mates[k], a.oddballs) for k in ("signal", "gate")}}
            if level > 0:
                record["whole_batch"] = {k: compare(values[k], base[k], a.bootstrap, a.seed, a.batch_size)
                                         for k in ("signal", "gate")}
            records.append(record)
        values = {k: np.concatenate([rec.numpy()[k] for _, rec, _ in points]) for k in ("signal", "gate", "surprisal")}
        values["level"] = np.concatenate([np.full(len(rec.signal), level) for level, rec, _ in points])
        rho = {f"{x}, {y}": rank_correlation(values[x], values[y], a.bootstrap, a.seed, a.batch_size)
               for x, y in CURVE_PAIRS}
        prefix = f"dose-response | {model} | {axis}"
        effects = [effect(f"{prefix} | rho({pair})", r["rho"], 0.0) for pair, r in rho.items()]
        for level, record in ((points[1][0], records[-len(points) + 1]), (points[-1][0], records[-1])):
            effects.append(effect(f"{prefix} | oddball signal AUROC at level {level:g}",
                                  record["oddball"]["signal"]["auroc"], 0.5))
        records.append({"experiment": "dose-response", "model": model, "axis": axis, "level": "all",
                        "spearman": rho, "effects": effects})
    return records


def plasticity_records(s, found):
    """Each condition's gradient from D into F and F's update, as ratios to the familiar condition's
    (the gradient's interval: a bootstrap over the batches; each update is one trajectory)."""
    a, records = s.args, []
    familiar = found[ex.FAMILIAR]
    g0 = np.array(familiar["gradient"])
    ratio = lambda x, y: float(x.mean() / y.mean())  # noqa: E731
    for name, f in found.items():
        g = np.array(f["gradient"])
        record = {"experiment": "plasticity", "condition": name, "gradient_norm": summary(g),
                  "update_1": f["update_1"], "update_n": f["update_n"], "steps": s.args.sustained_steps, "effects": []}
        if name != ex.FAMILIAR:
            record["ratio_to_familiar"] = {
                "gradient": ratio(g, g0), "gradient_ci": bootstrap_interval(ratio, (g, g0), a.bootstrap, a.seed),
                "gradient_batches": len(g), "update_1": f["update_1"] / familiar["update_1"],
                "update_n": f["update_n"] / familiar["update_n"]}
            r = record["ratio_to_familiar"]
            record["effects"] = [
                effect(f"plasticity | {name} | D's gradient into F, ratio to familiar", r["gradient"], 1.0),
                effect(f"plasticity | {name} | F's update in 1 step, ratio to familiar", r["update_1"], 1.0),
                effect(f"plasticity | {name} | F's update over {s.args.sustained_steps} steps, ratio to familiar",
                       r["update_n"], 1.0)]
        records.append(record)
    return records


def familiarization_effects(stream):
    """One stream's habituation of the repeated set (each image's mean over the last tenth of the
    stream minus its mean over the first tenth, averaged over the images) and its novelty response
    (a novel image against the repeated images of its own batch: the difference, and the fraction of
    them it exceeds), for the signal and the gate. Tenths rather than single presentations: every
    step moves D, which can shift a whole batch's scores from one step to the next by more than
    images differ; within-batch comparisons for the same reason."""
    T, K = stream.shown.shape
    novel_t, novel_k = np.nonzero(stream.shown < 0)
    tenth = max(1, T // 10)
    early, late = slice(0, tenth), slice(T - tenth, T)
    effects = {"steps": T, "repeated": K, "novel_insertions": len(novel_t)}
    for key in ("signal", "gate"):
        repeated = stream.repeated(key)
        with warnings.catch_warnings():  # an image replaced by novel ones all through a short tenth has no mean there
            warnings.simplefilter("ignore", RuntimeWarning)
            first, last = np.nanmean(repeated[early], axis=0), np.nanmean(repeated[late], axis=0)
        e = {"repeated_by_step": np.nanmean(repeated, axis=1).tolist(), "repeated_first_tenth": float(np.nanmean(first)),
             "repeated_last_tenth": float(np.nanmean(last)), "habituation": float(np.nanmean(last - first))}
        if len(novel_t):
            novel = getattr(stream, key)[novel_t, novel_k]
            mates = [row[~np.isnan(row)] for row in repeated[novel_t]]
            e.update(novel=novel.tolist(), novel_steps=novel_t.tolist(),
                     novelty_response=float(np.mean([v - m.mean() for v, m in zip(novel, mates)])),
                     novel_vs_batch_auroc=float(np.mean([auroc(np.array([v]), m) for v, m in zip(novel, mates)])))
        effects[key] = e
    return effects


FAMILIARIZATION_MEASURES = (("habituation", 0.0), ("novelty_response", 0.0), ("novel_vs_batch_auroc", 0.5))


def familiarization_record(per_stream):
    """The streams' effects, and each measure's mean over the streams with a t-interval: the stream is
    the unit (one stream is one sample, however many images it shows)."""
    across = {}
    for key in ("signal", "gate"):
        across[key] = {m: mean_interval([e[key][m] for e in per_stream if m in e[key]])
                       for m, _ in FAMILIARIZATION_MEASURES if any(m in e[key] for e in per_stream)}
    effects = [effect(f"familiarization | {key} | {m.replace('_', ' ')} (mean over streams)", across[key][m]["mean"], null)
               for key in ("signal", "gate") for m, null in FAMILIARIZATION_MEASURES if m in across[key]]
    return {"experiment": "familiarization", "condition": "streams", "streams": len(per_stream),
            "per_stream": per_stream, "across_streams": across, "effects": effects}


# --- Tables -------------------------------------------------------------------------------------------

def _ci(c, few=False):
    return f"[{c[0]:.3g}, {c[1]:.3g}]" + ("*" if few else "")


FEW = (f"* fewer than {MIN_BLOCKS} scored batches: the interval is not to be read "
       f"(a bootstrap over so few blocks covers far less than 95 %)")


def _auroc_cell(c):
    return f"{c['auroc']:.3f} {_ci(c['auroc_ci'], c['few_batches'])}"


def print_wake_sleep(records):
    print("\nwake and sleep (per input: mean (sd); AUROC P(wake > sleep), bootstrap over the scored batches)")
    for r in records:
        cells = "  ".join(f"{k} {r[k]['mean']:.4g} ({r[k]['sd']:.2g})" for k in ("signal", "gate", "surprisal") if k in r)
        extra = f"  AUROC signal {_auroc_cell(r['comparison']['signal'])}" if "comparison" in r else ""
        print(f"  {r['condition']:<28} {cells}{extra}")
    if any(r.get("comparison", {}).get("signal", {}).get("few_batches") for r in records):
        print("  " + FEW)


def print_novelty(records):
    print("\nfamiliar, novel and out-of-distribution inputs: AUROC P(condition > familiar), 95 % intervals; "
          "whole-batch (batches of its own; bootstrap over batches) and oddball (probes among familiar "
          "batch-mates; t over batches); batch effect = oddball - whole-batch. Intervals are per comparison, "
          "uncorrected: read across seeds with neuromodulation_summary.py")
    print(f"{'condition':<40} {'key':<9} {'mean (sd)':>17}  {'whole-batch':>24}  {'oddball':>24}  {'batch effect':>12}")
    for r in records:
        for k in ("signal", "gate", "surprisal"):
            cells = ["reference"] * 2 + [""]
            if "whole_batch" in r:
                cells = [_auroc_cell(r["whole_batch"][k]), _auroc_cell(r["oddball"][k]), f"{r['batch_effect'][k]:+.3f}"]
            name = r["condition"] if k == "signal" else ""
            print(f"{name:<40} {k:<9} {r[k]['mean']:>9.4g} ({r[k]['sd']:.2g})  {cells[0]:>24}  {cells[1]:>24}  "
                  f"{cells[2]:>12}")
        print(f"{'':<40} rho(signal, gate) within the condition {r['signal_gate_spearman']['rho']:.3f} "
              f"{_ci(r['signal_gate_spearman']['ci'])}")
    if any(c["few_batches"] for r in records for d in ("whole_batch", "oddball") for c in r.get(d, {}).values()):
        print(FEW)


def print_dose(records):
    print("\ndose-response: the familiar images moved along each axis (level 0: unchanged); per level the median "
          "signal, gate and surprisal, the oddball AUROC of the signal; per axis Spearman's rho (bootstrap over batches)")
    for r in records:
        if r["level"] == "all":
            rho = "  ".join(f"rho({pair}) {c['rho']:+.2f} {_ci(c['ci'])}" for pair, c in r["spearman"].items())
            print(f"  {r['model']:<16} {r['axis']:<9} {rho}")
        else:
            print(f"  {r['model']:<16} {r['axis']:<9} level {r['level']:<4g} signal {r['signal']['median']:>8.4g}  "
                  f"gate {r['gate']['median']:>9.4g}  surprisal {r['surprisal']['median']:>7.4g}  "
                  f"oddball AUROC {_auroc_cell(r['oddball']['signal'])}")


def print_plasticity(records):
    print(f"\nplasticity: D's gradient into F (norm per batch) and F's Adam update after 1 and {records[0]['steps']} "
          "steps on the condition, from the checkpoint's optimizer state; ratios to familiar")
    for r in records:
        q = r.get("ratio_to_familiar")
        ratios = (f"ratios {q['gradient']:.3g} {_ci(q['gradient_ci'], q['gradient_batches'] < MIN_BLOCKS)}, "
                  f"{q['update_1']:.3g}, {q['update_n']:.3g}") if q else "reference"
        print(f"  {r['condition']:<40} gradient {r['gradient_norm']['mean']:.4g}  update {r['update_1']:.4g}, "
              f"{r['update_n']:.4g}  {ratios}")


def print_familiarization(record):
    print(f"\nfamiliarization: {record['streams']} streams (the unit of these t-intervals), each "
          f"{record['per_stream'][0]['steps']} training steps on {record['per_stream'][0]['repeated']} repeated "
          f"test images with rare novel ones")
    for key, measures in record["across_streams"].items():
        print(f"  {key:<6} " + "  ".join(f"{m.replace('_', ' ')} {c['mean']:.3g} [{c['low']:.3g}, {c['high']:.3g}]"
                                         for m, c in measures.items()))


# --- Figures ------------------------------------------------------------------------------------------

def plot_conditions(title, conditions, path):
    """The signal and the gate of every condition, as box plots (the gate on a log axis: out-of-
    distribution inputs move it by orders of magnitude, familiar against novel by a few per cent)."""
    plt = pyplot("the figures")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(conditions)), sharey=True)
    names = [name for name, _ in conditions]
    for ax, key, label in ((axes[0], "signal", "signal: D's score of the state"),
                           (axes[1], "gate", "plasticity gate: L1 of D's gradient to h1..h5")):
        values = [rec.numpy()[key] for _, rec in conditions]
        try:  # matplotlib 3.10 and later; vert= is deprecated there
            ax.boxplot(values, orientation="horizontal", whis=(1, 99), sym=".", flierprops={"markersize": 2})
        except TypeError:
            ax.boxplot(values, vert=False, whis=(1, 99), sym=".", flierprops={"markersize": 2})
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].set_yticks(range(1, len(names) + 1), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title} (boxes: quartiles; whiskers: 1st and 99th percentiles)")
    fig.tight_layout()
    write_figure(fig, plt, path)


def _dose_curve(rs, key):
    """(levels, values, bands) of one model's records along one axis: the oddball AUROC of the
    signal (key "auroc"), or a median, the signal's as its change from level 0."""
    level = [r["level"] for r in rs]
    if key == "auroc":
        return level, [r["oddball"]["signal"]["auroc"] for r in rs], [r["oddball"]["signal"]["auroc_ci"] for r in rs]
    shift = rs[0][key]["median"] if key == "signal" else 0.0
    return level, [r[key]["median"] - shift for r in rs], [[c - shift for c in r[key]["ci"]] for r in rs]


def plot_dose(records, path):
    """Against the level of each axis, one line per model (the trained one and its controls): the
    signal's change from the familiar images (D's offset differs between models), the gate (log
    axis), the surprisal (medians with batch-bootstrap bands) and the oddball AUROC of the signal,
    which compares across models without their scales."""
    plt = pyplot("the figures")
    if plt is None:
        return
    points = [r for r in records if r["level"] != "all"]
    axes_names = list(dict.fromkeys(r["axis"] for r in points))
    models = list(dict.fromkeys(r["model"] for r in points))
    rows = (("signal", "signal - its level-0 median"), ("gate", "gate (median)"), ("surprisal", "surprisal (median)"),
            ("auroc", "oddball AUROC of the signal"))
    fig, axes = plt.subplots(len(rows), len(axes_names), figsize=(3.2 * len(axes_names), 9.5), squeeze=False,
                             sharex=True)
    for row, (key, label) in enumerate(rows):
        for col, axis in enumerate(axes_names):
            ax = axes[row][col]
            for i, model in enumerate(models):
                rs = [r for r in points if r["axis"] == axis and r["model"] == model]
                level, mid, band = _dose_curve(rs, key)
                ax.plot(level, mid, "o-", ms=3, color=f"C{i}", label=model)
                ax.fill_between(level, *zip(*band), color=f"C{i}", alpha=0.2)
            ax.grid(alpha=0.3)
            if key == "gate":
                ax.set_yscale("log")
            if key == "auroc":
                ax.axhline(0.5, color="k", lw=0.8)
            if row == 0:
                ax.set_title(axis)
            if row == len(rows) - 1:
                ax.set_xlabel("level (0: the familiar images)")
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("dose-response: inputs moved away from the familiar ones (bands: 95 %, over batches)")
    fig.tight_layout()
    write_figure(fig, plt, path)


def plot_familiarization(stream, path):
    """One stream's signal and gate at every presentation: the repeated set's mean and spread per
    step, and each novel insertion."""
    plt = pyplot("the figures")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = np.arange(1, len(stream.shown) + 1)
    novel_t, novel_k = np.nonzero(stream.shown < 0)
    for ax, key, label in ((axes[0], "signal", "signal"), (axes[1], "gate", "plasticity gate (L1, h1..h5)")):
        repeated = stream.repeated(key)
        m, sd = np.nanmean(repeated, axis=1), np.nanstd(repeated, axis=1)
        ax.plot(steps, m, color="C0", label="repeated set: mean")
        ax.fill_between(steps, m - sd, m + sd, color="C0", alpha=0.25, label="repeated set: sd")
        ax.plot(novel_t + 1, getattr(stream, key)[novel_t, novel_k], "o", color="C3", ms=3, label="novel insertion")
        ax.set_xlabel("presentation (training step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("familiarization: training on a repeated set (the first stream)")
    fig.tight_layout()
    write_figure(fig, plt, path)


# --- The script -------------------------------------------------------------------------------------

def setup(args):
    """Checkpoint, networks, the run's flags and the step's D path; the dataset the model trained on."""
    device = pick_device(args.device, args.gpu)
    path = resolve_checkpoint_path(args.path)
    state, nets = load_networks(path, device)
    if nets.discriminator is None:
        raise UserError(f"{path} was trained with --inference-rule wake-sleep: it has no wake/sleep discriminator, "
                        f"so no neuromodulator to record")
    config = state.get("config") or {}
    dataset, data = dataset_of(path, state, args)
    if channels_of(dataset) != nets.cfg.channels:
        raise UserError(f"{path} holds a model of {nets.cfg.channels}-channel images; --dataset {dataset} has "
                        f"{channels_of(dataset)}")
    # the run's flags: the checkpoint's, over train.py's defaults for any it predates
    run_flags = train.get_parser().parse_args([])
    vars(run_flags).update({k: v for k, v in config.items() if k in vars(run_flags)})
    if run_flags.gamma == 0:
        raise UserError(f"{path} was trained with --gamma 0 (a WGAN-GP): its wake/sleep discriminator never "
                        f"trained, so there is no neuromodulator to record; nothing was computed")
    nets.train()
    hp = check_d_gradients(nets, StepConfig.from_args(run_flags))
    return ex.Setup(args, nets, hp, run_flags, state, path, dataset, data, device)


def control_networks(s):
    """[(label, networks)] of --controls: init, and checkpoints of the same architecture (checked before any work)."""
    controls = []
    for c in s.args.controls:
        if c == "init":
            controls.append(("initialization", ex.initial_networks(s)))
            continue
        state, nets = load_networks(resolve_checkpoint_path(c), s.device)
        if nets.cfg != s.nets.cfg:
            raise UserError(f"--controls {c}: another architecture than {s.checkpoint}'s; nothing was computed")
        nets.train()
        controls.append((f"epoch {state.get('epoch')}", nets))
    return controls


def run_experiments(s, controls, out):
    """Every experiment asked for, in order: its records (tables printed and figures drawn on the way)."""
    records = []
    # drawn once for both experiments that score them (the OOD dataset is read, and said, once)
    novelty_inputs = ex.novelty_inputs(s) if {"novelty", "plasticity"} & set(s.args.experiments) else None
    if "wake-sleep" in s.args.experiments:
        conditions, reference = ex.wake_sleep(s)
        records += (found := wake_sleep_records(s, conditions, reference))
        print_wake_sleep(found)
        plot_conditions("wake and sleep", conditions, os.path.join(out, "wake-sleep.png"))
    if "novelty" in s.args.experiments:
        whole, oddball = ex.novelty(s, novelty_inputs)
        records += (found := novelty_records(s, whole, oddball))
        print_novelty(found)
        plot_conditions("familiar, novel and out-of-distribution inputs (whole-batch)", list(whole.items()),
                        os.path.join(out, "novelty.png"))
    if "dose-response" in s.args.experiments:
        inputs, found = ex.dose_inputs(s), []
        for label, nets in [("trained", s.nets)] + controls:
            found += dose_records(s, label, ex.dose_response(s, nets, inputs))
        print_dose(found)
        plot_dose(found, os.path.join(out, "dose-response.png"))
        records += found
    if "plasticity" in s.args.experiments:
        records += (found := plasticity_records(s, ex.plasticity(s, novelty_inputs)))
        print_plasticity(found)
    if "familiarization" in s.args.experiments:
        streams = [ex.familiarization(s, i) for i in range(s.args.streams)]
        records.append(found := familiarization_record([familiarization_effects(st) for st in streams]))
        print_familiarization(found)
        plot_familiarization(streams[0], os.path.join(out, "familiarization.png"))
    return records


def neuromodulation(args):
    s = setup(args)
    out = args.out or os.path.join(os.path.dirname(s.checkpoint), "neuromodulation")
    problem = unwritable_folder(out)  # before the work, which a figure or records.json could not keep
    if problem:
        raise UserError(f"--out {out} cannot be written ({problem}); nothing was computed")
    controls = control_networks(s) if "dose-response" in args.experiments else []
    common = {"checkpoint": os.path.abspath(s.checkpoint), "epoch": s.state.get("epoch"), "model": s.state["model"],
              "dataset": s.dataset, "data": os.path.abspath(s.data) if s.data else None,
              "classes": s.run_flags.classes, "d_gradients": s.hp.d_gradients, "batch_size": args.batch_size,
              "flags": vars(args), "time": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"{s.checkpoint}: epoch {s.state.get('epoch')}, gamma {s.hp.gamma}, {s.dataset}"
          f"{'' if s.run_flags.classes is None else ', classes ' + ' '.join(map(str, s.run_flags.classes))}; "
          f"networks in training mode, as the step runs them")
    records = [{**common, **r} for r in run_experiments(s, controls, out)]
    write_json(os.path.join(out, "records.json"), records)
    if args.json:
        for r in records:
            append_jsonl(args.json, r)
    print(f"records: {os.path.join(out, 'records.json')}" + (f" (and appended to {args.json})" if args.json else ""))
    return 0


def main(argv=None):
    return run_main(get_parser(), check_args, neuromodulation, argv)


if __name__ == "__main__":
    sys.exit(main())
