"""Measures of how well F infers (inference_metrics.py, measure_inference.py)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import make_checkpoint, write_mnist

import inference_metrics as im
import measure_inference
import stats
from models import ModelConfig, Networks, _add_noise

B = 50  # samples per synthetic batch
SHAPES = [(4, 2, 2)] * 6  # small layers h0..h5: 16 features each, 96 in the whole state


def synthetic_batches(n_batches, seed, shift=None, batch_offset=0.0):
    """Batches [h0, .., h5] of standard normal samples; `shift` {layer: mean} moves some layers;
    `batch_offset` is the sd of an offset that every sample of a batch shares."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        batch = [torch.randn(B, *s, generator=g) + batch_offset * torch.randn(1, *s, generator=g) for s in SHAPES]
        for l, mean in (shift or {}).items():
            batch[l] += mean
        batches.append(batch)
    return batches


def near_chance(result, margin=0.1):
    return all(abs(r["accuracy"] - 0.5) < margin for r in result.values())


def test_two_draws_of_one_distribution_are_indistinguishable():
    result = im.wake_sleep_two_sample(synthetic_batches(20, 0), synthetic_batches(20, 1))
    assert set(result) == {"h0", "h1", "h2", "h3", "h4", "h5", "h0,h1", "h1,h2", "h2,h3", "h3,h4", "h4,h5", "whole"}
    assert near_chance(result), result
    assert all(r["low"] <= r["accuracy"] <= r["high"] for r in result.values())


def test_a_layer_that_differs_is_found_and_only_where_it_is_seen():
    result = im.wake_sleep_two_sample(synthetic_batches(20, 0, shift={3: 1.5}), synthetic_batches(20, 1))
    seen = {"h3", "h2,h3", "h3,h4", "whole"}
    assert all(result[name]["accuracy"] > 0.97 and result[name]["low"] > 0.9 for name in seen), result
    assert near_chance({name: r for name, r in result.items() if name not in seen}), result


def test_whole_batches_are_held_out():
    """Samples of a batch share an offset, as states of one batch share its BatchNorm statistics. Both
    kinds come from one process: holding out whole batches gives chance, within the interval (a
    held-out batch is classified mostly one way or the other, so the accuracy varies widely across
    batches, and the interval says so). Regrouped so that every batch mixes samples of all the
    original ones, the fitted half holds every offset and the classifier recognises them: the leak
    that per-sample splitting would have."""
    wake, sleep = synthetic_batches(20, 0, batch_offset=3.0), synthetic_batches(20, 1, batch_offset=3.0)
    held_out = im.wake_sleep_two_sample(wake, sleep)
    assert all(r["low"] < 0.5 < r["high"] for r in held_out.values()), held_out

    def mixed(batches):  # batch j: samples j*B/20 .. of every original batch
        everything = [torch.stack([b[l] for b in batches], dim=1).flatten(0, 1) for l in range(6)]  # sample-major
        return [[h[j * B:(j + 1) * B] for h in everything] for j in range(len(batches))]

    leaked = im.wake_sleep_two_sample(mixed(wake), mixed(sleep))["whole"]
    assert leaked["low"] > 0.8 and leaked["low"] > held_out["whole"]["high"], (leaked, held_out["whole"])


def test_the_null_splits_by_batch_into_two_halves_of_equal_size():
    result = im.null_two_sample(synthetic_batches(40, 2, batch_offset=3.0))
    assert all(r["low"] < 0.5 < r["high"] for r in result.values()), result
    with pytest.raises(ValueError, match="at least 4"):
        im.null_two_sample(synthetic_batches(6, 0))


# --- Reconstruction ---------------------------------------------------------------------------------

class Ascent(nn.Module):
    """A stand-in F whose layer k maps h to 2h + k; noise in train mode only (as the real G's, not F's),
    so a reconstruction in train mode would not be exact."""

    def forward(self, x, to_layer=5):
        states = [x]
        for k in range(1, to_layer + 1):
            h = 2 * states[-1] + k
            states.append(_add_noise(h, torch.tensor(0.1)) if self.training else h)
        return states


