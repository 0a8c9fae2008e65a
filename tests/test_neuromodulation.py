"""neuromodulation.py: its recordings against the training step's own code and autograd, its
effect sizes against hand-computed values, and its promises (own batches, seeds, the file untouched)."""
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import neuromodulation as nm
import neuromodulation_experiments as ex
import neuromodulation_records as nr
import neuromodulation_report as report
import recording
import stats
import train
from conftest import ROOT, TINY, make_checkpoint, write_cifar10
from data import split_images
from losses import StepConfig, step_losses
from models import ModelConfig, Networks


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_root):
    """A checkpoint of a tiny doubly adversarial run on the tiny MNIST folder (64 train, 40 test images)."""
    out = tmp_path_factory.mktemp("run")
    assert train.main(TINY + ["--dataset", "mnist", "--data", mnist_root, "-b", "16", "--epochs", "1", "--gamma",
                              "0.9", "--seed", "3", "--probe-folds", "0", "--device", "cpu", "--out", str(out)]) == 0
    return out / "checkpoint.pth.tar"


SMALL = ["-b", "8", "--n-images", "32", "--oddballs", "2", "--n-oddball", "16", "--repeats", "4", "--presentations", "6",
         "--streams", "2", "--sustained-steps", "2", "--bootstrap", "50", "--device", "cpu"]


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _noiseless(nets):
    """No sampling noise anywhere: two computations of a score then agree without sharing random numbers."""
    nets.decay_noise(float("inf"))
    return nets


@pytest.mark.parametrize("path", ["written-out", "autograd"])
def test_the_signal_is_the_training_steps_score_of_the_wake_state(path):
    torch.manual_seed(0)
    nets = _noiseless(Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True)))
    hp = StepConfig(gamma=1.0, d_gradients=path)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    recorded = recording.record_images(nets, hp, x, batch_size=8)
    assert torch.allclose(recorded.signal.mean(), step_losses(nets, x, hp).out["d_wake"], atol=1e-6)
    nets.train()
    with torch.no_grad():
        assert torch.allclose(recorded.signal, nets.discriminator(nets.inference(x)), atol=1e-6)
    assert torch.allclose(recorded.weight, 2 * torch.sigmoid(-recorded.signal))


@pytest.mark.parametrize("path", ["written-out", "autograd"])
def test_the_gate_is_autograds_gradient_of_the_score_wrt_each_of_Fs_layers(path):
    torch.manual_seed(0)
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6))
    nets.discriminator.sigma.fill_(0.3)  # D's noise on and large: both runs must draw the same
    states = [h.detach() for h in nets.inference(torch.rand(6, 1, 32, 32) * 2 - 1)]
    torch.manual_seed(1)
    recorded = recording.score_states(nets.discriminator, states, StepConfig(d_gradients=path))
    torch.manual_seed(1)
    leaves = [h.clone().requires_grad_(True) for h in states]
    grads = torch.autograd.grad(nets.discriminator(leaves).sum(), leaves)
    want = torch.stack([g.flatten(1).abs().sum(dim=1) for g in grads[1:]], dim=1)
    assert recorded.gate.shape == (6, 5)
    assert torch.allclose(recorded.gate, want, rtol=1e-4)


def test_auroc_and_ranks_by_hand():
    # a > b in 4 of 9 pairs, and one tie (2 = 2) counts half: 4.5 / 9.
    assert stats.auroc(np.array([3.0, 1.0, 2.0]), np.array([0.0, 2.0, 5.0])) == pytest.approx(0.5)
    assert stats.auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert stats.auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert stats.average_ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]


