#!/usr/bin/env python
"""Redraw neuromodulation.py's dose-response figure from a run's records, without recomputing them.

    python figures/make_dose_figure.py RUN/neuromodulation/records.json --out figures/neuromodulation_dose_response.png

The figure is neuromodulation_report.plot_dose's: per axis, the trained model and its controls against
the level. Needs matplotlib.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neuromodulation_report import plot_dose  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", help="records.json written by neuromodulation.py")
    p.add_argument("--out", required=True, help="image file to write")
    args = p.parse_args(argv)
    with open(args.records) as f:
        records = [r for r in json.load(f) if r.get("experiment") == "dose-response"]
    if not records:
        sys.exit(f"error: {args.records} holds no dose-response records")
    plot_dose(records, args.out)


if __name__ == "__main__":
    main()
