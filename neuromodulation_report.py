"""What neuromodulation.py prints and draws: a table per experiment from its records
(neuromodulation_records.py), and the figures of conditions, dose-response curves and streams."""
import numpy as np

from stats import MIN_BLOCKS
from utils import pyplot, write_figure


def _ci(c, few=False):
    return f"[{c[0]:.3g}, {c[1]:.3g}]" + ("*" if few else "")


FEW = (f"* fewer than {MIN_BLOCKS} scored batches: the interval is not to be read "
       f"(a bootstrap over so few blocks covers far less than 95 %)")


def _auroc_cell(c):
    return f"{c['auroc']:.3f} {_ci(c['auroc_ci'], c['few_batches'])}"


def _whose(record):
    """The networks a record is of; records from before the controls of every experiment said it as "model"."""
    return record.get("networks") or record["model"]


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
          "signal, gate and surprisal, the oddball AUROC of the signal; per axis Spearman's rho pooled over the "
          "levels and within them (the mean of each level's; bootstrap over batches)")
    for r in records:
        if r["axis"] == "all axes":
            rho = "  ".join(f"rho({pair}) {value:+.2f}" for pair, value in r["within_levels_mean"].items())
            print(f"  {_whose(r):<16} within levels, mean over the axes: {rho}")
        elif r["level"] == "all":
            rho = "  ".join(f"rho({pair}) {c['rho']:+.2f} {_ci(c['ci'])}" for pair, c in r["spearman"].items())
            within = "  ".join(f"rho({pair}) {c['rho']:+.2f} {_ci(c['ci'])}" for pair, c in r["within_levels"].items())
            print(f"  {_whose(r):<16} {r['axis']:<9} pooled: {rho}\n  {'':<16} {'':<9} within levels: {within}")
        else:
            print(f"  {_whose(r):<16} {r['axis']:<9} level {r['level']:<4g} signal {r['signal']['median']:>8.4g}  "
                  f"gate {r['gate']['median']:>9.4g}  surprisal {r['surprisal']['median']:>7.4g}  "
                  f"oddball AUROC {_auroc_cell(r['oddball']['signal'])}")


def print_plasticity(records):
    print(f"\nplasticity: D's gradient into F (norm per batch) and F's Adam update after 1 and {records[0]['steps']} "
          "steps on the condition, from the networks' optimizer state: whole training steps, then steps on D's "
          "term alone (the gate); ratios to familiar")
    keys = ("update_1", "update_n", "gate_update_1", "gate_update_n")
    for r in records:
        q = r.get("ratio_to_familiar")
        ratios = (f"ratios {q['gradient']:.3g} {_ci(q['gradient_ci'], q['gradient_batches'] < MIN_BLOCKS)}, "
                  + ", ".join(f"{q[k]:.3g}" for k in keys)) if q else "reference"
        print(f"  {r['condition']:<40} gradient {r['gradient_norm']['mean']:.4g}  update "
              + ", ".join(f"{r[k]:.4g}" for k in keys) + f"  {ratios}")


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
    models = list(dict.fromkeys(_whose(r) for r in points))
    rows = (("signal", "signal - its level-0 median"), ("gate", "gate (median)"), ("surprisal", "surprisal (median)"),
            ("auroc", "oddball AUROC of the signal"))
    fig, axes = plt.subplots(len(rows), len(axes_names), figsize=(3.2 * len(axes_names), 9.5), squeeze=False,
                             sharex=True)
    for row, (key, label) in enumerate(rows):
        for col, axis in enumerate(axes_names):
            ax = axes[row][col]
            for i, model in enumerate(models):
                rs = [r for r in points if r["axis"] == axis and _whose(r) == model]
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