def test_bootstrap_interval_holds_the_statistic_and_narrows_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    mean = lambda x: float(x.mean())  # noqa: E731
    lo_s, hi_s = stats.bootstrap_interval(mean, (small,), 500, seed=0)
    lo_l, hi_l = stats.bootstrap_interval(mean, (large,), 500, seed=0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    # Values shifted together within batches of 100 (as D's minibatch std shifts a batch's scores):
    # resampling whole batches sees 20 draws, not 2,000, and its interval is the wider.
    shifted = large + np.repeat(rng.normal(0.0, 1.0, 20), 100)
    lo_i, hi_i = stats.bootstrap_interval(mean, (shifted,), 500, seed=0)
    lo_b, hi_b = stats.bootstrap_interval(mean, (shifted,), 500, seed=0, batch_size=100)
    assert hi_b - lo_b > 3 * (hi_i - lo_i)


def test_familiarization_effects_by_hand():
    """Twenty steps (a tenth is two), K = 2. Image 0 alternates 0, 1 from step to step, as when every step
    shifts D's offset: no habituation, where its first presentation alone would say +0.5. Image 1 scores 2
    in the first tenth, 1 in between, 0 in the last tenth: -2. The one novel image (step 5, position 1)
    scores 9 beside image 0's 1."""
    signal = np.ones((20, 2))
    signal[:, 0] = np.arange(20) % 2
    signal[:2, 1], signal[18:, 1], signal[5, 1] = 2.0, 0.0, 9.0
    shown = np.tile([0, 1], (20, 1))
    shown[5, 1] = -1
    stream = ex.Stream(signal, signal * 10, shown)
    effects = nr.familiarization_effects(stream)
    e = effects["signal"]
    assert effects["novel_insertions"] == 1
    assert e["repeated_first_tenth"] == pytest.approx(1.25) and e["repeated_last_tenth"] == pytest.approx(0.25)
    assert e["habituation"] == pytest.approx(-1.0)
    assert e["novelty_response"] == pytest.approx(8.0)
    assert e["repeated_by_step"][:6] == pytest.approx([1.0, 1.5, 0.5, 1.0, 0.5, 1.0])
    assert effects["gate"]["novelty_response"] == pytest.approx(80.0)
    assert e["novel_vs_batch_auroc"] == 1.0  # above the one repeated image of its batch


def test_the_unit_of_habituation_is_the_stream():
    """Three streams whose habituation is -1, -2 and -3, each of many images: the interval is a t-interval
    over the three streams (n = 3), not over their images."""
    per_stream = []
    for change in (-1.0, -2.0, -3.0):
        signal = np.zeros((10, 50))
        signal[-1] = change  # the last tenth (one step) of every image moved by `change`
        per_stream.append(nr.familiarization_effects(ex.Stream(signal, signal, np.tile(np.arange(50), (10, 1)))))
    habituation = nr.familiarization_record(per_stream)["across_streams"]["signal"]["habituation"]
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, 2) sd / sqrt(n), sd of (-1, -2, -3) = 1
    assert habituation["n"] == 3 and habituation["mean"] == pytest.approx(-2.0)
    assert habituation["low"] == pytest.approx(-2.0 - half) and habituation["high"] == pytest.approx(-2.0 + half)


def test_each_condition_is_scored_in_batches_of_its_own(trained, mnist_root, tmp_path, monkeypatch):
    """Every scored batch has -b inputs, and a condition's records do not depend on what else is scored."""
    sizes = []
    real = recording.score_states
    monkeypatch.setattr(recording, "score_states", lambda D, states, hp: sizes.append(len(states[0])) or real(D, states, hp))
    alone, beside = tmp_path / "alone.jsonl", tmp_path / "beside.jsonl"
    assert nm.main(["--path", str(trained), "--experiments", "novelty", "--json", str(alone), *SMALL]) == 0
    assert set(sizes) == {8}
    assert nm.main(["--path", str(trained), "--experiments", "novelty", "--ood-dataset", "cifar10", "--ood-data",
                    write_cifar10(tmp_path / "cifar"), "--json", str(beside), *SMALL]) == 0
    for networks in ("trained", "initialization"):
        a, b = ([r for r in _records(path) if r["networks"] == networks] for path in (alone, beside))
        assert [r["condition"] for r in b][-1] == "OOD: cifar10" and len(b) == len(a) + 1 == 5
        for ra, rb in zip(a, b):  # the four built-in conditions, equal to the last digit
            assert ra["condition"] == rb["condition"] and ra["signal"] == rb["signal"] and ra["gate"] == rb["gate"]


