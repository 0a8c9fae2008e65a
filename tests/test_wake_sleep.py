"""Classic Wake-Sleep (--inference-rule wake-sleep): its term against its formula, F learning from
sleep states alone, no D anywhere, and the adversarial default unchanged."""
import argparse
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY, make_checkpoint, write_mnist

import losses
import train
from checkpoint import CheckpointError, check_architecture, load_checkpoint, networks_from_checkpoint
from losses import StepConfig, step_losses
from models import ModelConfig, Networks
from step import make_optimizers, training_step

WAKE_SLEEP = StepConfig(gamma=1.0, lamda=0.9, kl_from_sn=True, inference_rule="wake-sleep")
ADAM = argparse.Namespace(lr_e=8e-4, lr_g=2e-4, lr_d=1e-5, lr_rd=1e-5, beta1=0.0, beta2=0.9, wd=0.0)


def _nets(rule="wake-sleep", readout=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, readout=readout,
                      discriminator=rule == "adversarial")
    return Networks(cfg).double()


def test_inference_predict_is_conv_batchnorm_relu_written_out():
    nets = _nets()
    F_ = nets.inference
    with torch.no_grad():
        F_.norms[1].weight.uniform_(0.5, 2)
        F_.norms[1].bias.uniform_(-1, 1)
    h1 = torch.randn(5, 4, 16, 16, dtype=torch.float64)
    running = F_.norms[1].running_mean.clone()
    conv = F.conv2d(h1, F_.convs[1].weight, stride=2, padding=1)
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    bn = F_.norms[1]
    by_hand = ((conv - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
    assert torch.allclose(F_.predict(2, h1), by_hand.clamp(min=0), atol=1e-12)
    assert torch.equal(F_.norms[1].running_mean, running)  # the wake passes own the running statistics
    top = F_.predict(5, torch.randn(5, 32, 2, 2, dtype=torch.float64))
    assert (top < 0).any()  # the top layer is linear, as F's h5


def test_sleep_prediction_loss_hand_value():
    nets = _nets()
    torch.manual_seed(1)
    sleep = nets.generator(torch.randn(3, 6, 1, 1, dtype=torch.float64))
    by_hand = 0.0
    for b in range(3):  # sum over layers of the mean over units, then the mean over samples
        for k in range(1, 6):
            prediction = nets.inference.predict(k, sleep[k - 1])[b]  # BatchNorm needs the whole batch
            by_hand += (prediction - sleep[k][b]).abs().mean().item() / 3
    assert losses.inference_sleep_prediction_loss(nets.inference, sleep).item() == pytest.approx(by_hand, rel=1e-12)


def _inference_grads(nets, x, seed):
    torch.manual_seed(seed)
    t = step_losses(nets, x, WAKE_SLEEP)
    return torch.autograd.grad(t.loss_rest, list(nets.inference.parameters()), allow_unused=True), t


def test_wake_sleep_inference_learns_from_sleep_states_alone():
    nets = _nets()
    assert nets.discriminator is None and "discriminator" not in nets.parts()
    assert "discriminator" not in make_optimizers(nets, ADAM)
    x = torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1
    grads, t = _inference_grads(nets, x, seed=3)
    # Another batch of images, the same dreams (z is drawn after F's noise, the same count of numbers).
    other, _ = _inference_grads(nets, -x.flip(0), seed=3)
    dreamed_again, _ = _inference_grads(nets, x, seed=4)
    convs = [i for i, p in enumerate(nets.inference.parameters()) if p.dim() == 4]
    for i in convs:
        assert grads[i].abs().sum() > 0
        assert torch.equal(grads[i], other[i])  # the wake state does not reach F's gradient
    assert any(not torch.equal(grads[i], dreamed_again[i]) for i in convs)  # the sleep state does
    assert t.state_grads is None and t.out["loss_d"] == 0 and t.out["loss_f"] > 0


def test_wake_sleep_step_moves_inference_and_generator():
    nets = _nets().float()
    before = {n: [p.detach().clone() for p in net.parameters()] for n, net in nets.parts().items()}
    opts = make_optimizers(nets, ADAM)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    torch.manual_seed(0)
    first = training_step(nets, opts, x, WAKE_SLEEP)
    for _ in range(10):
        training_step(nets, opts, x, WAKE_SLEEP)
    torch.manual_seed(0)
    last = training_step(nets, opts, x, WAKE_SLEEP)
    for n, net in nets.parts().items():
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before[n])), n
    assert last["loss_f"] < first["loss_f"]  # F learns to predict G's dreams of the same z
    assert last["loss_g"] < first["loss_g"]


def test_doubly_wake_sleep_keeps_the_readout_critic():
    nets = _nets(readout=True)
    assert set(nets.parts()) == {"inference", "generator", "readout"}
    opts = make_optimizers(nets, ADAM)
    out = training_step(nets, opts, torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1,
                        StepConfig(gamma=0.9, lamda2=7, inference_rule="wake-sleep"))
    assert out["loss_r"] != 0 and out["loss_d"] == 0


