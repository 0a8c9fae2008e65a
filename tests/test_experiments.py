"""The scripts of experiments/: each imports without running anything, and the part of it that its
claim in docs/fidelity.md rests on computes what the script says, on tiny tensors."""
import copy
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from conftest import ROOT, write_mnist

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import batch_effect  # noqa: E402
import d_noise_reach  # noqa: E402
import fd_spread  # noqa: E402
import matching  # noqa: E402
import release_replica  # noqa: E402
import rule_comparison  # noqa: E402
import step_vs_release  # noqa: E402

import data  # noqa: E402
import step  # noqa: E402
from losses import StepConfig  # noqa: E402
from models import ModelConfig, Networks  # noqa: E402

TINY = ModelConfig(image_size=32, channels=1, n_filters=4, noise_dim=8, divisive_normalization=True)


def test_stale_layers_output_the_old_weights_and_pass_gradients_to_the_new():
    # The release's graphs after an in-place optimizer step: old activations, new weights.
    torch.manual_seed(0)
    new = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    old = copy.deepcopy(new)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5)
    x = torch.randn(5, 3)
    with step_vs_release.stale(new, old):
        out = new(x)
    assert torch.allclose(out, old(x), atol=1e-6)
    out.sum().backward()
    # The last layer's weight gradient is the old hidden activations, summed over the batch.
    assert torch.allclose(new[2].weight.grad, old[1](old[0](x)).sum(0, keepdim=True))
    assert all(p.grad is None for p in old.parameters())
    assert not torch.equal(new(x), old(x))  # the hooks are gone after the block


def test_shared_draws_hand_each_code_the_same_numbers():
    shared = step_vs_release.SharedDraws()
    with shared.installed():
        shared.code = "ours"
        first, second = torch.randn(2, 3), torch.randn(2, 3)
        u = torch.rand_like(torch.empty(4, 4))
        shared.code = "release"
        again = torch.randn(2, 3)
        v = torch.empty(4, 4).uniform_()
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert torch.equal(u, 1 - v)  # this code draws DeReLU's noise from 1 - U, the release from U
    assert torch.equal(1 - (1 - v), v)  # exact in float32 on the grid k / 2^24
    assert torch.randn is shared.randn  # installed() put the real draw back


def _pure_step_setup(lr_d):
    torch.manual_seed(0)
    nets = Networks(TINY)
    args = types.SimpleNamespace(lr_e=3e-4, lr_g=1e-5, lr_d=lr_d, lr_rd=1e-4, beta1=0.64, beta2=0.999, wd=0.0)
    return nets, step.make_optimizers(nets, args)


def _f_gradient_after(step_fn, lr_d, x, hp):
    nets, optimizers = _pure_step_setup(lr_d)
    torch.manual_seed(1)
    step_fn(nets, optimizers, x, hp)
    return torch.cat([p.grad.flatten() for p in nets.inference.parameters()])


@pytest.mark.parametrize("lr_d, same", [(0.0, True), (1e-2, False)])
def test_release_rule_differs_from_the_default_only_once_d_moves(lr_d, same):
    hp = StepConfig(gamma=1.0, lamda=0.9, kl_from_sn=True)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    default = _f_gradient_after(step.training_step, lr_d, x, hp)
    release = _f_gradient_after(release_replica.release_rule_step, lr_d, x, hp)
    gap = ((default - release).norm() / default.norm()).item()
    assert (gap < 1e-4) if same else (gap > 1e-3), gap


def test_release_replica_digits_are_the_harness_s_unrounded_floats(tmp_path, monkeypatch):
    root = write_mnist(tmp_path, n_train=8, n_test=4)
    rounded = data.load_in_memory("mnist", root, 32)[0]
    monkeypatch.setattr(data, "_resize", release_replica.resize_in_floats)
    batches = data.make_batches("mnist", root, 32, 8, "cpu", shuffle=False)
    x = next(iter(batches))[0]
    levels = (x + 1) * 127.5
    assert x.dtype == torch.float32 and x.shape == (8, 1, 32, 32)
    assert (levels - levels.round()).abs().max() > 0.1  # between the 256 grey levels
    assert (levels - rounded.float()).abs().max() <= 1 + 1e-4  # at most one grey level from this code's


