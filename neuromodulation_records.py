"""What neuromodulation.py records: each experiment's recordings (neuromodulation_experiments.py)
turned into effects, each with its interval (the unit is the scored batch, flagged where there are
fewer than stats.MIN_BLOCKS of them), as the JSON records that neuromodulation_summary.py compares
across runs. neuromodulation_report.py prints and draws them."""
import warnings

import numpy as np

import neuromodulation_experiments as ex
from stats import MIN_BLOCKS, auroc, bootstrap_interval, mean_interval, spearman, within_groups_spearman


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


def of_networks(records, subject):
    """One subject's records (neuromodulation_experiments.Subject: the trained networks or a control),
    each saying whose it is. Each effect's name says it after the experiment's ("novelty |
    initialization | ..."), so that a run's trained and control effects stand apart, and keeps the
    name without it as its "measure", by which neuromodulation_summary.py pairs trained and control."""
    for r in records:
        r.update(networks=subject.label, networks_epoch=subject.epoch, networks_steps=subject.steps)
        for e in r.get("effects", []):
            experiment, rest = e["effect"].split(" | ", 1)
            e.update(effect=f"{experiment} | {subject.label} | {rest}", measure=e["effect"], networks=subject.label)
    return records


# --- Records of each experiment -----------------------------------------------------------------------

