"""neuromodulation_experiments.py and the effects neuromodulation_records.py computes from it: the inputs of
the dose-response, the oddball design, the surprisal, the gradient into F, the novel-class condition
and the flag on intervals built on too few batches, each against a hand-computed value or autograd."""
import json

import numpy as np
import pytest
import torch

import losses
import neuromodulation as nm
import neuromodulation_experiments as ex
import neuromodulation_records as nr
import neuromodulation_report as report
import recording
from conftest import make_checkpoint
from losses import StepConfig
from models import ModelConfig, Networks
from test_neuromodulation import SMALL, _noiseless, _one_line_error


def _nets(seed=0):
    torch.manual_seed(seed)
    return _noiseless(Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True)))


def _setup(path, *flags):
    args = nm.get_parser().parse_args(["--path", str(path), *SMALL, *flags])
    return nm.setup(args)


def test_the_perturbations_by_hand():
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    other = torch.rand(6, 1, 32, 32) * 2 - 1
    for axis in ex.DOSE_AXES:
        assert torch.equal(ex.perturbed(axis, x, 0.0, 1, other), x)  # level 0 is the familiar images
    assert torch.allclose(ex.perturbed("contrast", x, 1.0, 1), -x)
    assert torch.allclose(ex.perturbed("contrast", x, 0.25, 1), 0.5 * x)
    assert torch.allclose(ex.perturbed("mixture", x, 0.4, 1, other), 0.6 * x + 0.4 * other)
    noisy = ex.perturbed("noise", x, 0.5, 1)
    assert noisy.abs().max() <= 1 and not torch.equal(noisy, x)
    half = ex.perturbed("shuffle", x, 0.5, 1)
    for a, b in zip(half.flatten(1), x.flatten(1)):  # a permutation of the image's own pixels, about half moved
        assert torch.equal(a.sort().values, b.sort().values)
        assert 0.4 < (a != b).float().mean() <= 0.5
    assert torch.equal(ex.pixel_shuffled(x, 3, 0.0), x)


def test_an_oddball_probe_scores_as_in_the_whole_batch_when_every_input_is_familiar():
    """Batches of 8: 6 familiar images and 2 probes. With the probes taken from the same familiar
    sequence, every oddball batch is a whole batch of familiar images, in the same order."""
    nets, hp = _nets(), StepConfig(gamma=1.0)
    x = torch.rand(32, 1, 32, 32) * 2 - 1
    batches = x.view(4, 8, 1, 32, 32)
    familiar, probes = batches[:, :6].reshape(-1, 1, 32, 32), batches[:, 6:].reshape(-1, 1, 32, 32)
    torch.manual_seed(5)
    whole = recording.record_images(nets, hp, x, 8)
    torch.manual_seed(5)
    probe, mates = recording.record_oddball(nets, hp, probes, familiar, 2, 8)
    is_probe = torch.arange(32) % 8 >= 6
    for k in recording.Recording.KEYS:
        assert torch.equal(getattr(probe, k), getattr(whole, k)[is_probe]), k
        assert torch.equal(getattr(mates, k), getattr(whole, k)[~is_probe]), k
    # and a probe's score does depend on its batch-mates: the batch effect the design removes
    torch.manual_seed(5)
    other, _ = recording.record_oddball(nets, hp, probes, -familiar, 2, 8)
    assert not torch.allclose(other.signal, probe.signal)


def test_the_surprisal_is_gs_prediction_loss_per_sample():
    nets, hp = _nets(), StepConfig(gamma=1.0)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    recorded = recording.record_images(nets, hp, x, 8)
    nets.train()
    with torch.no_grad():
        wake = nets.inference(x)
        by_hand = sum((nets.generator.predict(k, wake[k]) - wake[k - 1]).abs().flatten(1).mean(dim=1)
                      for k in range(1, 6))
        loss = losses.generator_prediction_loss(nets.generator, wake)
    assert torch.allclose(recorded.surprisal, by_hand, atol=1e-6)
    assert recorded.surprisal.mean() == pytest.approx(float(loss), abs=1e-6)


