"""neuromodulation_summary.py on hand-made records: its numbers against ones computed here by hand,
the Holm family, the three forms of a RUN, and its one-line errors."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

import neuromodulation_summary as ns
from stats import holm

AUROC = "novelty | novel: test split | whole-batch | signal AUROC"
RATIO = "plasticity | OOD: contrast inverted | F's update over 20 steps, ratio to familiar"
RHO = "dose-response | contrast | Spearman rho(signal, surprisal)"
NULLS = {AUROC: 0.5, RATIO: 1.0, RHO: 0.0}


def write_run(folder, values, layout="run", checkpoint=None):
    """A records.json of one run holding {effect: value}, laid out as a run folder ("run": under
    neuromodulation/), a folder holding records.json ("folder") or a file of another name ("file");
    the path to give the script."""
    effects = [{"effect": name, "value": v, "null": NULLS.get(name, 0.0)} for name, v in values.items()]
    records = [{"experiment": "wake-sleep", "condition": "wake", "checkpoint": checkpoint or f"/x/{folder.name}/c.pt"},
               {"experiment": "novelty", "effects": effects[:1]}, {"experiment": "plasticity", "effects": effects[1:]}]
    where = {"run": folder / "neuromodulation", "folder": folder, "file": folder}[layout]
    os.makedirs(where, exist_ok=True)
    path = where / ("records.json" if layout != "file" else "mine.json")
    path.write_text(json.dumps(records))
    return str(path if layout == "file" else folder)


def runs_of(tmp_path, columns):
    """One run folder per position of the value lists in columns ({effect: [value per run]})."""
    n = len(next(iter(columns.values())))
    return [write_run(tmp_path / f"seed{i}", {name: vs[i] for name, vs in columns.items() if vs[i] != "absent"})
            for i in range(n)]


def rows_of(paths, only=None):
    return {r["effect"]: r for r in ns.summarize(ns.load_runs(paths), only)}


def by_hand_holm(p):
    """Holm's adjusted p-values written out: sorted, times (m - i), running maximum, capped at 1."""
    order = np.argsort(p)
    adjusted, running = np.empty(len(p)), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[j]))
        adjusted[j] = running
    return adjusted


def test_one_effect_matches_numbers_by_hand(tmp_path):
    values = [0.61, 0.74, 0.45, 0.82]
    row = rows_of(runs_of(tmp_path, {AUROC: values}))[AUROC]
    sd = np.std(values, ddof=1)
    half = scipy_stats.t.ppf(0.975, 3) * sd / 2
    assert row["n"] == 4 and row["mean"] == pytest.approx(np.mean(values)) and row["sd"] == pytest.approx(sd)
    assert [row["low"], row["high"]] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    assert (row["above"], row["below"], row["equal"]) == (3, 1, 0)
    assert row["p"] == pytest.approx(scipy_stats.ttest_1samp(values, 0.5).pvalue)
    assert row["p_holm"] == pytest.approx(row["p"])  # a family of one
    assert row["flags"] == ["runs disagree in sign"]
    assert row["values"] == {f"seed{i}": v for i, v in enumerate(values)}


def test_holm_directly():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.01, float("nan"), 0.04, 0.03])
    assert math.isnan(adjusted[1]) and [adjusted[0], adjusted[2], adjusted[3]] == pytest.approx([0.03, 0.06, 0.06])


def test_holm_over_the_family_of_effects(tmp_path):
    columns = {AUROC: [0.61, 0.74, 0.58, 0.82], RATIO: [1.3, 0.9, 1.6, 1.2], RHO: [0.02, 0.2, -0.1, 0.15]}
    rows = rows_of(runs_of(tmp_path, columns))
    p = [scipy_stats.ttest_1samp(vs, NULLS[name]).pvalue for name, vs in columns.items()]
    assert [rows[name]["p"] for name in columns] == pytest.approx(p)
    assert [rows[name]["p_holm"] for name in columns] == pytest.approx(by_hand_holm(p))
    assert rows[AUROC]["p_holm"] == pytest.approx(3 * rows[AUROC]["p"])  # the smallest p, times m = 3


def test_an_effect_of_two_runs_is_flagged_and_left_out_of_the_family(tmp_path):
    columns = {AUROC: [0.61, 0.74, 0.58, 0.82], RATIO: [1.3, 0.9, 1.6, 1.2],
               "extra": [0.3, "absent", 0.4, "absent"]}
    rows = rows_of(runs_of(tmp_path, columns))
    assert rows["extra"]["n"] == 2 and math.isnan(rows["extra"]["p"]) and math.isnan(rows["extra"]["p_holm"])
    assert rows["extra"]["flags"] == ["fewer than 3 runs: not tested"]
    p = [scipy_stats.ttest_1samp(columns[name], NULLS[name]).pvalue for name in (AUROC, RATIO)]
    assert [rows[AUROC]["p_holm"], rows[RATIO]["p_holm"]] == pytest.approx(by_hand_holm(p))  # m = 2, not 3


def test_runs_that_agree_exactly_are_flagged_not_tested(tmp_path):
    rows = rows_of(runs_of(tmp_path, {AUROC: [0.7, 0.7, 0.7], RATIO: [1.3, 0.9, 1.6]}))
    assert rows[AUROC]["flags"] == ["no spread across runs: not tested"] and math.isnan(rows[AUROC]["p_holm"])
    assert rows[RATIO]["p_holm"] == pytest.approx(rows[RATIO]["p"])  # a family of one


