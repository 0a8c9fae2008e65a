"""neuromodulation_summary.py on hand-made records: its numbers against ones computed here by hand,
the Holm family, the three forms of a RUN, and its one-line errors."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

import neuromodulation_summary as ns
from stats import holm, sign_flip_test, sign_test

AUROC = "novelty | novel: test split | whole-batch | signal AUROC"
RATIO = "plasticity | OOD: contrast inverted | F's update over 20 steps, ratio to familiar"
RHO = "dose-response | contrast | Spearman rho(signal, surprisal)"
# the primary family's names, as neuromodulation.py writes them
WAKE = "wake-sleep | trained | signal AUROC, wake > sleep"
NOVEL_CLASS = "novelty | trained | novel class: test split, labels 5 6 7 8 9 | oddball | signal AUROC"
WITHIN = "dose-response | trained | all axes | rho(signal, surprisal) within levels, mean over axes"
STREAM = "familiarization | trained | gate | novel vs batch auroc (mean over streams)"
NULLS = {AUROC: 0.5, RATIO: 1.0, RHO: 0.0, WAKE: 0.5, NOVEL_CLASS: 0.5, WITHIN: 0.0, STREAM: 0.5}


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


def test_one_effect_matches_numbers_by_hand(tmp_path):
    values = [0.61, 0.74, 0.45, 0.82]
    row = rows_of(runs_of(tmp_path, {AUROC: values}))[AUROC]
    sd = np.std(values, ddof=1)
    half = scipy_stats.t.ppf(0.975, 3) * sd / 2
    assert row["n"] == 4 and row["mean"] == pytest.approx(np.mean(values)) and row["sd"] == pytest.approx(sd)
    assert [row["low"], row["high"]] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    assert (row["above"], row["below"], row["equal"]) == (3, 1, 0)
    assert row["p"] == pytest.approx(scipy_stats.ttest_1samp(values, 0.5).pvalue)
    assert row["p_sign"] == pytest.approx(scipy_stats.binomtest(3, 4).pvalue)
    assert row["p_permutation"] == sign_flip_test(values, 0.5)
    assert not row["primary"] and math.isnan(row["p_sign_holm"])  # exploratory: of no family
    assert row["flags"] == ["runs disagree in sign"]
    assert row["values"] == {f"seed{i}": v for i, v in enumerate(values)}


def test_holm_directly():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.01, float("nan"), 0.04, 0.03])
    assert math.isnan(adjusted[1]) and [adjusted[0], adjusted[2], adjusted[3]] == pytest.approx([0.03, 0.06, 0.06])
    # m = 4, by hand: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04, which the
    # running maximum raises to 0.06 (an adjusted p never falls below that of a smaller p).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1: 0.6 x 2 = 1.2 -> 1, and 0.7 x 1 = 0.7 raised to 1 by the running maximum
    assert holm([0.7, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([0.2, 0.9]) == pytest.approx([0.4, 0.9])


# The sign test's p of each effect below, given by a stand-in keyed by the effect's first value, so
# that the primary family's Holm values are the hand-computed ones of test_holm_directly: sorted, d
# 0.005 x 4 = 0.02, a 0.01 x 3 = 0.03, c 0.03 x 2 = 0.06, b 0.04 x 1 = 0.04 -> 0.06 (running maximum).
# The exploratory effects (one with a p far below the family's) are of no family, and the primary
# effect of two runs is not tested: m = 4, not 6 or 7.
FAMILY = {WAKE: [1.0, 2.0, 3.0], STREAM + " of two runs": [13.0, 14.0, "absent"], NOVEL_CLASS: [4.0, 5.0, 6.5],
          AUROC: [0.0001, 0.2, 0.3], WITHIN: [7.0, 8.0, 9.5], STREAM: [10.0, 11.0, 12.5], RATIO: [0.7, 0.7, 0.8]}
FAMILY_P = {1.0: 0.01, 4.0: 0.04, 7.0: 0.03, 10.0: 0.005, 0.0001: 1e-9, 0.7: 0.5}
FAMILY_HOLM = {WAKE: 0.03, NOVEL_CLASS: 0.06, WITHIN: 0.06, STREAM: 0.02}


def test_holm_over_the_named_primary_family_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(ns, "sign_test", lambda values, null: FAMILY_P[values[0]])
    monkeypatch.setattr(ns, "sign_flip_test", lambda values, null: 2 * FAMILY_P[values[0]])
    monkeypatch.setattr(ns, "PRIMARY", ns.PRIMARY + (STREAM + " of two runs",))
    rows = rows_of(runs_of(tmp_path, FAMILY))
    assert [name for name in rows if rows[name]["primary"]] == [WAKE, STREAM + " of two runs", NOVEL_CLASS, WITHIN,
                                                                 STREAM]
    assert {name: rows[name]["p_sign_holm"] for name in FAMILY_HOLM} == pytest.approx(FAMILY_HOLM)
    assert {name: rows[name]["p_permutation_holm"] for name in FAMILY_HOLM} == pytest.approx(
        {name: min(1.0, 2 * p) for name, p in FAMILY_HOLM.items()})
    for name in (AUROC, RATIO, STREAM + " of two runs"):  # exploratory, or too few runs: no Holm p
        assert math.isnan(rows[name]["p_sign_holm"]) and math.isnan(rows[name]["p_permutation_holm"])
    assert rows[AUROC]["p_sign"] == 1e-9  # computed, but no family's member


def test_the_primary_family_with_real_tests(tmp_path):
    """Three primary effects of eight runs: the sign test's ps by scipy's binomial test, 2/256, 18/256 and
    1 (four of eight above), Holm's factors 3, 2, 1 in that order; an exploratory effect beside them
    all above its null changes nothing."""
    columns = {WAKE: [0.6, 0.7, 0.8, 0.9, 0.55, 0.65, 0.75, 0.85], NOVEL_CLASS: [0.6, 0.7, 0.8, 0.9, 0.55, 0.65, 0.75, 0.4],
               STREAM: [0.6, 0.7, 0.4, 0.3, 0.55, 0.65, 0.45, 0.35], AUROC: [0.9] * 7 + [0.91]}
    rows = rows_of(runs_of(tmp_path, columns))
    ps = [scipy_stats.binomtest(k, 8).pvalue for k in (8, 7, 4)]
    assert [rows[name]["p_sign"] for name in (WAKE, NOVEL_CLASS, STREAM)] == pytest.approx(ps)
    assert ps == pytest.approx([2 / 256, 18 / 256, 1.0])
    assert [rows[name]["p_sign_holm"] for name in (WAKE, NOVEL_CLASS, STREAM)] == pytest.approx([6 / 256, 36 / 256, 1])
    assert [rows[name]["p_permutation"] for name in (WAKE, NOVEL_CLASS, STREAM)] == [
        sign_flip_test(columns[name], 0.5) for name in (WAKE, NOVEL_CLASS, STREAM)]
    assert rows[WAKE]["p_permutation"] == 2 / 256  # all eight above: only they and their mirror reach it
    assert math.isnan(rows[AUROC]["p_sign_holm"])


def test_trained_minus_control_run_by_run(tmp_path):
    """Each run's trained value minus its control's, for the measure both were measured on; a run
    without the control's value gives no difference."""
    paths = []
    for i, (trained, control) in enumerate(((0.8, 0.6), (0.9, 0.5), (0.7, 0.65), (0.75, None))):
        effects = [{"effect": f"novelty | {label} | novel | signal AUROC", "value": v, "null": 0.5,
                    "measure": "novelty | novel | signal AUROC", "networks": label}
                   for label, v in (("trained", trained), ("initialization", control))]
        (tmp_path / f"r{i}.json").write_text(json.dumps([{"effects": effects}]))
        paths.append(str(tmp_path / f"r{i}.json"))
    row = rows_of(paths)["novelty | trained - initialization | novel | signal AUROC"]
    assert row["null"] == 0.0 and row["n"] == 3 and not row["primary"]
    assert list(row["values"].values()) == pytest.approx([0.2, 0.4, 0.05])
    assert row["mean"] == pytest.approx(np.mean([0.2, 0.4, 0.05]))
    assert rows_of(paths)["novelty | trained | novel | signal AUROC"]["n"] == 4