def test_the_same_seed_gives_the_same_records_and_the_checkpoint_stays_byte_identical(trained, tmp_path, capsys):
    before = hashlib.sha256(trained.read_bytes()).hexdigest()
    runs = []
    for i in range(2):
        path = tmp_path / f"{i}.jsonl"
        assert nm.main(["--path", str(trained), "--json", str(path), "--out", str(tmp_path / f"out{i}"), *SMALL]) == 0
        runs.append([{k: v for k, v in r.items() if k not in ("time", "flags")} for r in _records(path)])
    assert runs[0] == runs[1]
    assert {r["experiment"] for r in runs[0]} == set(nm.EXPERIMENTS)
    streams = next(r for r in runs[0] if r["experiment"] == "familiarization")
    assert streams["streams"] == 2 and streams["across_streams"]["signal"]["habituation"]["n"] == 2
    assert streams["per_stream"][0]["steps"] == 6 and len(streams["per_stream"][0]["signal"]["repeated_by_step"]) == 6
    assert streams["per_stream"][0]["signal"] != streams["per_stream"][1]["signal"]  # streams of their own
    assert hashlib.sha256(trained.read_bytes()).hexdigest() == before  # familiarization trained a copy
    other = tmp_path / "seed1.jsonl"
    assert nm.main(["--path", str(trained), "--experiments", "wake-sleep", "--seed", "1", "--json", str(other),
                    *SMALL]) == 0
    assert _records(other)[0]["signal"] != runs[0][0]["signal"]


def _one_line_error(capsys, argv, code=1):
    assert nm.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_end_in_one_line(trained, tmp_path, capsys):
    assert "1-channel" in _one_line_error(capsys, ["--path", str(trained), "--dataset", "cifar10", *SMALL])
    assert "not a folder" in _one_line_error(capsys, ["--path", str(trained), "--data", str(tmp_path / "none"),
                                                      *SMALL])
    err = _one_line_error(capsys, ["--path", str(trained), "--experiments", "familiarization", *SMALL,
                                   "--repeats", "40"])  # the tiny test split has 40 images
    assert "--repeats 40 needs more than 40 test images" in err
    assert "checkpoint" in _one_line_error(capsys, ["--path", str(tmp_path / "missing.pth.tar"), *SMALL])
    with pytest.raises(SystemExit):
        nm.main(["--path", str(trained), "-b", "1"])


def test_a_run_whose_d_never_trained_an_unwritable_out_and_a_negative_seed_are_refused_before_any_work(
        mnist_root, trained, tmp_path, capsys, monkeypatch):
    scored = []
    monkeypatch.setattr(recording, "record_passes", lambda *a: scored.append(a))
    gamma0 = make_checkpoint(tmp_path / "gamma0", "mnist", mnist_root, "--gamma", "0")
    err = _one_line_error(capsys, ["--path", gamma0, *SMALL])
    assert "--gamma 0" in err and "never trained" in err and "nothing was computed" in err
    assert not (tmp_path / "gamma0" / "neuromodulation").exists()
    (tmp_path / "a-file").write_text("")
    err = _one_line_error(capsys, ["--path", str(trained), "--out", str(tmp_path / "a-file" / "out"), *SMALL])
    assert "--out" in err and "cannot be written" in err
    assert not scored
    with pytest.raises(SystemExit) as exit_:
        nm.main(["--path", str(trained), "--seed", "-1", *SMALL])
    assert exit_.value.code == 2 and "--seed must not be negative" in capsys.readouterr().err


def test_the_weight_is_recorded_only_for_runs_it_acted_in(mnist_root, trained, tmp_path):
    """2 sigmoid(-D) weighs G's loss only under --scale-gen-surprisal-by-D; elsewhere nothing uses it. Sleep
    states carry the signal alone (F never learns from them, and no weight acts on them)."""
    scaled = make_checkpoint(tmp_path / "scaled", "mnist", mnist_root, "--scale-gen-surprisal-by-D")
    for path, want in ((trained, False), (scaled, True)):
        out = tmp_path / f"{want}.jsonl"
        assert nm.main(["--path", str(path), "--experiments", "wake-sleep", "--json", str(out), *SMALL]) == 0
        records = _records(out)
        assert [r["networks"] for r in records] == ["trained"] * 2 + ["initialization"] * 2
        for wake, sleep in (records[:2], records[2:]):  # the control records as the run's flags say
            assert ("weight" in wake) == want and "weight" not in sleep  # it weighs wake states' terms only