class Descent(nn.Module):
    """A stand-in G whose layer k maps h to (h - k) / 2 + error: the exact inverse of Ascent's with
    error 0, on layer 1 only (onto the image)."""

    def __init__(self, error=0.0):
        super().__init__()
        self.error = error

    def descend(self, h, from_layer):
        states = [h]
        for k in range(from_layer, 0, -1):
            states.append((states[-1] - k) / 2 + (self.error if k == 1 else 0))
        return states[::-1]


def stand_in_networks(error=0.0):
    nets = Networks(ModelConfig(n_filters=4, noise_dim=8))
    nets.inference, nets.generator = Ascent(), Descent(error)
    return nets


def test_a_generator_that_inverts_the_inference_network_reconstructs_exactly():
    nets = stand_in_networks()  # in train mode: reconstructions must use eval mode, and restore the modes
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    for k in im.KS:
        assert torch.allclose(im.reconstructions(nets, x, k), x, atol=1e-5)
    assert nets.inference.training and nets.generator.training
    errors = im.reconstruction_error(nets, [x, x[:2]])
    assert set(errors) == set(im.KS) and all(len(e) == 8 and e.max() < 1e-9 for e in errors.values())


def test_the_error_is_the_mean_squared_difference_per_pixel():
    errors = im.reconstruction_error(stand_in_networks(error=0.3), [torch.zeros(5, 1, 4, 4)])
    assert all(np.allclose(e, 0.09) for e in errors.values())
    # A G that descends from the wrong layer would not invert F's h_k: the layer k is used as given.
    nets = stand_in_networks()
    nets.generator.descend = lambda h, from_layer: Descent().descend(h, 5)
    assert im.reconstruction_error(nets, [torch.zeros(5, 1, 4, 4)], ks=(3,))[3].min() > 0.1


@pytest.mark.parametrize("divisive", [False, True])
def test_generator_forward_is_unchanged_by_descend(divisive):
    """Generator.forward as it was before descend existed, written out, against the method, to the bit;
    and descend from G's own h_k in eval mode gives G's states below k."""
    torch.manual_seed(0)
    G = Networks(ModelConfig(n_filters=4, noise_dim=8, divisive_normalization=divisive)).generator
    z = torch.randn(5, 8, 1, 1)

    def before(z):
        h = G._norm(z)
        states = [h]
        for k in range(5, 0, -1):
            h = G.convs[k - 1](h)
            if k > 1:
                h = G._norm(h)
                if G.training:
                    h = _add_noise(h, G.sigma)
                h = torch.relu(h)  # F.relu is torch.relu
            else:
                h = torch.tanh(h)
            states.append(h)
        return states[::-1]

    for training in (True, False):
        G.train(training)
        torch.manual_seed(1)
        new = G(z)
        torch.manual_seed(1)
        old = before(z)
        assert all(torch.equal(a, b) for a, b in zip(new, old))
    states = G.eval()(z)
    for k in range(1, 6):
        assert all(torch.equal(a, b) for a, b in zip(G.descend(states[k], k), states[:k + 1]))


def test_states_leave_the_networks_unchanged():
    nets = Networks(ModelConfig(n_filters=4, noise_dim=8))
    before = {k: v.clone() for k, v in nets.state_dict().items()}
    wake = im.wake_states(nets, [torch.rand(4, 1, 32, 32) * 2 - 1] * 3)
    sleep = im.sleep_states(nets, 2, 4, "cpu")
    assert len(wake) == 3 and len(sleep) == 2
    assert [tuple(h.shape[1:]) for h in wake[0]] == [tuple(h.shape[1:]) for h in sleep[0]] == ModelConfig(
        n_filters=4, noise_dim=8).state_shapes()
    assert all(torch.equal(v, nets.state_dict()[k]) for k, v in before.items())


