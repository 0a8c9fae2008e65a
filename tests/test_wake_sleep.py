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

WAKE_SLEEP = StepConfig(gamma=1.0, lamda=0.9, inference_rule="wake-sleep")  # the pure rule: no KL term
ADAM = argparse.Namespace(lr_e=8e-4, lr_g=2e-4, lr_d=1e-5, lr_rd=1e-5, beta1=0.0, beta2=0.9, wd=0.0)


def _nets(rule="wake-sleep", readout=False, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, readout=readout,
                      discriminator=rule == "adversarial")
    return Networks(cfg).double()


def _wake_block_by_hand(F_, k, h):
    """F's wake block k written out, its output noise left out: DeReLU (k > 1; -0.5 E, E = -log(1 - U),
    in float32 as the DeReLU draws and computes it), Conv_k, BatchNorm by this batch's statistics,
    ReLU below the top, divisive normalization over channels."""
    if k > 1:
        fill = -0.5 * -torch.log(1 - torch.rand(h.shape, dtype=torch.float32))
        h = torch.where(h > 0, h, fill.to(h.dtype))
    conv = F_.convs[k - 1]
    stride, pad = (1, 0) if k == 5 else (2, 1)
    out = F.conv2d(h, conv.weight, stride=stride, padding=pad)
    mean = out.mean(dim=(0, 2, 3), keepdim=True)
    var = ((out - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    bn = F_.norms[k - 1]
    out = (out - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    if k < 5:
        out = out.clamp(min=0)
    return out / torch.sqrt((out ** 2).mean(dim=1, keepdim=True) + 1e-8)


def _dreamed_with_a_trained_looking_batchnorm(seed=1):
    nets = _nets()
    with torch.no_grad():
        for bn in nets.inference.norms:
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    torch.manual_seed(seed)
    sleep = nets.generator(torch.randn(5, 6, 1, 1, dtype=torch.float64))
    return nets, sleep


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_inference_predict_is_the_wake_block_without_its_output_noise(k):
    nets, sleep = _dreamed_with_a_trained_looking_batchnorm()
    F_ = nets.inference
    assert k == 1 or (sleep[k - 1] == 0).any()  # dreamed layers have exact zeros, which the DeReLU fills
    running = F_.norms[k - 1].running_mean.clone()
    torch.manual_seed(7)
    by_hand = _wake_block_by_hand(F_, k, sleep[k - 1])
    torch.manual_seed(7)
    assert torch.allclose(F_.predict(k, sleep[k - 1]), by_hand, atol=1e-12)
    assert torch.equal(F_.norms[k - 1].running_mean, running)  # the wake passes own the running statistics
    if k == 5:
        assert (by_hand < 0).any()  # the top layer is linear, as F's h5


def test_sleep_prediction_loss_hand_value():
    nets, sleep = _dreamed_with_a_trained_looking_batchnorm()
    torch.manual_seed(3)
    loss = losses.inference_sleep_prediction_loss(nets.inference, sleep).item()
    torch.manual_seed(3)  # the DeReLU's fill drawn in the same order, k = 1 .. 5
    per_layer = [(_wake_block_by_hand(nets.inference, k, sleep[k - 1]) - sleep[k]).abs() for k in range(1, 6)]
    by_hand = 0.0
    for b in range(5):  # sum over layers of the mean over units, then the mean over samples
        by_hand += sum(e[b].mean().item() for e in per_layer) / 5
    assert loss == pytest.approx(by_hand, rel=1e-12)


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


@pytest.mark.parametrize("rule", ["adversarial", "wake-sleep"])
def test_the_kl_term_acts_in_both_rules(rule):
    """--kl-from-sn adds 1e-4 KL(N(mu, var) || N(0, 1)) of the wake h5's batch statistics to F's loss,
    under either rule; its gradient is autograd's of that term through F's wake pass."""
    nets = _nets(rule)
    x = torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1
    hp = StepConfig(gamma=1.0, lamda=0.9, inference_rule=rule)
    torch.manual_seed(5)
    without = step_losses(nets, x, hp)
    torch.manual_seed(5)
    with_kl = step_losses(nets, x, StepConfig(gamma=1.0, lamda=0.9, inference_rule=rule, kl_from_sn=True))
    h5 = with_kl.wake[5].flatten(1)
    mu, var = h5.mean(dim=0), h5.var(dim=0)
    kl_by_hand = 1e-4 * 0.5 * (var + mu ** 2 - 1 - torch.log(var)).sum()
    assert (with_kl.loss_rest - without.loss_rest).item() == pytest.approx(kl_by_hand.item(), rel=1e-9)
    params = [p for p in nets.inference.parameters() if p.dim() == 4]
    extra = torch.autograd.grad(with_kl.loss_rest - without.loss_rest, params, retain_graph=True)
    expected = torch.autograd.grad(kl_by_hand, params)
    for a, b in zip(extra, expected):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-14)


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


def test_doubly_wake_sleep_trains_the_readout_critic_and_f_on_it():
    """--inference-rule wake-sleep with gamma < 1: one step's gradients against autograd of the terms
    written out here (docs/algorithm.md), the passes redone with the step's random draws. R's gradient is
    that of L_R = (1 - gamma) [-mean R(F4(x)) + mean R(F4(sg G0(z))) + lamda2 (P2(x) + P2(sg G0(z)))],
    P2(u) = mean_b (||d sum R(F4(u)) / du_b||_2 - 1)^2; F's is that of gamma L_F,sleep + L_R; and R steps
    on its gradient (Adam's first step with beta1 = 0: lr g / (|g| + eps))."""
    import copy
    gamma, lamda2, B = 0.9, 7.0, 6
    nets = _nets(readout=True)
    assert set(nets.parts()) == {"inference", "generator", "readout"}
    x = torch.rand(B, 1, 32, 32, dtype=torch.float64) * 2 - 1
    twin = copy.deepcopy(nets)  # the weights before the step
    opts = make_optimizers(nets, ADAM)
    torch.manual_seed(11)
    out = training_step(nets, opts, x, StepConfig(gamma=gamma, lamda2=lamda2, inference_rule="wake-sleep",
                                                  gradient_clipping=0))  # F's gradient as it is
    assert out["loss_d"] == 0

    # The step's passes, in the order of its random draws: F's wake pass, z, G's dream, F's sleep-phase
    # predictions (the DeReLU's fill), F's pass of G's image.
    F_, G, R = twin.inference, twin.generator, twin.readout
    torch.manual_seed(11)
    u = x.clone().requires_grad_(True)
    wake = F_(u)
    sleep = G(torch.randn(B, 6, 1, 1, dtype=torch.float64))
    sleep_term = losses.inference_sleep_prediction_loss(F_, sleep)
    fake = sleep[0].detach().requires_grad_(True)
    r_real, r_fake = R(wake[4]), R(F_(fake, to_layer=4)[4])

    def p2(score, inputs):
        (g,) = torch.autograd.grad(score.sum(), inputs, create_graph=True)
        return ((g ** 2).flatten(1).sum(dim=1).sqrt() - 1).pow(2).mean()

    loss_r = (1 - gamma) * (-r_real.mean() + r_fake.mean() + lamda2 * (p2(r_real, u) + p2(r_fake, fake)))
    assert out["loss_r"].item() == pytest.approx(loss_r.item(), rel=1e-10)

    r_grads = torch.autograd.grad(loss_r, list(R.parameters()), retain_graph=True)
    f_params = list(F_.parameters())
    f_readout = torch.autograd.grad(loss_r, f_params, retain_graph=True, allow_unused=True)  # R reads h4, not h5
    f_sleep = torch.autograd.grad(gamma * sleep_term, f_params)
    for p, g in zip(nets.readout.parameters(), r_grads):
        assert p.grad is not None and torch.allclose(p.grad, g, rtol=1e-8, atol=1e-14)
    for p, a, b in zip(nets.inference.parameters(), f_readout, f_sleep):
        assert p.grad is not None and torch.allclose(p.grad, b if a is None else a + b, rtol=1e-8, atol=1e-14)
    # the readout's part of F's gradient is not lost in the sleep term's, in F's four lower convolutions
    convs = [i for i, p in enumerate(f_params) if p.dim() == 4]
    assert [f_readout[i] is None for i in convs] == [False, False, False, False, True]
    assert all(f_readout[i].norm() > 1e-3 * f_sleep[i].norm() for i in convs[:4])

    for after, before, g in zip(nets.readout.parameters(), R.parameters(), r_grads):
        assert torch.allclose(after, before - ADAM.lr_rd * g / (g.abs() + 1e-8), rtol=0, atol=1e-15)
    assert not torch.equal(nets.readout.linear.weight, R.linear.weight)
    assert nets.readout.linear.bias.grad.abs().max() < 1e-12  # a shift of R cancels in -mean R(real) + mean R(fake)


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
    assert "--lr-d, --lamda, --d-penalty and --d-gradients are unused" in note and "--kl-from-sn" not in note  # it acts
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
