"""The measures behind neuromodulation.py's primary tests (issue 42): the dose-response's correlation
within levels on hand-made records, F's update from D's term alone against a hand-written Adam step,
the exact sign and sign-flip tests across runs; and habituation against a control stream."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import neuromodulation_experiments as ex
import neuromodulation_records as nr
import stats
from conftest import make_checkpoint
from recording import Recording
from step import make_optimizers
from test_neuromodulation import _noiseless
from test_neuromodulation_experiments import _setup

LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _recording(signal, surprisal):
    n = len(signal)
    signal, surprisal = torch.as_tensor(signal, dtype=torch.float32), torch.as_tensor(surprisal, dtype=torch.float32)
    return Recording(signal, signal.abs()[:, None].repeat(1, 5) / 5, torch.ones(n), surprisal)


def _hand_made_curves(within, rng, per_level=40):
    """One axis whose signal and surprisal both rise with the level, ten per step of 0.2; within a
    level the surprisal is the signal plus `within` times independent noise of its own... or, with
    within=None, independent of it."""
    points = []
    for level in LEVELS:
        signal = 10 * level + rng.normal(0, 1, per_level)
        surprisal = 10 * level + (rng.normal(0, 1, per_level) if within is None else signal + within * rng.normal(
            0, 1, per_level))
        probes, mates = (_recording(rng.normal(0, 1, k), rng.normal(0, 1, k)) for k in (10, 30))
        points.append((level, _recording(signal, surprisal), (probes, mates)))
    return {"shuffle": points}


def _dose_effects(curves):
    s = SimpleNamespace(args=SimpleNamespace(bootstrap=50, batch_size=8, oddballs=2), seed=0)
    records = nr.dose_records(s, curves)
    effects = {e["effect"]: e["value"] for r in records for e in r.get("effects", [])}
    return next(r for r in records if r["axis"] == "shuffle" and r["level"] == "all"), effects


def test_the_correlation_within_levels_is_not_the_one_pooled_over_them():
    independent, effects = _dose_effects(_hand_made_curves(None, np.random.default_rng(0)))
    assert independent["spearman"]["signal, surprisal"]["rho"] > 0.9  # both rise with the level
    within = independent["within_levels"]["signal, surprisal"]
    assert abs(within["rho"]) < 0.15 and within["ci"][0] < 0 < within["ci"][1] and within["batches"] == 30
    assert effects["dose-response | shuffle | rho(signal, surprisal) within levels"] == within["rho"]
    # one axis: its mean over the axes is its own
    assert effects["dose-response | all axes | rho(signal, surprisal) within levels, mean over axes"] == within["rho"]
    # and where the surprisal does follow the signal inside each level, the within-level rho says so
    dependent, _ = _dose_effects(_hand_made_curves(0.3, np.random.default_rng(0)))
    assert dependent["within_levels"]["signal, surprisal"]["rho"] > 0.9


def test_within_groups_spearman_by_hand():
    # group a: x and y in the same order (rho 1); group b: reversed (rho -1); group c constant: no rho
    x = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 5.0, 5.0])
    y = np.array([1.0, 2.0, 3.0, 30.0, 20.0, 10.0, 1.0, 2.0])
    groups = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert stats.within_groups_spearman(x, y, groups) == pytest.approx(0.0)
    assert stats.within_groups_spearman(x[:3], y[:3], groups[:3]) == pytest.approx(1.0)
    # pooled over groups a and b: ranks (1..6) against (1, 2, 3, 6, 5, 4), 1 - 6 * 8 / (6 * 35)
    assert stats.spearman(x[:6], y[:6]) == pytest.approx(1 - 48 / 210)


def test_the_gate_alone_moves_f_by_an_adam_step_on_autograds_gradient_of_gamma_mean_d(mnist_root, tmp_path):
    """From an Adam state of its own (one step taken on random gradients), one gate_step equals Adam's
    update written out here, on autograd's gradient of gamma mean_b D(F(x))_b, F's adversarial term."""
    s = _setup(make_checkpoint(tmp_path / "run", "mnist", mnist_root, "--gamma", "0.7", "--wd", "0.01"))
    nets, hp, flags = _noiseless(copy.deepcopy(s.nets)), s.hp, s.run_flags
    assert hp.gamma == 0.7
    optimizers = make_optimizers(nets, flags)
    torch.manual_seed(0)
    for p in nets.inference.parameters():
        p.grad = torch.randn_like(p)
    optimizers["inference"].step()
    state = copy.deepcopy(optimizers["inference"].state_dict()["state"])
    x = s.images(True, 8, "familiar")
    reference = copy.deepcopy(nets)
    params = list(reference.inference.parameters())
    grads = torch.autograd.grad(0.7 * reference.discriminator(reference.inference(x)).mean(), params,
                                allow_unused=True)
    before = [p.detach().clone() for p in nets.inference.parameters()]
    discriminator = copy.deepcopy(nets.discriminator.state_dict())
    ex.gate_step(nets, optimizers, x, hp)
    b1, b2, lr, wd = flags.beta1, flags.beta2, flags.lr_e, 0.01
    moved = 0
    for i, (p, old, g) in enumerate(zip(nets.inference.parameters(), before, grads)):
        if g is None:  # D's term does not reach it: Adam skips it
            assert torch.equal(p, old)
            continue
        t = float(state[i]["step"]) + 1
        g = g + wd * old  # Adam's weight decay: L2 added to the gradient
        m = b1 * state[i]["exp_avg"] + (1 - b1) * g
        v = b2 * state[i]["exp_avg_sq"] + (1 - b2) * g * g
        want = old - lr / (1 - b1 ** t) * m / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
        assert torch.allclose(p.detach(), want, rtol=1e-5, atol=1e-10), i
        moved += not torch.equal(p, old)
    assert moved > 0
    after = nets.discriminator.state_dict()
    assert all(torch.equal(after[k], v) for k, v in discriminator.items())  # D does not move


@pytest.mark.parametrize("values", [[0.6, 0.7, 0.8, 0.9, 0.55], [0.6, 0.4, 0.8, 0.9, 0.55], [0.4, 0.3, 0.2],
                                    [0.5, 0.6, 0.5, 0.7], [0.6, 0.4], list(np.linspace(0.51, 0.6, 12)) + [0.4, 0.45]])
def test_the_exact_sign_test_is_scipys_binomial_test(values):
    binomtest = pytest.importorskip("scipy.stats").binomtest
    above, below = sum(v > 0.5 for v in values), sum(v < 0.5 for v in values)
    assert stats.sign_test(values, 0.5) == pytest.approx(binomtest(above, above + below, 0.5).pvalue, rel=1e-12)


def test_the_sign_tests_floor_and_the_sign_flip_test_by_hand():
    assert stats.sign_test([1, 2, 3, 4, 5], 0) == 2 / 32  # five runs cannot go below 0.0625
    assert np.isnan(stats.sign_test([0.5, 0.5], 0.5))
    # d = (1, 2, 3): of the 8 sign patterns |sum| >= 6 only for all + and all -: 2 / 8
    assert stats.sign_flip_test([1.0, 2.0, 3.0]) == 0.25
    # d = (3, -1, 1): |sum| = 3; patterns reaching it: (3, +-1, +-1) with sum >= 3 or <= -3, i.e. 3-1+1,
    # 3+1-1, 3+1+1 and their mirrors: 6 of 8
    assert stats.sign_flip_test([4.0, 0.0, 2.0], null=1.0) == 0.75
    big = stats.sign_flip_test(np.arange(1.0, 21.0), reps=2000, seed=1)  # sampled: observed counted in
    assert big == pytest.approx(1 / 2001, rel=0.5)


def test_habituation_is_read_against_the_control_streams_drift_stream_by_stream():
    """Three streams whose repeated images fall by 1, 2 and 3 from the first tenth to the last, beside
    control streams (no repetition) that all fall by 1: habituation beyond the drift 0, -1, -2."""
    per_stream, controls = [], []
    for change in (-1.0, -2.0, -3.0):
        signal = np.zeros((10, 4))
        signal[-1] = change
        per_stream.append(nr.familiarization_effects(ex.Stream(signal, signal, np.tile(np.arange(4), (10, 1)))))
        control = np.zeros((10, 4))
        control[-1], control[0] = -0.5, 0.5  # its last tenth 1 below its first
        controls.append(nr.control_stream_effects(ex.Stream(control, 2 * control, np.full((10, 4), -1))))
    assert [c["signal"]["drift"] for c in controls] == [-1.0] * 3 and controls[0]["gate"]["drift"] == -2.0
    across = nr.familiarization_record(per_stream, controls)["across_streams"]
    assert across["signal"]["habituation_beyond_drift"]["mean"] == pytest.approx(-1.0)
    assert across["gate"]["habituation_beyond_drift"]["mean"] == pytest.approx(0.0)  # -2 - (-2) on average
    assert across["signal"]["control_drift"]["n"] == 3


def test_the_control_stream_shows_no_image_twice_until_the_split_runs_out(mnist_root, tmp_path, monkeypatch):
    s = _setup(make_checkpoint(tmp_path / "run", "mnist", mnist_root))  # K = 4, T = 6; 40 test images
    shown = []
    monkeypatch.setattr(ex, "_train_on", lambda s, subject, batches, name: shown.append(batches) or (
        np.zeros((len(batches), 4)), np.zeros((len(batches), 4))))
    stream, recur = ex.control_stream(s, 0)
    images = torch.cat(shown[0]).flatten(1)
    assert recur is None and len(shown[0]) == 6 and len(torch.unique(images, dim=0)) == 24
    s.args.presentations = 12  # 48 presentations of 40 images: each recurs 10 steps later, not sooner
    stream, recur = ex.control_stream(s, 0)
    batches = shown[1]
    assert recur == 10 and len(torch.unique(torch.cat(batches[:10]).flatten(1), dim=0)) == 40
    assert torch.equal(batches[10], batches[0])