def test_an_image_folders_draw_is_seeded_not_its_first_images_in_class_order(tmp_path):
    from PIL import Image
    for k in range(20):  # image k is all 10 k; the first ten are class0's
        folder = tmp_path / "val" / f"class{k // 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 10 * k, np.uint8)).save(folder / f"{k}.png")

    def drawn(seed, classes=None):
        x = split_images("folder", str(tmp_path), 32, False, 10, seed, classes)
        return sorted(round(float(v + 1) * 127.5 / 10) for v in x[:, 0, 0, 0])

    assert drawn(0) == drawn(0) and drawn(0) != drawn(1)
    assert drawn(0) != list(range(10)) and len(set(drawn(0))) == 10
    assert drawn(0, classes=[1]) == list(range(10, 20))  # train.py --classes 1: the second folder's images


def test_ood_data_of_other_channels_is_converted_and_said(trained, tmp_path, capsys):
    assert nm.main(["--path", str(trained), "--experiments", "novelty", "--ood-dataset", "cifar10", "--ood-data",
                    write_cifar10(tmp_path / "cifar"), *SMALL]) == 0
    assert "averaged from 3 channels to 1" in capsys.readouterr().out


def test_a_checkpoint_of_an_edited_d_is_recorded_through_autograd(monkeypatch, trained, tmp_path):
    import models
    from test_training import _head_with_slope
    monkeypatch.setattr(models.Discriminator, "_head", _head_with_slope(0.2))
    path = tmp_path / "r.jsonl"
    assert nm.main(["--path", str(trained), "--experiments", "wake-sleep", "--json", str(path), *SMALL]) == 0
    assert _records(path)[0]["d_gradients"] == "autograd"


def test_records_name_the_checkpoint_and_the_flags(trained, tmp_path):
    path = tmp_path / "r.jsonl"
    assert nm.main(["--path", str(trained), "--experiments", "wake-sleep", "--json", str(path), *SMALL]) == 0
    first = _records(path)[0]
    assert first["checkpoint"] == str(trained) and first["flags"]["batch_size"] == 8
    assert first["dataset"] == "mnist" and first["n"] == 32
    assert dataclasses.asdict(ModelConfig.from_dict(first["model"])) == first["model"]


def test_the_novelty_gap_during_training_changes_nothing_the_run_computes(mnist_root, tmp_path, monkeypatch):
    """signal_train and signal_heldout each epoch in metrics.csv; the weights after two epochs are those
    of the same run without them (their random numbers and BatchNorm statistics are their own)."""
    argv = TINY + ["--dataset", "mnist", "--data", mnist_root, "-b", "16", "--epochs", "2", "--gamma", "0.9",
                   "--seed", "4", "--probe-folds", "0", "--device", "cpu"]
    assert train.main(argv + ["--out", str(tmp_path / "with")]) == 0
    monkeypatch.setattr(train.NoveltyGap, "of_run", classmethod(lambda cls, *a: None))
    assert train.main(argv + ["--out", str(tmp_path / "without")]) == 0
    with_gap = torch.load(tmp_path / "with" / "checkpoint.pth.tar", weights_only=True)
    without = torch.load(tmp_path / "without" / "checkpoint.pth.tar", weights_only=True)
    for k, v in with_gap["networks"].items():
        assert torch.equal(v, without["networks"][k]), k
    rows = with_gap["history"]
    assert all(isinstance(r["signal_train"], float) and isinstance(r["signal_heldout"], float) for r in rows)
    assert "signal_train" not in without["history"][0]
    assert rows[0]["signal_train"] != rows[1]["signal_train"]  # D moved between the epochs


def test_importing_train_does_not_import_the_experiments_script():
    """What train.py records during training (the novelty gap) lives in recording.py: no import circle."""
    check = ("import sys, train; assert not [m for m in sys.modules if m.startswith('neuromodulation')], "
             "'train imports the experiments'")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- The split by job: the command line calls neuromodulation_records.py and neuromodulation_report.py ---

COMMON = {"checkpoint", "epoch", "model", "dataset", "data", "classes", "d_gradients", "batch_size", "image_seed",
          "image_seed_from", "flags", "time"}


