#!/usr/bin/env python
"""The batch effect of neuromodulation.py's novelty experiment across runs: per condition and key, the
oddball AUROC minus the whole-batch AUROC (the records' "batch_effect"), and the oddball design's
difference of means over the whole-batch design's (1: no batch effect; AUROCs near 1 cannot show
one), each as its mean over runs with a t-interval (the run the unit).

    python experiments/batch_effect.py RUN [RUN ...]      # each RUN's neuromodulation/records.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stats import mean_interval  # noqa: E402


def batch_effects(paths):
    """{(condition, key): [(AUROC difference, ratio of mean differences) of each run]} in the order first met."""
    found = {}
    for path in paths:
        with open(os.path.join(path, "neuromodulation", "records.json") if os.path.isdir(path) else path) as f:
            for r in json.load(f):
                if r.get("networks", "trained") != "trained":  # a control's batch effect is its own row elsewhere
                    continue
                for key, value in (r.get("batch_effect") or {}).items():
                    ratio = r["oddball"][key]["mean_difference"] / r["whole_batch"][key]["mean_difference"]
                    found.setdefault((r["condition"], key), []).append((value, ratio))
    return found


def main(argv=None):
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        sys.exit(__doc__)
    print("| condition | key | runs | oddball - whole-batch AUROC [95 % t] | oddball / whole-batch difference of "
          "means [95 % t] |\n|---|---|---:|---|---|")
    for (condition, key), values in batch_effects(paths).items():
        a, r = (mean_interval([v[i] for v in values]) for i in (0, 1))
        print(f"| {condition} | {key} | {a['n']} | {a['mean']:+.3f} [{a['low']:+.3f}, {a['high']:+.3f}] | "
              f"{r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}] |")


if __name__ == "__main__":
    main()