def test_an_unmeasured_value_is_skipped(tmp_path):
    rows = rows_of(runs_of(tmp_path, {AUROC: [0.6, None, 0.7, float("nan"), 0.9]}))
    assert rows[AUROC]["n"] == 3 and rows[AUROC]["mean"] == pytest.approx(np.mean([0.6, 0.7, 0.9]))
    assert set(rows[AUROC]["values"]) == {"seed0", "seed2", "seed4"}


def test_only_keeps_the_effects_named(tmp_path, capsys):
    paths = runs_of(tmp_path, {AUROC: [0.6, 0.7, 0.8], RATIO: [1.2, 1.3, 1.1], RHO: [0.1, 0.2, 0.3]})
    assert list(rows_of(paths, ["AUROC"])) == [AUROC]
    assert list(rows_of(paths, ["rho", "ratio to"])) == [RATIO, RHO]
    assert list(rows_of(paths, ["auroc"])) == []  # case-sensitive
    out = tmp_path / "out"
    assert ns.main([*paths, "--only", "Spearman", "--out", str(out)]) == 0
    assert [r["effect"] for r in json.loads((out / "summary.json").read_text())] == [RHO]
    printed = capsys.readouterr().out
    assert RHO.replace("|", "\\|") in printed and "AUROC" not in printed  # a bar in a markdown cell is escaped


def bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.json").write_text("[{")
    (tmp_path / "dict.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "records.json").write_text(json.dumps([{"condition": "wake"}]))
    (tmp_path / "a_file").write_text("")
    good = write_run(tmp_path / "good", {AUROC: 0.6})
    (tmp_path / "malformed.json").write_text(json.dumps([{"effects": [{"effect": AUROC, "value": 0.6}]}]))
    (tmp_path / "other_null.json").write_text(json.dumps([{"effects": [{"effect": AUROC, "value": 0.6, "null": 0}]}]))
    return {"missing": ([str(tmp_path / "nope")], "does not exist"),
            "no records": ([str(tmp_path / "empty")], "holds no records.json"),
            "invalid JSON": ([str(tmp_path / "broken.json")], "cannot be read as JSON"),
            "not a list": ([str(tmp_path / "dict.json")], "not a list of records"),
            "no effects": ([str(tmp_path / "plain")], "no effects in any run (read " + str(tmp_path / "plain")),
            "unwritable --out": ([good, "--out", str(tmp_path / "a_file")], "cannot be written"),
            "malformed effect": ([str(tmp_path / "malformed.json")], "not an effect {effect, value, null}"),
            "two nulls": ([good, str(tmp_path / "other_null.json")], "has null 0.5 in one run and 0 in")}


@pytest.mark.parametrize("case", ["missing", "no records", "invalid JSON", "not a list", "no effects",
                                  "unwritable --out", "malformed effect", "two nulls"])
def test_errors_are_one_line(tmp_path, capsys, case):
    argv, message = bad_inputs(tmp_path)[case]
    assert ns.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1 and "Traceback" not in err


def test_three_path_forms_and_unique_labels(tmp_path):
    paths = [write_run(tmp_path / "alpha", {AUROC: 0.6}, "run"), write_run(tmp_path / "beta", {AUROC: 0.7}, "folder"),
             write_run(tmp_path / "gamma", {AUROC: 0.8}, "file"),
             write_run(tmp_path / "a" / "seed", {AUROC: 0.9}, "run", checkpoint="/runs/a/seed/c.pt"),
             write_run(tmp_path / "b" / "seed", {AUROC: 1.0}, "run", checkpoint="/runs/b/seed/c.pt"),
             write_run(tmp_path / "alpha", {AUROC: 0.6}, "run")]  # the same run twice: told apart by place
    runs = ns.load_runs(paths)
    assert [label for label, _ in runs] == ["alpha #1", "beta", "gamma", "seed (a)", "seed (b)", "alpha #6"]
    assert [values[AUROC][0] for _, values in runs] == [0.6, 0.7, 0.8, 0.9, 1.0, 0.6]


def test_out_writes_json_and_markdown_that_round_trip(tmp_path, capsys):
    columns = {AUROC: [0.61, 0.74, 0.58, 0.82], RATIO: [1.3, 0.9, 1.6, 1.2], "extra": [0.3, "absent", 0.4, "absent"]}
    paths = runs_of(tmp_path, columns)
    out = tmp_path / "summary"
    assert ns.main([*paths, "--out", str(out)]) == 0
    written = json.loads((out / "summary.json").read_text())
    expected = rows_of(paths)
    assert [r["effect"] for r in written] == list(expected)
    for r in written:
        for key, value in expected[r["effect"]].items():
            assert r[key] == (None if isinstance(value, float) and math.isnan(value) else value), key
    md = (out / "summary.md").read_text()
    assert "runs: seed0, seed1, seed2, seed3" in md and "all 2 tested effects" in md
    assert "| 3+ 1- |" in md and "python neuromodulation_summary.py" in md
    assert md.split("\n\nruns:")[0] in capsys.readouterr().out  # the table printed is the one written


def test_no_out_writes_nothing(tmp_path):
    paths = runs_of(tmp_path, {AUROC: [0.6, 0.7, 0.8]})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert ns.main(paths) == 0
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_forest_plot(tmp_path):
    pytest.importorskip("matplotlib")
    paths = runs_of(tmp_path, {AUROC: [0.61, 0.74, 0.58], RATIO: [1.3, 0.9, 1.6], RHO: [0.1, "absent", 0.2]})
    assert ns.main([*paths, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