def test_the_gradient_into_f_is_autograds_of_gamma_mean_d():
    nets, hp = _nets(), StepConfig(gamma=0.7)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    norm = ex.adversarial_gradient_norm(nets, hp, x)
    nets.train()
    params = list(nets.inference.parameters())
    grads = torch.autograd.grad(0.7 * nets.discriminator(nets.inference(x)).mean(), params, allow_unused=True)
    assert norm == pytest.approx(float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))), rel=1e-4)


def test_an_interval_over_fewer_than_ten_batches_is_flagged(capsys):
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 40), rng.normal(0, 1, 40)
    assert nr.compare(a, b, 50, 0, batch_size=20)["few_batches"]  # 2 batches
    assert not nr.compare(a, b, 50, 0, batch_size=4)["few_batches"]  # 10 batches
    probes, mates = rng.normal(1, 1, 2 * 9), rng.normal(0, 1, 6 * 9)
    odd = nr.oddball_compare(probes, mates, per_batch=2)
    assert odd["batches"] == 9 and odd["few_batches"]
    by_hand = np.mean([nr.auroc(p, m) for p, m in zip(probes.reshape(9, 2), mates.reshape(9, 6))])
    assert odd["auroc"] == pytest.approx(by_hand)
    record = {"condition": "c", "signal": {"mean": 1, "sd": 1}, "gate": {"mean": 1, "sd": 1},
              "surprisal": {"mean": 1, "sd": 1}, "signal_gate_spearman": {"rho": 0.1, "ci": [0, 0.2]},
              "whole_batch": {k: nr.compare(a, b, 50, 0, 20) for k in ("signal", "gate", "surprisal")},
              "oddball": {k: odd for k in ("signal", "gate", "surprisal")}, "batch_effect": dict.fromkeys(
                  ("signal", "gate", "surprisal"), 0.0)}
    report.print_novelty([record])
    out = capsys.readouterr().out
    assert "]*" in out and "fewer than 10 scored batches" in out


def test_the_dose_response_at_level_0_is_the_familiar_condition(mnist_root, tmp_path):
    s = _setup(make_checkpoint(tmp_path / "run", "mnist", mnist_root))
    whole, _ = ex.novelty(s, ex.novelty_inputs(s))
    curves = ex.dose_response(s)
    for axis in ex.DOSE_AXES:
        level, at_zero, _ = curves[axis][0]
        assert level == 0 and torch.equal(at_zero.signal, whole[ex.FAMILIAR].signal)
        assert torch.equal(at_zero.gate, whole[ex.FAMILIAR].gate)
        assert not torch.equal(curves[axis][-1][1].signal, at_zero.signal)


def test_a_run_on_some_classes_gets_a_novel_class_condition_and_its_controls(mnist_root, tmp_path):
    path = make_checkpoint(tmp_path / "run", "mnist", mnist_root, "--classes", "0", "1", "2")
    out = tmp_path / "out"
    assert nm.main(["--path", path, "--experiments", "novelty", "dose-response", "--out", str(out), *SMALL]) == 0
    records = json.loads((out / "records.json").read_text())
    names = [r["condition"] for r in records if r["experiment"] == "novelty"]
    assert names[2] == "novel class: test split, labels 3 4 5 6 7 8 9"
    assert {r["networks"] for r in records if r["experiment"] == "dose-response"} == {"trained", "initialization"}
    effects = [e["effect"] for r in records for e in r.get("effects", [])]
    assert "novelty | trained | novel: test split | oddball | signal AUROC" in effects
    assert "novelty | initialization | novel: test split | oddball | signal AUROC" in effects
    assert "dose-response | trained | contrast | rho(signal, surprisal)" in effects
    assert all(r["classes"] == [0, 1, 2] for r in records)


def _indices_in(images, split_images):
    """Each image's index in the split, found by its exact pixels (images in [-1, 1]; None: not there)."""
    as_uint8 = ((images.cpu() + 1) * 127.5).round().to(torch.uint8).flatten(1)
    table = {bytes(row.numpy()): i for i, row in enumerate(split_images.flatten(1))}
    return [table.get(bytes(row.numpy())) for row in as_uint8]