def test_fd_of_draws_scores_seeded_draws_of_the_generator_in_eval_mode():
    torch.manual_seed(0)
    generator = Networks(TINY).generator.train()
    measure = types.SimpleNamespace(score=lambda images: {"fd": images.mean().item()})
    fds = fd_spread.fd_of_draws(generator, measure, TINY.noise_dim, draws=3, n_images=6, chunk=4)
    assert not generator.training
    assert len(set(fds)) == 3  # each draw its own z
    assert fd_spread.fd_of_draws(generator, measure, TINY.noise_dim, draws=3, n_images=6) == pytest.approx(fds)


def test_kink_distances_measure_pre_activations_in_noise_sigmas():
    torch.manual_seed(0)
    nets = Networks(TINY)
    states = nets.inference(torch.rand(4, 1, 32, 32) * 2 - 1)
    D = nets.discriminator
    with torch.no_grad():
        for pair in D.pairs:
            pair.weight.zero_()
            pair.bias.fill_(0.02)  # every unit two sigmas from the kink
    assert d_noise_reach.kink_distances(D, states) == pytest.approx((0.02, 0.0, 1.0))
    with torch.no_grad():
        for pair in D.pairs:
            pair.bias.fill_(-0.005)
    assert d_noise_reach.kink_distances(D, states) == pytest.approx((0.005, 1.0, 1.0))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_release_passes_patch_applies_to_this_losses_py():
    # docs/fidelity.md tells a reader to `git apply` it: it must still fit losses.py as it is.
    patch = os.path.join(ROOT, "experiments", "release_passes.patch")
    done = subprocess.run(["git", "apply", "--check", patch], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _fake_run(folder, rule, seed, fd, ts):
    """A run folder with the files rule_comparison reads, its numbers made up."""
    os.makedirs(os.path.join(folder, "samples2000"))
    os.makedirs(os.path.join(folder, "inference"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"args": {"inference_rule": rule, "gamma": 1.0, "seed": seed}}, f)
    with open(os.path.join(folder, "metrics.csv"), "w") as f:
        f.write("epoch,steps\n1,32\n2,32\n")
    with open(os.path.join(folder, "samples2000", "samples.json"), "w") as f:
        json.dump({"classifier_fd": {"fd": fd, "kid": 1.0, "precision": 0.5, "recall": 0.25}}, f)
    interval = {"mean": 0.1, "low": 0.0, "high": 0.2}
    with open(os.path.join(folder, "inference", "inference_measures.json"), "w") as f:
        json.dump({"reconstruction": {str(k): {"mse": interval} for k in range(1, 6)},
                   "label_agreement_of_inputs": None,
                   "wake_vs_sleep": {"whole": {"accuracy": ts}}, "null": {"whole": {"accuracy": 0.5}}}, f)
    return str(folder)


def test_rule_comparison_groups_seeds_and_gives_the_welch_difference(tmp_path, capsys):
    runs = [_fake_run(tmp_path / f"a{s}", "adversarial", s, fd, 1.0) for s, fd in enumerate([10.0, 12.0, 14.0])]
    runs += [_fake_run(tmp_path / f"w{s}", "wake-sleep", s, fd, 0.9) for s, fd in enumerate([20.0, 30.0])]
    keyed = rule_comparison.groups([rule_comparison.run_row(r) for r in runs])
    assert list(keyed) == [("adversarial", 1.0, True), ("wake-sleep", 1.0, True)]
    assert rule_comparison.cell(keyed[("adversarial", 1.0, True)], "fd") == "12.0 (10.0 - 14.0)"
    assert keyed[("adversarial", 1.0, True)][0]["steps"] == 64
    # Welch by hand: means 12 and 25; variances of the means 4 / 3 and 50 / 2; df from the formula.
    d, lo, hi = rule_comparison.welch([10, 12, 14], [20, 30])
    se = (4 / 3 + 25) ** 0.5
    df = (4 / 3 + 25) ** 2 / ((4 / 3) ** 2 / 2 + 25 ** 2 / 1)
    from scipy import stats
    assert d == -13 and hi == pytest.approx(-13 + stats.t.ppf(0.975, df) * se)
    rule_comparison.main(runs)
    out = capsys.readouterr().out
    assert "| Adversarial Wake-Sleep (pure, gamma 1) | 3, 64 | 12.0 (10.0 - 14.0) |" in out
    assert "| adversarial - wake-sleep, gamma 1 (95 % Welch) |" in out


def test_seeds_with_no_spread_are_printed_as_identical_not_as_an_interval():
    assert rule_comparison.welch([1.0, 1.0, 1.0], [1.0, 1.0]) == (0.0, None, None)
    rows = [{"ts_h1": 1.0}, {"ts_h1": 1.0}]
    other = [{"ts_h1": 1.0}, {"ts_h1": 1.0}, {"ts_h1": 1.0}]
    assert rule_comparison.welch_cells(rows, other, [("ts_h1", "h1")]) == ["0.000, identical in every seed"]
    spread = [{"ts_h1": 0.9}, {"ts_h1": 1.0}]
    assert rule_comparison.welch_cells(spread, other, [("ts_h1", "h1")])[0].startswith("-0.050 [")


def _matching_run(folder, seed, lamda, h1, epochs=2):
    """A run folder with the files experiments/matching.py reads, its numbers made up; made before
    the noise options existed (its config does not name them)."""
    os.makedirs(os.path.join(folder, "inference"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"args": {"lamda": lamda, "gamma": 0.9, "seed": seed, "out": str(folder)}}, f)
    with open(os.path.join(folder, "metrics.csv"), "w") as f:
        f.write("epoch,steps,two_sample_h1,distance_h1,d_auroc,fd\n"
                + "".join(f"{e},10,{h1},{h1 / 10},0.{e},\n" for e in range(1, epochs)) + f"{epochs},10,{h1},{h1 / 10},0.9,50\n")
    per_layer = {str(l): 0.5 for l in range(1, 6)}
    # H of h1 is h1 / 10 with p 0.5 (inside its null) at seed 0 only; every other H is 0.2 with p 0.001
    distance = {f"h{l}": {"distance": h1 / 10 if l == 1 else 0.2, "p": 0.5 if l == 1 and seed == 0 else 0.001}
                for l in range(6)} | {"whole": {"distance": 0.2, "p": 0.001}}
    graded = {"distance": distance, "untrained": {"distance": distance},
              "generator_fit": {str(k): {"explained": 1 - k / 10} for k in range(1, 6)},
              "descents": {str(k): {f"h{k - 1}": {"distance": k / 100, "p": 0.001}} for k in range(1, 6)},
              "positive_control": {**{str(l): {"relative_error": l / 10, "distance": 0.1, "p": 0.001}
                                      for l in range(1, 6)}, "top_r2": 0.25}}
    layers = {str(l): {"channel_rms": 1.0, "zeros": 0.25, "mean": 0.5} for l in range(1, 6)}
    with open(os.path.join(folder, "inference", "inference_measures.json"), "w") as f:
        json.dump({"wake_vs_sleep": {**{f"h{l}": {"accuracy": h1 if l == 1 else 1.0} for l in range(1, 6)},
                                     "whole": {"accuracy": 1.0}},
                   "graded": graded, "differences": {"layers": {"wake": layers, "sleep": layers},
                                   "prediction_residual": {"wake": per_layer, "sleep": per_layer},
                                   "discriminator": {"auroc": 0.6, "margin_sd": 0.2}}}, f)
    return str(folder)


def test_matching_groups_runs_by_the_flags_they_change_from_the_first(tmp_path, capsys):
    runs = [_matching_run(tmp_path / f"base{s}", s, 0.7, h1) for s, h1 in enumerate([1.0, 0.9])]
    runs += [_matching_run(tmp_path / f"low{s}", s, 0.07, h1) for s, h1 in enumerate([0.6, 0.7])]
    runs.append(_matching_run(tmp_path / "long", 0, 0.7, 1.0, epochs=6))
    rows = [matching.run_row(r) for r in runs]
    keyed = matching.groups(rows)
    assert list(keyed) == ["baseline", "--lamda 0.07", "60 steps"]
    assert rows[0]["args"]["generator_noise"] == 0.01  # an option the run predates: its default
    assert rows[0]["args"]["dream_noise"] == "release" and rows[0]["args"]["d_penalty"] == "one-sided-l1"
    assert rows[2]["ts_h1-h4"] == pytest.approx((0.6 + 3) / 4) and rows[2]["fd"] == 50
    assert matching.curves(runs[4])["h1"] == [(e, 1.0) for e in range(1, 7)]
    assert matching.curves(runs[4], "distance")["h1"] == [(e, 0.1) for e in range(1, 7)]
    assert rows[0]["d_auroc_min"] == 0.1 and rows[4]["explained3"] == pytest.approx(0.7)
    assert rows[0]["down2"] == 0.02 and rows[0]["pc_error4"] == 0.4 and rows[0]["pc_top_r2"] == 0.25
    matching.main(runs)
    out = capsys.readouterr().out
    # H of h1: inside its null in both baseline seeds? Only seed 0 is (p 0.5), so no mark; "60 steps" is seed 0
    assert "| baseline | 2 | 0.200 (0.200 - 0.200) | 0.095 (0.090 - 0.100) | 0.200" in out
    assert "| 60 steps | 1 | 0.200 | 0.100 * | 0.200 |" in out
    assert "| --lamda 0.07 | 2 | 0.650 (0.600 - 0.700) |" in out
    d, lo, hi = rule_comparison.welch([0.6, 0.7], [1.0, 0.9])
    assert f"| --lamda 0.07 - baseline (95 % Welch) | | {d:.3f} [{lo:.3f}, {hi:.3f}] |" in out
    assert "| baseline | h1 | 1.000/1.000 | 0.250/0.250 | 0.500/0.500 | nan/nan | 0.500/0.500 |" in out


def test_weight_change_is_measured_from_the_initial_weights_the_seed_draws(mnist_root, tmp_path):
    from checkpoint import load_networks
    from conftest import make_checkpoint
    state, nets = load_networks(make_checkpoint(tmp_path / "run", "mnist", mnist_root), "cpu")
    moved = matching.weight_change(state, nets)
    # make_checkpoint seeds 0, builds the networks and scales G's weights by 12: only G moved, 11-fold
    assert moved["discriminator"] == moved["inference"] == {"relative": 0.0, "largest": 0.0}
    assert moved["generator"]["relative"] == pytest.approx(11.0)


def test_batch_effect_across_runs_by_hand(tmp_path, capsys):
    """Two runs' novelty records: the AUROC difference and the ratio of the designs' mean differences,
    averaged over the runs."""
    paths = []
    for i, (whole, odd) in enumerate(((0.60, 0.70), (0.62, 0.66))):
        record = {"condition": "novel", "batch_effect": {"signal": odd - whole},
                  "whole_batch": {"signal": {"mean_difference": 2.0}}, "oddball": {"signal": {"mean_difference": 1.0 + i}}}
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps([{"condition": "familiar"}, record]))
        paths.append(str(path))
    found = batch_effect.batch_effects(paths)
    assert [v for pair in found[("novel", "signal")] for v in pair] == pytest.approx([0.10, 0.5, 0.04, 1.0])
    batch_effect.main(paths)
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| novel | signal | 2 | +0.070 [") and "| 0.75 [" in row