def test_adversarial_default_steps_as_the_commit_before():
    """Two steps of the doubly adversarial rule, in float64: how far each network moved (the sum of
    |change| of its parameters), as the commit before --inference-rule computed it on this CPU."""
    nets = _nets("adversarial", readout=True)
    opts = make_optimizers(nets, ADAM)
    start = {n: [p.detach().clone() for p in net.parameters()] for n, net in nets.parts().items()}
    x = torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1
    for _ in range(2):
        training_step(nets, opts, x, StepConfig(gamma=0.9, lamda=0.7, lamda2=7, kl_from_sn=True))
    moved = {n: sum((p - q).abs().sum().item() for p, q in zip(net.parameters(), start[n]))
             for n, net in nets.parts().items()}
    before = {"inference": 13.211711179439924, "generator": 2.598136521937353, "discriminator": 10.974736147464105,
              "readout": 0.0016207560448634074}
    assert moved == pytest.approx(before, rel=1e-10)


def _parse(*flags):
    parser = train.get_parser()
    args = train.parse_args(parser, list(flags))
    train.check_args(args, parser)
    return args


def test_rule_flags_refused_or_named(capsys):
    with pytest.raises(SystemExit) as e:
        _parse("--inference-rule", "bogus")
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse("--inference-rule", "wake-sleep", "--prioritized-replay", "--scale-gen-surprisal-by-D")
    err = capsys.readouterr().err
    assert "--scale-gen-surprisal-by-D and --prioritized-replay need" in err.strip().splitlines()[-1]
    note = train.unused_flags_note(_parse("--inference-rule", "wake-sleep"))
    assert "--lr-d, --lamda and --d-gradients are unused" in note and "--kl-from-sn" in note  # digits set it
    assert train.unused_flags_note(_parse()) is None


@pytest.fixture(scope="module")
def wake_sleep_run(tmp_path_factory):
    """A Wake-Sleep run of train.py on tiny MNIST, and the data."""
    base = tmp_path_factory.mktemp("wake_sleep")
    root = write_mnist(base / "data", n_train=32, n_test=40)
    out = base / "run"
    r = subprocess.run([sys.executable, "train.py", *TINY, "--dataset", "mnist", "--data", root, "--epochs", "1",
                        "-b", "16", "--kl-from-sn", "--inference-rule", "wake-sleep", "--probe-folds", "0",
                        "--seed", "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root, str(out), r


def test_a_wake_sleep_checkpoint_records_the_rule(wake_sleep_run):
    root, out, r = wake_sleep_run
    assert "--kl-from-sn (a term on wake states) is unused" in r.stderr
    state = load_checkpoint(out)
    assert state["config"]["inference_rule"] == "wake-sleep" and state["model"]["discriminator"] is False
    assert not any(k.startswith("discriminator.") for k in state["networks"])
    assert set(state["optimizers"]) == {"inference", "generator"}
    assert networks_from_checkpoint(state).discriminator is None
    with pytest.raises(CheckpointError, match="trained with --inference-rule wake-sleep; the flags say "
                                              "--inference-rule adversarial"):
        check_architecture(ModelConfig.from_dict(state["model"]), {"discriminator": True})


def test_a_checkpoint_from_before_the_rule_loads_as_adversarial(tmp_path):
    nets = Networks(ModelConfig(n_filters=4, noise_dim=8))
    model = nets.cfg.to_dict()
    del model["discriminator"]
    assert networks_from_checkpoint({"model": model, "networks": nets.state_dict()}).discriminator is not None


def _script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_evaluation_scripts_on_a_wake_sleep_checkpoint(wake_sleep_run, tmp_path):
    root, out, _ = wake_sleep_run
    r = _script("generate_and_save_imgs.py", "--path", out, "--n-images", 8, "--out", tmp_path / "samples")
    assert r.returncode == 0, r.stderr
    assert len([n for n in os.listdir(tmp_path / "samples") if n.endswith(".png")]) == 8
    r = _script("SVM_classify_from_model.py", "--path", out, "--data", root, "--n-folds", 2, "--epochs", 1)
    assert r.returncode == 0, r.stderr
    r = _script("neuromodulation.py", "--path", out)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {os.path.join(out, 'checkpoint.pth.tar')} was trained with --inference-rule wake-sleep: it has no "
        f"wake/sleep discriminator, so no neuromodulator to record"]


def test_resuming_a_wake_sleep_run_with_the_adversarial_rule_is_refused(wake_sleep_run, tmp_path):
    root, out, _ = wake_sleep_run
    r = _script("train.py", *TINY, "--dataset", "mnist", "--data", root, "--epochs", 2, "-b", 16,
                "--resume", out, "--out", tmp_path / "resumed")
    assert r.returncode != 0
    assert "trained with --inference-rule wake-sleep; the flags say --inference-rule adversarial" in r.stderr
    assert "Traceback" not in r.stderr