def condition_record(s, experiment, name, recording, keys):
    values = recording.numpy()
    record = {"experiment": experiment, "condition": name, "n": len(recording.signal),
              **{k: summary(values[k]) for k in keys}, "effects": []}
    if "gate" in keys:
        record["gate_by_layer"] = recording.gate.mean(dim=0).tolist()
        record["signal_gate_spearman"] = rank_correlation(values["signal"], values["gate"], s.args.bootstrap,
                                                          s.seed, s.args.batch_size)
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
            record.update(against=reference, comparison={k: compare(values[k], ref[k], a.bootstrap, s.seed,
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
            record["whole_batch"] = {k: compare(values[k], ref[k], a.bootstrap, s.seed, a.batch_size)
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
            "ci": bootstrap_interval(lambda v: float(np.median(v)), (values,), a.bootstrap, s.seed, a.batch_size)}


CURVE_PAIRS = (("signal", "surprisal"), ("gate", "surprisal"), ("signal", "level"), ("gate", "level"),
               ("surprisal", "level"))
WITHIN_PAIRS = (("signal", "surprisal"), ("gate", "surprisal"))


def within_level_correlation(values, x, y, s):
    """Spearman's rho of x and y within each level, averaged over the levels, with a 95 % bootstrap
    interval over whole batches (each batch lies within one level, so a resample keeps its level)."""
    a, triple = s.args, (values[x], values[y], values["level"])
    return {"rho": within_groups_spearman(*triple),
            "ci": bootstrap_interval(within_groups_spearman, triple, a.bootstrap, s.seed, a.batch_size, paired=True),
            "batches": len(values[x]) // a.batch_size}


def across_axes_record(axis_records):
    """The within-level rho of each pair averaged over the axes: one number per model for the
    dose-response's primary test (docs/neuromodulation.md), which no choice of axis decides."""
    rho = {f"{x}, {y}": float(np.nanmean([r["within_levels"][f"{x}, {y}"]["rho"] for r in axis_records]))
           for x, y in WITHIN_PAIRS}
    return {"experiment": "dose-response", "axis": "all axes", "level": "all", "within_levels_mean": rho,
            "effects": [effect(f"dose-response | all axes | rho({pair}) within levels, mean over axes", value, 0.0)
                        for pair, value in rho.items()]}


def dose_records(s, curves):
    """Per axis and level: medians with bands, the level against level 0 (whole-batch) and the probes
    against familiar batch-mates (oddball). Per axis: Spearman's rho of signal and gate with the
    surprisal and the level, over every input of every level."""
    a, records = s.args, []
    for axis, points in curves.items():
        base = points[0][1].numpy()
        for level, rec, oddball in points:
            values, (probes, mates) = rec.numpy(), (r.numpy() for r in oddball)
            record = {"experiment": "dose-response", "axis": axis, "level": level,
                      "n": len(rec.signal), **{k: median_band(values[k], s) for k in ("signal", "gate", "surprisal")},
                      "oddball": {k: oddball_compare(probes[k], mates[k], a.oddballs) for k in ("signal", "gate")}}
            if level > 0:
                record["whole_batch"] = {k: compare(values[k], base[k], a.bootstrap, s.seed, a.batch_size)
                                         for k in ("signal", "gate")}
            records.append(record)
        values = {k: np.concatenate([rec.numpy()[k] for _, rec, _ in points]) for k in ("signal", "gate", "surprisal")}
        values["level"] = np.concatenate([np.full(len(rec.signal), level) for level, rec, _ in points])
        rho = {f"{x}, {y}": rank_correlation(values[x], values[y], a.bootstrap, s.seed, a.batch_size)
               for x, y in CURVE_PAIRS}
        within = {f"{x}, {y}": within_level_correlation(values, x, y, s) for x, y in WITHIN_PAIRS}
        prefix = f"dose-response | {axis}"
        effects = [effect(f"{prefix} | rho({pair})", r["rho"], 0.0) for pair, r in rho.items()]
        effects += [effect(f"{prefix} | rho({pair}) within levels", r["rho"], 0.0) for pair, r in within.items()]
        for level, record in ((points[1][0], records[-len(points) + 1]), (points[-1][0], records[-1])):
            effects.append(effect(f"{prefix} | oddball signal AUROC at level {level:g}",
                                  record["oddball"]["signal"]["auroc"], 0.5))
        records.append({"experiment": "dose-response", "axis": axis, "level": "all",
                        "spearman": rho, "within_levels": within, "effects": effects})
    return records + [across_axes_record([r for r in records if r["level"] == "all"])]


UPDATES = (("update_1", "F's update in 1 step"), ("update_n", "F's update over {n} steps"),
           ("gate_update_1", "F's update in 1 step on D's term alone"),
           ("gate_update_n", "F's update over {n} steps on D's term alone"))


def plasticity_records(s, found):
    """Each condition's gradient from D into F and F's updates (whole training steps, and steps on
    D's term alone), as ratios to the familiar condition's (the gradient's interval: a bootstrap
    over the batches; each update is one trajectory)."""
    a, records = s.args, []
    familiar = found[ex.FAMILIAR]
    g0 = np.array(familiar["gradient"])
    ratio = lambda x, y: float(x.mean() / y.mean())  # noqa: E731
    for name, f in found.items():
        g = np.array(f["gradient"])
        record = {"experiment": "plasticity", "condition": name, "gradient_norm": summary(g),
                  **{k: f[k] for k, _ in UPDATES}, "steps": s.args.sustained_steps, "effects": []}
        if name != ex.FAMILIAR:
            record["ratio_to_familiar"] = {
                "gradient": ratio(g, g0), "gradient_ci": bootstrap_interval(ratio, (g, g0), a.bootstrap, s.seed),
                "gradient_batches": len(g), **{k: f[k] / familiar[k] for k, _ in UPDATES}}
            r = record["ratio_to_familiar"]
            record["effects"] = [effect(f"plasticity | {name} | D's gradient into F, ratio to familiar", r["gradient"],
                                        1.0)]
            record["effects"] += [effect(f"plasticity | {name} | {what.format(n=s.args.sustained_steps)}, ratio to "
                                         f"familiar", r[k], 1.0) for k, what in UPDATES]
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
    early, late = tenths(T)
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


def tenths(T):
    """The first and the last tenth of a stream of T steps (one step at least)."""
    tenth = max(1, T // 10)
    return slice(0, tenth), slice(T - tenth, T)


def control_stream_effects(stream, recur=None):
    """A control stream's drift (neuromodulation_experiments.control_stream): the mean over the last
    tenth of its steps minus the mean over the first tenth, of every image shown there. No image
    repeats in it (or only after `recur` steps), so this is what training on a stream does to the
    scores without repetition, against which the repeated set's habituation is read."""
    early, late = tenths(len(stream.signal))
    effects = {"steps": len(stream.signal), "batch": stream.signal.shape[1], "images_recur_after_steps": recur}
    for key in ("signal", "gate"):
        values = getattr(stream, key)
        effects[key] = {"by_step": values.mean(axis=1).tolist(), "drift": float(values[late].mean() - values[early].mean())}
    return effects


FAMILIARIZATION_MEASURES = (("habituation", 0.0), ("novelty_response", 0.0), ("novel_vs_batch_auroc", 0.5))
CONTROL_MEASURES = (("control_drift", "the control stream's drift"),
                    ("habituation_beyond_drift", "habituation minus the control stream's drift"))


def familiarization_record(per_stream, controls=None):
    """The streams' effects, and each measure's mean over the streams with a t-interval: the stream is
    the unit (one stream is one sample, however many images it shows). With `controls`, one control
    stream's effects per stream (control_stream_effects), also its drift and the habituation minus
    it, stream by stream (the i-th stream against the i-th control)."""
    across = {}
    for key in ("signal", "gate"):
        across[key] = {m: mean_interval([e[key][m] for e in per_stream if m in e[key]])
                       for m, _ in FAMILIARIZATION_MEASURES if any(m in e[key] for e in per_stream)}
        if controls:
            drift = np.array([c[key]["drift"] for c in controls])
            across[key]["control_drift"] = mean_interval(drift)
            across[key]["habituation_beyond_drift"] = mean_interval(
                np.array([e[key]["habituation"] for e in per_stream]) - drift)
    effects = [effect(f"familiarization | {key} | {m.replace('_', ' ')} (mean over streams)", across[key][m]["mean"], null)
               for key in ("signal", "gate") for m, null in FAMILIARIZATION_MEASURES if m in across[key]]
    effects += [effect(f"familiarization | {key} | {what} (mean over streams)", across[key][m]["mean"], 0.0)
                for key in ("signal", "gate") for m, what in CONTROL_MEASURES if m in across[key]]
    record = {"experiment": "familiarization", "condition": "streams", "streams": len(per_stream),
              "per_stream": per_stream, "across_streams": across, "effects": effects}
    if controls:
        record["control_streams"] = controls
    return record