def test_runs_that_agree_exactly_are_flagged_not_tested(tmp_path):
    rows = rows_of(runs_of(tmp_path, {WAKE: [0.7, 0.7, 0.7], STREAM: [1.3, 0.9, 1.6]}))
    assert rows[WAKE]["flags"] == ["no spread across runs: not tested"] and math.isnan(rows[WAKE]["p_sign_holm"])
    assert rows[STREAM]["p_sign_holm"] == pytest.approx(rows[STREAM]["p_sign"])  # a family of one


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
    assert "runs: seed0, seed1, seed2, seed3" in md and "this family of 0 tested effects" in md
    assert "| 3+ 1- |" in md and "python neuromodulation_summary.py" in md
    assert md.split("\n\nruns:")[0] in capsys.readouterr().out  # the table printed is the one written


def test_no_out_writes_nothing(tmp_path):
    paths = runs_of(tmp_path, {AUROC: [0.6, 0.7, 0.8]})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert ns.main(paths) == 0
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_forest_plot(tmp_path, monkeypatch):
    """The figure's data, read back from its lines: one panel per null (sorted), a row per effect in
    the table's order; each run's value a dot, the mean (a diamond) and its t-interval (a line)
    computed here by hand, black where tested and gray where not, the null a red vertical line."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_rgba
    columns = {AUROC: [0.61, 0.74, 0.58], RATIO: [1.3, 0.9, 1.6], RHO: [0.1, "absent", 0.2],
               "extra": [0.3, -0.2, 0.5]}  # null 0, RHO's panel
    paths = runs_of(tmp_path, columns)
    drawn, write_figure = [], ns.write_figure
    monkeypatch.setattr(ns, "write_figure", lambda fig, *a, **k: (drawn.append(fig), write_figure(fig, *a, **k)))
    assert ns.main([*paths, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "forest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = drawn
    axes = fig.get_axes()
    panels = {0.0: [RHO, "extra"], 0.5: [AUROC], 1.0: [RATIO]}
    assert len(axes) == 3
    for ax, (null, names) in zip(axes, panels.items()):
        assert ax.get_title().startswith(f"null {null:g} (red)")
        assert [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()] == names
        lines = ax.get_lines()
        (red,) = [l for l in lines if to_rgba(l.get_color()) == to_rgba("tab:red")]
        assert list(red.get_xdata()) == [null, null]
        for y, name in enumerate(names):
            values = [v for v in columns[name] if v != "absent"]
            n, mean = len(values), np.mean(values)
            half = scipy_stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / np.sqrt(n)
            colour = to_rgba("black" if n >= 3 else "gray")  # RHO, of two runs, is not tested
            at_y = [l for l in lines if l is not red and set(l.get_ydata()) == {y}]
            dots = [l for l in at_y if l.get_marker() == "o"]
            diamond = [l for l in at_y if l.get_marker() == "D"]
            bar = [l for l in at_y if l.get_marker() in ("None", "", None) and l.get_linestyle() == "-"]
            assert len(dots) == len(diamond) == len(bar) == 1 and len(at_y) == 3, name
            assert list(dots[0].get_xdata()) == pytest.approx(values), name
            assert list(diamond[0].get_xdata()) == pytest.approx([mean]), name
            assert list(bar[0].get_xdata()) == pytest.approx([mean - half, mean + half]), name
            assert to_rgba(bar[0].get_color()) == to_rgba(diamond[0].get_color()) == colour, name