def test_layer_statistics_by_hand():
    h1 = torch.tensor([[3.0, 0.0], [4.0, 0.0]]).view(1, 2, 1, 2)  # pixel 1: channels (3, 4), pixel 2: zeros
    states = [torch.zeros(1, 1)] + [h1] * 5
    found = im.layer_statistics([states, states])
    assert found[1]["channel_rms"] == pytest.approx((12.5 ** 0.5 + 0) / 2)
    assert found[3]["zeros"] == 0.5 and found[5]["mean"] == pytest.approx(7 / 4)
    assert found[2]["sd"] == 0  # the two samples are the same state
    other = [torch.zeros(1, 1)] + [h1 * 3] * 5
    assert im.layer_statistics([states, other])[1]["sd"] == pytest.approx(2 * 7 / 4 / 2 ** 0.5)


def test_largest_mean_difference_is_the_entry_that_moved():
    wake = synthetic_batches(2, seed=1)
    sleep = [[h.clone() for h in states] for states in wake]
    for states in sleep:
        states[2][:, 1, 0, 1] += 0.7
        states[4][:, 0, 1, 1] -= 0.2
    found = im.largest_mean_differences(wake, sleep)
    assert found[2] == pytest.approx(0.7) and found[4] == pytest.approx(0.2) and found[1] == 0


def test_prediction_residuals_are_g_s_noise_on_its_dreams_and_the_offset_on_its_noiseless_layers():
    torch.manual_seed(0)
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, generator_noise=0.2))
    G = nets.generator.eval()
    h = G(torch.randn(64, 6, 1, 1))  # noiseless: each layer exactly G's block of the one above
    assert all(r < 1e-6 for r in im.prediction_residuals(nets, [h]).values())
    moved = [h[0] + 0.25] + h[1:]
    found = im.prediction_residuals(nets, [moved])
    assert found[1] == pytest.approx(0.25) and found[2] < 1e-6
    G.train()
    noisy = im.prediction_residuals(nets, [G(torch.randn(64, 6, 1, 1))])
    assert noisy[1] < 1e-6 and all(0.02 < noisy[k] < 0.2 for k in (2, 3, 4))  # the image gets no noise
    assert G.training  # the mode is restored