def test_the_command_line_makes_no_record_table_or_figure_of_its_own():
    """neuromodulation.py defines only its command line and the run; every effect, table and figure it
    uses is the one its module defines (a copy left behind in the script would show here)."""
    functions = {n: f for n, f in vars(nm).items() if inspect.isfunction(f)}
    own = {n for n, f in functions.items() if f.__module__ == "neuromodulation"}
    assert own == {"get_parser", "check_args", "setup", "image_seed", "control_networks", "one_experiment",
                   "run_experiments", "neuromodulation", "main"}
    used = {n: f.__module__ for n, f in functions.items() if f.__module__.startswith("neuromodulation_")}
    assert {n for n, m in used.items() if m == "neuromodulation_records"} == {
        "wake_sleep_records", "novelty_records", "dose_records", "plasticity_records", "familiarization_effects",
        "familiarization_record", "of_networks", "control_stream_effects"}
    assert {n for n, m in used.items() if m == "neuromodulation_report"} == {
        "print_wake_sleep", "print_novelty", "print_dose", "print_plasticity", "print_familiarization",
        "plot_conditions", "plot_dose", "plot_familiarization"}


def _of_subject(s, subject, inputs, doses):
    """{experiment: records} of one subject, and what the figures draw (the trained networks')."""
    conditions, reference = ex.wake_sleep(s, subject.nets)
    whole, oddball = ex.novelty(s, inputs, subject.nets)
    found = {"wake-sleep": nr.wake_sleep_records(s, conditions, reference),
             "novelty": nr.novelty_records(s, whole, oddball),
             "dose-response": nr.dose_records(s, ex.dose_response(s, subject.nets, doses)),
             "plasticity": nr.plasticity_records(s, ex.plasticity(s, inputs, subject))}
    streams = [ex.familiarization(s, i, subject) for i in range(s.args.streams)]
    controls = [nr.control_stream_effects(*ex.control_stream(s, i, subject)) for i in range(s.args.streams)]
    found["familiarization"] = [nr.familiarization_record([nr.familiarization_effects(st) for st in streams],
                                                          controls)]
    return {name: nr.of_networks(records, subject) for name, records in found.items()}, (conditions, whole, streams)


def _direct(s, out):
    """Every experiment's records, tables and figures by the records' and the report's functions, called
    here on the experiments' results, for the trained networks and the default control (init):
    {experiment: records}, the printed tables, the figures in out."""
    inputs, doses = ex.novelty_inputs(s), ex.dose_inputs(s)
    subjects = [ex.trained(s), ex.initial_networks(s)]
    made = [_of_subject(s, subject, inputs, doses) for subject in subjects]
    found = {name: [r for of_one, _ in made for r in of_one[name]] for name in made[0][0]}
    conditions, whole, streams = made[0][1]
    tables = io.StringIO()
    with contextlib.redirect_stdout(tables):
        for of_one, _ in made:
            for name, show in (("wake-sleep", report.print_wake_sleep), ("novelty", report.print_novelty),
                               ("dose-response", report.print_dose), ("plasticity", report.print_plasticity)):
                show(of_one[name])
                print("--")
            report.print_familiarization(of_one["familiarization"][0])
            print("--")
    report.plot_conditions("wake and sleep", conditions, str(out / "wake-sleep.png"))
    report.plot_conditions("familiar, novel and out-of-distribution inputs (whole-batch)", list(whole.items()),
                           str(out / "novelty.png"))
    report.plot_dose(found["dose-response"], str(out / "dose-response.png"))
    report.plot_familiarization(streams[0], str(out / "familiarization.png"))
    return found, [table for table in tables.getvalue().split("--\n") if table]


def test_a_run_writes_prints_and_draws_what_the_records_and_report_functions_make(trained, tmp_path, capsys):
    run, direct = tmp_path / "run", tmp_path / "direct"
    assert nm.main(["--path", str(trained), "--out", str(run), *SMALL]) == 0
    printed = capsys.readouterr().out
    direct.mkdir()
    found, tables = _direct(nm.setup(nm.get_parser().parse_args(["--path", str(trained), *SMALL])), direct)
    written = json.loads((run / "records.json").read_text())
    expected = [r for e in nm.EXPERIMENTS for r in found[e]]
    assert len(written) == len(expected)
    for w, d in zip(written, expected):  # each written record: the function's, with the run's common fields
        assert set(w) == set(d) | COMMON and json.dumps({k: w[k] for k in d}) == json.dumps(d)
    assert all(table in printed for table in tables)
    figures = sorted(p.name for p in run.glob("*.png"))
    assert figures == sorted(p.name for p in direct.glob("*.png"))
    for name in figures:
        assert (run / name).read_bytes() == (direct / name).read_bytes(), name
