"""What a run shows: the final sample grid, the curves, TensorBoard events and the closing summary."""
import io
import os
import shlex
import sys

import pytest
import torch
from PIL import Image

import generate_and_save_imgs as gen
import monitor
import train
from checkpoint import load_checkpoint
from conftest import TINY

RUN = TINY + ["--epochs", "2", "--probe-folds", "0", "--seed", "0", "--device", "cpu", "-b", "500"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on the bundled digits (what `python train.py` trains), and what it printed."""
    out = tmp_path_factory.mktemp("run")
    capture = pytest.MonkeyPatch()
    printed = io.StringIO()
    capture.setattr(sys, "stdout", printed)
    try:
        assert train.main(RUN + ["--out", str(out)]) == 0
    finally:
        capture.undo()
    return out, printed.getvalue()


def test_every_run_ends_with_a_sample_grid_and_a_summary_whose_commands_run(run, tmp_path):
    out, printed = run
    grid = Image.open(out / "samples.png")
    assert grid.size[0] > 10 * 32  # a 10 x 10 grid of 32 x 32 samples
    summary = printed[printed.index(f"run folder {out}:"):]
    for name in ("checkpoint.pth.tar", "metrics.csv", "samples.png"):
        assert str(out / name) in summary, name
    command = next(line for line in summary.splitlines() if "generate_and_save_imgs.py" in line)
    argv = shlex.split(command)[2:]
    argv[argv.index("--n-images") + 1] = "4"
    assert gen.main(argv + ["--out", str(tmp_path / "s")]) == 0  # the summary's command, as printed
    assert "SVM_classify_from_model.py --path " + str(out) in summary
    assert "measure_inference.py --path " + str(out) in summary


def test_the_curves_figure_or_a_note_how_to_get_it(run, tmp_path, monkeypatch, capsys):
    out, printed = run
    pytest.importorskip("matplotlib")
    assert Image.open(out / "curves.png").size[0] > 600
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    # What a run does after its last epoch (Run._finish), with the run's own rows and samples of its size.
    args = train.parse_args(train.get_parser(), RUN + ["--out", str(tmp_path)])
    monitor.finish(args, load_checkpoint(out)["history"], torch.rand(100, 1, 32, 32) * 2 - 1)
    captured = capsys.readouterr()
    assert captured.err.count("pip install matplotlib") == 1 and not (tmp_path / "curves.png").exists()
    assert (tmp_path / "samples.png").exists()


def test_tensorboard_events_hold_the_losses_scores_and_sample_grids(run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = run
    events = [f for f in os.listdir(out) if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = acc.Tags()
    assert {f"train/{k}" for k in train.METRICS} <= set(tags["scalars"])
    assert [e.step for e in acc.Images("samples")] == [1, 2]  # a grid per epoch
    # Logged with the progress bar: every 10th step and each epoch's last (here 3 steps an epoch).
    assert [e.step for e in acc.Scalars("train/d_wake")] == [3, 6]


def test_the_first_run_defaults_and_explicit_flags_win():
    parser = train.get_parser()
    digits = train.parse_args(parser, [])
    assert digits.dataset == "digits"
    assert {k: getattr(digits, k) for k in train.DIGITS_DEFAULTS} == train.DIGITS_DEFAULTS
    mine = train.parse_args(parser, ["--n-filters", "8", "--gamma", "1", "-b", "32"])
    assert (mine.n_filters, mine.gamma, mine.batch_size, mine.lr_e) == (8, 1.0, 32, train.DIGITS_DEFAULTS["lr_e"])
    # A flag given at its own original default still wins over the digits default.
    assert train.parse_args(parser, ["--n-filters", "64"]).n_filters == 64
    # A resumed run takes its seed from its checkpoint, not from the digits default.
    assert train.parse_args(parser, ["--resume", "RUN"]).seed is None


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "folder"])
def test_the_original_defaults_hold_for_the_papers_datasets(dataset, tmp_path):
    a = train.parse_args(train.get_parser(), ["--dataset", dataset, "--data", str(tmp_path)])
    assert (a.batch_size, a.beta1, a.beta2, a.lamda, a.lamda2) == (256, 0.5, 0.99, 0.3, 10.0)
    assert (a.lr_g, a.lr_d, a.lr_e, a.lr_rd) == (1e-4,) * 4
    assert (a.gradient_clipping, a.noise_dim, a.n_filters, a.gamma) == (50.0, 40, 64, 1.0)
    assert not a.kl_from_sn and not a.divisive_normalization


def test_python_train_py_alone_with_fewer_epochs_draws_and_summarizes(tmp_path, capsys):
    assert train.main(["--epochs", "1", "--probe-folds", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "samples.png").exists() and f"samples     {tmp_path / 'samples.png'}" in out
    assert "generate_and_save_imgs.py --path" in out


def test_the_curves_of_a_run_without_a_discriminator_show_the_inference_loss(tmp_path, monkeypatch):
    plt = pytest.importorskip("matplotlib.pyplot")
    plotted = {}
    real = plt.subplots

    def keep_axes(*args, **kwargs):
        fig, axes = real(*args, **kwargs)
        plotted["axes"] = axes
        return fig, axes

    monkeypatch.setattr(plt, "subplots", keep_axes)
    rows = [{"epoch": e, "loss_d": 0, "loss_f": 2.0 / e, "loss_g": 1, "loss_r": 0, "d_wake": 0, "d_sleep": 0}
            for e in (1, 2)]
    assert monitor.plot_curves(rows, str(tmp_path / "curves.png"))
    scores, losses = plotted["axes"][:2]
    assert not scores.lines and losses.get_title() == "inference loss"
    assert list(losses.lines[0].get_ydata()) == [2.0, 1.0]