class FirstUnitOfTheTop(nn.Module):
    """A stand-in D whose score is the first unit of h5."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, states):
        return states[5].flatten(1)[:, 0]


def test_discriminator_separation_of_states_it_orders_and_of_one_sample():
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6))
    nets.discriminator = FirstUnitOfTheTop()
    wake, sleep = synthetic_batches(4, seed=1, shift={5: 3.0}), synthetic_batches(4, seed=2)
    found = im.discriminator_separation(nets, wake, sleep)
    assert found["margin"] == pytest.approx(found["wake"] - found["sleep"]) and 2.5 < found["margin"] < 3.5
    assert found["auroc"] > 0.97 and 2 < found["margin_sd"] < 4
    same = im.discriminator_separation(nets, sleep, synthetic_batches(4, seed=3))
    assert abs(same["auroc"] - 0.5) < 0.1 and abs(same["margin_sd"]) < 0.3
    nets.discriminator = None
    assert im.discriminator_separation(nets, wake, sleep) is None


def test_proportion_interval_by_hand():
    r = stats.proportion_interval([True] + [False] * 31)  # Wilson's 95 % interval of 1 in 32
    assert r["mean"] == 1 / 32 and abs(r["low"] - 0.00554) < 1e-4 and abs(r["high"] - 0.15744) < 1e-4
    assert stats.proportion_interval([True] * 10)["high"] == pytest.approx(1.0)


# --- The command ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("inference_data"), n_train=64, n_test=40)


@pytest.fixture(scope="module")
def run(mnist, tmp_path_factory):
    return mnist, make_checkpoint(tmp_path_factory.mktemp("inference_run"), "mnist", mnist)


@pytest.mark.parametrize("rule", ["adversarial", "wake-sleep"])  # wake-sleep: a checkpoint without D
def test_the_command_runs_and_writes_every_measure_and_the_figure(rule, mnist, tmp_path, capsys):
    """That the command runs on both kinds of checkpoint and writes each part of its record (their values:
    test_the_command_s_reconstruction_measures_by_hand), and leaves the checkpoint as it was."""
    ckpt = make_checkpoint(tmp_path / "run", "mnist", mnist, "--inference-rule", rule)
    out = tmp_path / "out"
    before = open(ckpt, "rb").read()
    assert measure_inference.main(["--path", ckpt, "--n", "32", "-b", "8", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wake vs sleep" in printed and "null" in printed and "label agreement" in printed
    with open(out / "inference_measures.json") as f:
        rec = json.load(f)
    assert rec["dataset"] == "mnist" and rec["n_per_kind"] == 32 and rec["split"] == "test"
    assert set(rec["reconstruction"]) == {"5", "4", "3", "2", "1"}
    assert all(set(m) == {"mse", "label_agreement"} for m in rec["reconstruction"].values())
    assert rec["wake_vs_sleep"].keys() == rec["null"].keys() and "whole" in rec["null"]
    differ = rec["differences"]
    assert set(differ["layers"]["sleep"]) == set(differ["prediction_residual"]["wake"]) == {"1", "2", "3", "4", "5"}
    assert (differ["discriminator"] is None) == (rule == "wake-sleep") and "residual from G" in printed
    assert os.path.getsize(out / "reconstructions.png") > 0
    assert open(ckpt, "rb").read() == before


def _noiseless_checkpoint(folder, data):
    """A checkpoint whose F and G have no noise (sigma 0 and DeReLU scale 0, so that the DeReLU passes its
    rectified input as it is): a reconstruction is then a function of the image alone."""
    from checkpoint import save_checkpoint
    path = make_checkpoint(folder, "mnist", data, "--inference-noise", "0", "--generator-noise", "0",
                           "--divisive-normalization", "True")
    state = torch.load(path, weights_only=True)
    scales = [k for k in state["networks"] if k.startswith("inference.derelu.") and k.endswith(".scale")]
    assert len(scales) == 4
    for k in scales:
        state["networks"][k].zero_()
    save_checkpoint(path, state)
    return path


def test_the_command_s_reconstruction_measures_by_hand(mnist, tmp_path):
    """On a noiseless checkpoint, the reconstruction error from each layer k and the digit classifier's
    label agreement, recomputed here from the checkpoint and the test images: F's blocks up to h_k and
    G's down from it written out (eval mode: BatchNorm on its running statistics, N over channels), the
    squared error per pixel, its mean and 95 % t-interval over the 40 test images; the classifier's labels
    of the 8-bit reconstructions (and of the images themselves) against the images' labels."""
    from scipy.stats import t
    from checkpoint import load_checkpoint, networks_from_checkpoint
    from data import load_in_memory, to_unit_range
    from models import divisive_norm
    from sample_quality import QualityMeasure
    ckpt = _noiseless_checkpoint(tmp_path / "run", mnist)
    out = tmp_path / "out"
    assert measure_inference.main(["--path", ckpt, "--n", "40", "-b", "8", "--device", "cpu", "--out", str(out)]) == 0
    with open(out / "inference_measures.json") as f:
        rec = json.load(f)
    assert rec["n_reconstructed"] == 40 and rec["split"] == "test"  # every test image: their order does not matter

    nets = networks_from_checkpoint(load_checkpoint(ckpt)).eval()
    F_, G = nets.inference, nets.generator
    images, labels = load_in_memory("mnist", mnist, 32, train=False)
    x = to_unit_range(images)
    classifier = QualityMeasure("mnist", mnist, 32, cache_dirs=[os.path.dirname(ckpt)]).net  # the command's, cached

    def agreement(u):  # 8 bits, as samples are scored
        u = torch.round((u + 1) * 127.5).clamp(0, 255) / 127.5 - 1
        return (classifier.logits(classifier.features(u)).argmax(1) == labels).double().mean().item()

    mses = {}
    with torch.no_grad():
        for k in (5, 4, 3, 2, 1):
            h = x
            for j in range(1, k + 1):
                h = F_.norms[j - 1](F_.convs[j - 1](h))
                h = divisive_norm(torch.relu(h) if j < 5 else h)
            for j in range(k, 0, -1):
                h = G.convs[j - 1](h)
                h = torch.tanh(h) if j == 1 else torch.relu(divisive_norm(h))  # release order: N, then ReLU
            e = (h - x).pow(2).flatten(1).mean(dim=1).double().numpy()
            half = t.ppf(0.975, len(e) - 1) * e.std(ddof=1) / np.sqrt(len(e))
            found = rec["reconstruction"][str(k)]
            assert [found["mse"][q] for q in ("mean", "low", "high")] == pytest.approx(
                [e.mean(), e.mean() - half, e.mean() + half], rel=1e-5), k
            assert found["label_agreement"]["mean"] == agreement(h), k
            mses[k] = e.mean()
    assert rec["label_agreement_of_inputs"]["mean"] == agreement(x) == 1.0  # the classifier knows these digits
    # so the agreement, image by image, with labels moved by one is exactly where two neighbours share a label
    assert np.array_equal(im.label_agreement(classifier, x, labels), np.ones(40, bool))
    assert np.array_equal(im.label_agreement(classifier, x, labels.roll(1)), (labels == labels.roll(1)).numpy())
    # the five errors differ from one another: a measure recorded under the wrong k would be seen
    assert min(abs(a - b) / a for a in mses.values() for b in mses.values() if a != b) > 1e-3, mses


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_dataset_of_other_channels_is_one_line(run, tmp_path, capsys):
    root, ckpt = run
    assert measure_inference.main(["--path", ckpt, "--dataset", "cifar10", "--data", root, "--n", "32", "-b", "8",
                                   "--device", "cpu", "--out", str(tmp_path)]) == 1
    err = one_error_line(capsys)
    assert "1-channel" in err and "3-channel" in err and "cifar10" in err
    assert measure_inference.main(["--path", str(tmp_path / "nothing"), "--device", "cpu"]) == 1
    assert "no checkpoint" in one_error_line(capsys)