def _drawn_from(images, split, classes, n):
    """That the images are distinct images of the split, all of those classes' up to n of them; their labels."""
    split_images, split_labels = split
    found = _indices_in(images, split_images)
    assert None not in found and len(set(found)) == len(found)  # of the split, none drawn twice
    of_classes = sum(int(y) in classes for y in split_labels)
    assert len(found) == min(n, of_classes)
    labels = {int(split_labels[i]) for i in found}
    assert labels <= set(classes)
    return labels


def test_the_novel_class_condition_holds_test_images_of_the_left_out_classes_only(mnist_root, tmp_path):
    """Trained on 0 1 2: the familiar condition is training images of those, the novel one test images
    of those, the novel class test images of 3..9; the two OOD controls are the novel images moved."""
    from data import load_in_memory
    s = _setup(make_checkpoint(tmp_path / "run", "mnist", mnist_root, "--classes", "0", "1", "2"))
    conditions = dict(ex.novelty_inputs(s))
    train_split = load_in_memory("mnist", mnist_root, 32, train=True)
    test_split = load_in_memory("mnist", mnist_root, 32, train=False)
    n = s.args.n_images
    assert _drawn_from(conditions[ex.FAMILIAR], train_split, {0, 1, 2}, n) == {0, 1, 2}
    novel = conditions["novel: test split"]
    assert _drawn_from(novel, test_split, {0, 1, 2}, n) == {0, 1, 2}  # new exemplars of the trained classes
    left_out = _drawn_from(conditions["novel class: test split, labels 3 4 5 6 7 8 9"], test_split, range(3, 10), n)
    assert len(left_out) > 1
    assert torch.equal(conditions["OOD: test split, contrast inverted"], -novel)
    shuffled = conditions["OOD: test split, pixels shuffled"]
    assert torch.equal(shuffled.flatten(1).sort().values, novel.flatten(1).sort().values)  # each its own pixels
    assert not torch.equal(shuffled, novel)


def test_a_control_of_another_architecture_is_refused_before_any_work(mnist_root, tmp_path, capsys, monkeypatch):
    scored = []
    monkeypatch.setattr(recording, "record_passes", lambda *a: scored.append(a))
    path = make_checkpoint(tmp_path / "run", "mnist", mnist_root)
    wider = make_checkpoint(tmp_path / "wider", "mnist", mnist_root, "--n-filters", "8")
    err = _one_line_error(capsys, ["--path", path, "--experiments", "dose-response", "--controls", wider, *SMALL])
    assert "another architecture" in err and not scored


def test_plasticity_ratios_are_one_for_the_familiar_condition_itself(mnist_root, tmp_path):
    """The measured path once (its sizes), then the ratios on recordings of known values."""
    s = _setup(make_checkpoint(tmp_path / "run", "mnist", mnist_root))
    x = s.images(True, 32, "familiar")
    found = ex.plasticity(s, [(ex.FAMILIAR, x), ("the same images", x.clone())])
    assert len(found[ex.FAMILIAR]["gradient"]) == 4 and found[ex.FAMILIAR]["update_n"] > 0
    assert found[ex.FAMILIAR]["gate_update_n"] > 0
    gate = {"gate_update_1": 0.1, "gate_update_n": 1.0}
    known = {ex.FAMILIAR: {"gradient": [1.0, 3.0], "update_1": 0.5, "update_n": 4.0, **gate},
             "same": {"gradient": [1.0, 3.0], "update_1": 0.5, "update_n": 4.0, **gate},
             "odd": {"gradient": [3.0, 5.0], "update_1": 0.25, "update_n": 12.0, "gate_update_1": 0.4,
                     "gate_update_n": 0.5}}
    records = {r["condition"]: r for r in nr.plasticity_records(s, known)}
    assert "ratio_to_familiar" not in records[ex.FAMILIAR]
    assert records["same"]["ratio_to_familiar"]["gradient"] == 1.0
    odd = records["odd"]["ratio_to_familiar"]
    # mean gradient 4 over 2, the one-step update 0.25 over 0.5, the sustained one 12 over 4
    assert (odd["gradient"], odd["update_1"], odd["update_n"], odd["gradient_batches"]) == (2.0, 0.5, 3.0, 2)
    # and D's term alone: 0.4 over 0.1 in one step, 0.5 over 1 in the sustained ones
    assert [e["value"] for e in records["odd"]["effects"]] == [2.0, 0.5, 3.0, 4.0, 0.5]