def test_matching_during_training_is_recorded_and_changes_nothing_the_run_computes(mnist_root, tmp_path):
    """--matching-every 1: two_sample_* and distance_* in every epoch's row (one per feature set) and D's
    AUROC d_auroc, the
    curves figure's extra panel, and weights equal to the bit to those of the same run without it."""
    import train
    from conftest import TINY
    argv = TINY + ["--dataset", "mnist", "--data", mnist_root, "-b", "16", "--epochs", "2", "--gamma", "0.9",
                   "--seed", "4", "--probe-folds", "0", "--device", "cpu"]
    assert train.main(argv + ["--matching-every", "1", "--save-every", "1", "--out", str(tmp_path / "with")]) == 0
    assert train.main(argv + ["--out", str(tmp_path / "without")]) == 0
    with_ = torch.load(tmp_path / "with" / "checkpoint.pth.tar", weights_only=True)
    without = torch.load(tmp_path / "without" / "checkpoint.pth.tar", weights_only=True)
    for k, v in with_["networks"].items():
        assert torch.equal(v, without["networks"][k]), k
    # Each epoch's row holds the test of that epoch's networks (its checkpoint) on the run's training images,
    # with the measure's own seed: recomputed here from the checkpoint, the same numbers.
    from checkpoint import networks_from_checkpoint
    from data import load_in_memory
    import matching_metrics as mm
    measure = mm.MatchingDuringTraining.of_run(load_in_memory("mnist", mnist_root, 32, train=True)[0], 16, "cpu")
    assert [row["epoch"] for row in with_["history"]] == [1, 2]
    for row in with_["history"]:
        found = {k: v for k, v in row.items() if k.startswith(("two_sample_", "distance_", "d_auroc"))}
        assert set(found) == {f"{kind}_{name}" for name in im.feature_sets()
                              for kind in ("two_sample", "distance")} | {"d_auroc"}
        assert 0 <= found["d_auroc"] <= 1
        state = torch.load(tmp_path / "with" / f"checkpoint_epoch{row['epoch']}.pth.tar", weights_only=True)
        assert found == measure(networks_from_checkpoint(state)), row["epoch"]
    assert not any(k.startswith("two_sample_") for k in without["history"][0])
    header = (tmp_path / "with" / "metrics.csv").read_text().splitlines()[0]
    assert "two_sample_h4,h5" in header and "distance_h0" in header
