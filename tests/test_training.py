"""The training step against a plain term-by-term evaluation of docs/algorithm.md, and the training loop."""
import contextlib
import copy
import csv
import dataclasses
import os
import shlex

import pytest
import torch

import discriminator_gradients
import losses
import models
import step
import train
from conftest import DEVICES, TINY, write_cifar10, write_mnist
from data import make_batches
from losses import StepConfig
from models import ModelConfig, Networks
from step import NonFiniteError, check_d_gradients, make_optimizers, statistics_kept, training_step
from utils import isolated_rng


def _quiet_nets(readout, seed=0, dtype=torch.float32):
    """Tiny networks with all sampling noise off, so two evaluations of a pass agree exactly."""
    torch.manual_seed(seed)
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, readout=readout)).to(dtype)
    for net in (nets.inference, nets.generator, nets.discriminator):
        net.sigma.zero_()
    for m in nets.inference.derelu[1:]:
        m.scale.zero_()
    return nets


def _params(net):
    return list(net.parameters())


class Reference:
    """The losses of docs/algorithm.md, each from its own forward passes of the networks as they are when it is
    called: the batch's wake state W, the noise z and the sleep state S are drawn once."""

    def __init__(self, nets, x, hp, seed):
        self.nets, self.x, self.hp = nets, x, hp
        F, G, D = nets.inference, nets.generator, nets.discriminator
        B = x.size(0)
        if seed is not None:
            torch.manual_seed(seed)
        self.W = F(x)
        self.z = torch.randn(B, nets.cfg.noise_dim, 1, 1, dtype=x.dtype, device=x.device)
        if hp.prioritized_replay:
            self.z[:B // 2] = self.W[5].detach()[D(_sg(self.W)).detach().argsort()[:B // 2]]
        self.S = G(self.z)
        # --scale-gen-surprisal-by-D weighs G's terms by the D that scored the wake state, before it stepped.
        self.surprise = 2 * torch.sigmoid(-D(_sg(self.W)).detach())

    def P1(self, states):
        D = self.nets.discriminator
        return losses.l1_gradient_penalty(losses.l1_norms(losses.state_gradients(D(states), states)))

    def L_D(self):
        D, g, hp = self.nets.discriminator, self.hp.gamma, self.hp
        d_w, d_s = D(_sg(self.W)), D(_sg(self.S))
        L_D = g * (-d_w.mean() + d_s.mean() + hp.lamda * self.P1(_sg(self.S)) + hp.lamda * self.P1(_sg(self.W)))
        if hp.scale_by_d:
            L_D = L_D + (d_s.mean() + d_w.mean()).abs()
        return L_D

    def L_F(self):
        L_F = self.hp.gamma * self.nets.discriminator(self.W).mean()
        if self.hp.kl_from_sn:
            L_F = L_F + 1e-4 * losses.kl_from_standard_normal(self.W[5])
        return L_F

    def critic(self, u):
        return self.nets.readout(self.nets.inference(u, to_layer=4)[4])

    def L_R(self):
        if self.nets.readout is None:
            return self.x.new_zeros(())

        def P2(u):
            u = u.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.critic(u).sum(), u, create_graph=True)
            return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

        x, fake = self.x, self.S[0].detach()
        return (1 - self.hp.gamma) * (-self.critic(x).mean() + self.critic(fake).mean()
                                      + self.hp.lamda2 * (P2(x) + P2(fake)))

    def L_G(self):
        G, W = self.nets.generator, self.W
        per_sample = 0
        for k in range(1, 6):
            a = torch.tanh if k == 1 else torch.relu
            per_sample = per_sample + (a(G.convs[k - 1](W[k].detach())) - W[k - 1].detach()).abs().flatten(1).mean(1)
        if self.hp.scale_by_d:
            per_sample = per_sample * self.surprise
        L_G = self.hp.gamma * per_sample.mean()
        if self.nets.readout is not None:
            L_G = L_G - (1 - self.hp.gamma) * self.critic(self.S[0]).mean()
        return L_G


def _sg(states):
    return [h.detach().requires_grad_(True) for h in states]


def _grads(loss, net):
    return [gr if gr is not None else torch.zeros_like(p)
            for gr, p in zip(torch.autograd.grad(loss, _params(net), retain_graph=True, allow_unused=True),
                             _params(net))]


def reference_gradients(nets, x, hp, seed):
    """Every network's gradient, each taken alone, all at the same parameter values."""
    ref = Reference(nets, x, hp, seed)
    L_D, L_F, L_G, L_R = ref.L_D(), ref.L_F(), ref.L_G(), ref.L_R()
    F, G, D, R = nets.inference, nets.generator, nets.discriminator, nets.readout
    out = {"discriminator": _grads(L_D, D), "inference": _grads(L_F + L_R, F), "generator": _grads(L_G, G)}
    if R is not None:
        out["readout"] = _grads(L_R, R)
    return out, {"loss_d": L_D, "loss_f": L_F, "loss_g": L_G, "loss_r": L_R}


@torch.no_grad()
def _descend(net, grads, lr):
    for p, g in zip(_params(net), grads):
        p -= lr * g


def reference_alternating_step(nets, x, hp, seed, lr):
    """The release's order, term by term, with plain gradient descent: D steps; F's gradient is
    then taken with the stepped D, and F and R step; G's, with the stepped F and R, and G steps."""
    ref = Reference(nets, x, hp, seed)
    F, G, D, R = nets.inference, nets.generator, nets.discriminator, nets.readout
    _descend(D, _grads(ref.L_D(), D), lr)
    L_R = ref.L_R()
    grads_f = _grads(ref.L_F() + L_R, F)
    if R is not None:
        _descend(R, _grads(L_R, R), lr)
    _descend(F, grads_f, lr)
    _descend(G, _grads(ref.L_G(), G), lr)


def fast_gradients(nets, x, hp, seed):
    # lr = 0: Adam leaves the parameters alone and the gradients stay in .grad.
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=0.0) for name, net in nets.parts().items()}
    torch.manual_seed(seed)
    out = training_step(nets, optimizers, x, hp)
    grads = {name: [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
             for name, net in nets.parts().items()}
    return grads, out


SETTINGS = {
    "paper-mnist": StepConfig(gamma=1.0, lamda=0.9, kl_from_sn=True, gradient_clipping=0),
    "doubly-adversarial": StepConfig(gamma=0.9, lamda=0.7, lamda2=7, kl_from_sn=True, gradient_clipping=0),
    "scaled-replayed": StepConfig(gamma=0.6, scale_by_d=True, prioritized_replay=True, gradient_clipping=0),
    "wgan": StepConfig(gamma=0.0, gradient_clipping=0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SETTINGS))
def test_fast_step_equals_term_by_term_losses_and_gradients(name, device):
    hp = SETTINGS[name]
    # In float64 the two orders of summation agree to ~1e-12, so a real difference cannot hide.
    nets = _quiet_nets(readout=hp.gamma < 1, dtype=torch.float64).to(device)
    x = torch.rand(6, 1, 32, 32, dtype=torch.float64, device=device) * 2 - 1
    ref_grads, ref_losses = reference_gradients(copy.deepcopy(nets), x, hp, seed=3)
    fast_grads, fast_out = fast_gradients(copy.deepcopy(nets), x, hp, seed=3)
    for k, v in ref_losses.items():
        assert fast_out[k].item() == pytest.approx(v.item(), rel=1e-9, abs=1e-12), k
    assert set(fast_grads) == set(ref_grads)
    for net_name in ref_grads:
        for a, b in zip(fast_grads[net_name], ref_grads[net_name]):
            # Relative to the tensor's largest entry: D's state gradients are summed in another order
            # (written out rather than double-backpropagated), which moves near-zero entries by ~1e-10.
            assert (a - b).abs().max() <= 1e-9 * b.abs().max() + 1e-12, net_name
        total = sum(t.abs().sum() for t in ref_grads[net_name])
        if hp.gamma == 0 and net_name == "discriminator":
            assert total == 0  # gamma = 0 leaves only the WGAN terms
        else:
            assert total > 0, net_name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["paper-mnist", "doubly-adversarial", "scaled-replayed"])
def test_each_order_of_updates_equals_its_term_by_term_step(name, device):
    """One step with a learning rate, so the order matters: alternating against the release's order
    written out (D steps, F follows the stepped D, G the stepped F and R), simultaneous against
    every gradient at the starting weights."""
    lr = 0.1
    nets = _quiet_nets(readout=SETTINGS[name].gamma < 1, dtype=torch.float64).to(device)
    x = torch.rand(6, 1, 32, 32, dtype=torch.float64, device=device) * 2 - 1
    after = {}
    for order in ("alternating", "simultaneous"):
        hp = dataclasses.replace(SETTINGS[name], update_order=order)
        ref = copy.deepcopy(nets)
        if order == "alternating":
            reference_alternating_step(ref, x, hp, seed=3, lr=lr)
        else:
            for net_name, grads in reference_gradients(ref, x, hp, seed=3)[0].items():
                _descend(ref.parts()[net_name], grads, lr)
        fast = copy.deepcopy(nets)
        optimizers = {n: torch.optim.SGD(net.parameters(), lr=lr) for n, net in fast.parts().items()}
        torch.manual_seed(3)
        training_step(fast, optimizers, x, hp)
        for net_name in ref.parts():
            for a, b in zip(fast.parts()[net_name].parameters(), ref.parts()[net_name].parameters()):
                assert (a - b).abs().max() <= 1e-9 * b.abs().max() + 1e-12, (order, net_name)
        after[order] = fast
    # The orders differ where a network follows a moved critic: F (after D) and, with a readout, G.
    followers = ["inference"] + (["generator"] if nets.readout is not None else [])
    for net_name in followers:
        gap = max((a - b).abs().max().item() for a, b in zip(after["alternating"].parts()[net_name].parameters(),
                                                            after["simultaneous"].parts()[net_name].parameters()))
        assert gap > 1e-6, net_name


def test_gradients_reach_only_their_own_networks():
    nets = _quiet_nets(readout=False)
    hp = SETTINGS["paper-mnist"]
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    # L_D's gradient never reaches F or G, and L_G's never reaches F or D (they see sg W, sg S).
    F, G, D = nets.inference, nets.generator, nets.discriminator
    W = F(x)
    S = G(torch.randn(6, 6, 1, 1))
    sgW = [h.detach().requires_grad_(True) for h in W]
    sgS = [h.detach().requires_grad_(True) for h in S]
    d_w, d_s = D(sgW), D(sgS)
    penalty = [losses.l1_gradient_penalty(losses.l1_norms(losses.state_gradients(d, states)))
               for d, states in ((d_w, sgW), (d_s, sgS))]
    L_D = losses.discriminator_loss(d_w, d_s, *penalty, 1.0, hp.lamda)
    L_G = losses.generator_prediction_loss(G, W)
    for loss, foreign in ((L_D, _params(F) + _params(G)), (L_G, _params(F) + _params(D))):
        assert all(g is None for g in torch.autograd.grad(loss, foreign, retain_graph=True, allow_unused=True))


def test_gamma_one_builds_no_readout_and_gamma_below_one_does():
    args = train.get_parser().parse_args([])
    assert train.model_config(args).readout is False
    args = train.get_parser().parse_args(["--gamma", "0.9"])
    assert train.model_config(args).readout is True
    assert "readout" in make_optimizers(Networks(train.model_config(args)), args)


def test_gradient_clipping_bounds_d_and_f_only():
    nets = _quiet_nets(readout=False)
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=0.0) for name, net in nets.parts().items()}
    hp = StepConfig(gamma=1.0, lamda=0.9, gradient_clipping=1e-3)
    training_step(nets, optimizers, torch.rand(6, 1, 32, 32) * 2 - 1, hp)
    for name in ("discriminator", "inference"):
        assert max(p.grad.abs().max().item() for p in nets.parts()[name].parameters()) <= 1e-3 * (1 + 1e-5)
    assert max(p.grad.abs().max().item() for p in nets.generator.parameters()) > 1e-3


def test_a_short_run_learns():
    """On tiny data: D separates wake from sleep early on; G's prediction loss falls."""
    from conftest import class_images
    torch.manual_seed(0)
    labels = torch.arange(64) % 10
    data = torch.from_numpy(class_images(labels.numpy(), 32, 1, seed=0)).float() / 127.5 - 1
    nets = Networks(ModelConfig(n_filters=8, noise_dim=8, divisive_normalization=True))
    args = train.get_parser().parse_args(["--lr-d", "1e-3", "--lr-e", "1e-3", "--lr-g", "1e-3"])
    optimizers = make_optimizers(nets, args)
    hp = StepConfig(gamma=1.0, lamda=0.3)
    history = []
    for _ in range(60):
        idx = torch.randperm(64)[:32]
        out = training_step(nets, optimizers, data[idx], hp)
        history.append({k: v.item() for k, v in out.items()})
    gap = [h["d_wake"] - h["d_sleep"] for h in history[2:12]]
    assert sum(gap) / len(gap) > 0.1, gap
    first = sum(h["loss_g"] for h in history[:5]) / 5
    last = sum(h["loss_g"] for h in history[-5:]) / 5
    assert last < 0.8 * first, (first, last)


def _run(argv):
    assert train.main(argv) == 0


def _read_metrics(folder):
    with open(os.path.join(folder, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_checkpoint_loads_with_weights_only_and_resume_matches_uninterrupted(tmp_path, mnist_root):
    # --device cpu: compared to the bit, which CUDA's autotuned kernels and atomic additions do not promise.
    common = TINY + ["--dataset", "mnist", "--data", mnist_root, "-b", "16", "--seed", "5", "--probe-folds", "0",
                     "--gamma", "0.9", "--lr-decay", "1", "--device", "cpu"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run(common + ["--epochs", "2", "--out", str(straight)])
    _run(common + ["--epochs", "1", "--out", str(split)])
    _run(common + ["--epochs", "2", "--out", str(split), "--resume", str(split / "checkpoint.pth.tar")])

    a = torch.load(straight / "checkpoint.pth.tar", weights_only=True)
    b = torch.load(split / "checkpoint.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert set(a["networks"]) == set(b["networks"])
    assert any(k.startswith("readout.") for k in a["networks"])  # the readout is saved and resumed
    for k in a["networks"]:
        assert torch.equal(a["networks"][k], b["networks"][k]), k
    for name in a["optimizers"]:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["history"][1]["loss_g"] == b["history"][1]["loss_g"]
    assert a["history"][1]["sigma"] == pytest.approx(0.001)  # the noise schedule resumed too
    assert len(_read_metrics(split)) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_run_on_cuda_resumes_and_its_checkpoint_loads_without_a_gpu(tmp_path, mnist_root):
    from checkpoint import networks_from_checkpoint
    common = TINY + ["--dataset", "mnist", "--data", mnist_root, "-b", "16", "--seed", "5", "--probe-folds", "2",
                     "--gamma", "0.9", "--device", "cuda", "--out", str(tmp_path)]
    _run(common + ["--epochs", "1"])
    _run(common + ["--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth.tar")])
    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)  # no map_location
    assert state["epoch"] == 2 and len(_read_metrics(tmp_path)) == 2
    on = {t.device.type for t in state["networks"].values()}
    on |= {t.device.type for opt in state["optimizers"].values() for s in opt["state"].values() for t in s.values()}
    assert on == {"cpu"}
    nets = networks_from_checkpoint(state)
    wake = nets.inference(torch.rand(4, 1, 32, 32) * 2 - 1)
    assert all(torch.isfinite(h).all() for h in wake)


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """Enough images for the paper's batch sizes (256 and 128)."""
    root = tmp_path_factory.mktemp("paper")
    write_mnist(root, n_train=260, n_test=30)
    write_cifar10(root, n_per_batch=26, n_test=30)
    return str(root)


def _release_command_lines():
    path = os.path.join(os.path.dirname(__file__), "release_command_lines.txt")
    with open(path) as f:
        return [line.strip() for line in f if line.startswith("python train.py")]


@pytest.mark.parametrize("command", _release_command_lines(), ids=["mnist", "doubly-mnist", "cifar10"])
def test_release_command_lines_run(command, paper_data, tmp_path):
    argv = shlex.split(command.replace("[PATH-TO-MNIST]", paper_data).replace("[PATH-TO-CIFAR10]", paper_data))[2:]
    epochs = argv.index("--epochs")
    argv[epochs + 1] = "1"
    _run(argv + ["--out", str(tmp_path)])
    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 1
    assert set(state["probe"]) == {"Input", "Layer1", "Layer2", "Layer3", "Layer4", "Layer5"}
    assert len(_read_metrics(tmp_path)) == 1
    assert (tmp_path / "gen_images" / "imgs_epoch1.png").stat().st_size > 0


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for line in _release_command_lines():
        for flag in (t for t in shlex.split(line) if t.startswith("-")):
            assert flag in text, flag


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divisive", [False, True])
def test_amp_bf16_stays_finite_and_close_to_float32(divisive, device):
    """--amp: bf16 autocast of the forward passes; over a few steps the losses track float32's.

    Noise is drawn in float32 either way, so both runs sample the same states. With divisive
    normalization the readout's input-gradient penalty is dominated by a few nearly silent
    pixels, whose normalization amplifies any rounding (in float32 too), so there loss_r is
    only required to be finite."""
    from conftest import class_images
    data = torch.from_numpy(class_images((torch.arange(32) % 10).numpy(), 32, 1, seed=1)).float() / 127.5 - 1
    data = data.to(device)
    hp = StepConfig(gamma=0.9, lamda=0.7, lamda2=7, kl_from_sn=True)
    runs = {}
    for amp in (False, True):
        torch.manual_seed(0)
        nets = Networks(ModelConfig(n_filters=8, noise_dim=8, divisive_normalization=divisive,
                                    readout=True)).to(device)
        optimizers = make_optimizers(nets, train.get_parser().parse_args([]))
        runs[amp] = [training_step(nets, optimizers, data, dataclasses.replace(hp, amp=amp)) for _ in range(4)]
        assert all(p.dtype == torch.float32 for p in nets.parameters())
    compared = ["loss_d", "loss_f", "loss_g", "d_wake", "d_sleep"] + ([] if divisive else ["loss_r"])
    for fp32, bf16 in zip(runs[False], runs[True]):
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in bf16.values())
        for k in compared:
            assert abs(bf16[k].item() - fp32[k].item()) <= 0.05 * abs(fp32[k].item()) + 0.02, k


def test_quality_rows_survive_a_resume_and_more_epochs_on_a_finished_run_probe_again(tmp_path, mnist_root, capsys):
    common = TINY + ["--dataset", "mnist", "--data", mnist_root, "-b", "16", "--seed", "3", "--probe-folds", "2",
                     "--gamma", "0.9", "--device", "cpu", "--out", str(tmp_path), "--quality-every", "2"]
    _run(common + ["--epochs", "3"])
    rows = _read_metrics(tmp_path)
    assert [r["fd"] != "" for r in rows] == [False, True, True]  # every 2nd epoch, and the last
    assert all(float(r["fd"]) > 0 and 0 < float(r["confidence"]) <= 1 for r in rows[1:])
    first = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert first["probe"] is not None
    capsys.readouterr()
    _run(common + ["--epochs", "4", "--resume", str(tmp_path)])
    assert "linear decoding accuracy per layer" in capsys.readouterr().out  # probed again, after epoch 4
    again = _read_metrics(tmp_path)
    assert [r["fd"] for r in again[:3]] == [r["fd"] for r in rows] and again[3]["fd"] != ""
    second = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert second["epoch"] == 4
    assert second["probe"] is not None  # a probe of the new weights, not a stale one dropped


def test_a_non_finite_generator_phase_names_the_critics_that_stepped(monkeypatch):
    """Alternating order: a NaN that appears only in G's fresh pass through the stepped critics is
    refused before G steps, and the error says that D, R and F had already stepped."""
    nets = _quiet_nets(readout=True)
    optimizers = {n: torch.optim.SGD(net.parameters(), lr=0.1) for n, net in nets.parts().items()}
    in_generator_phase = []
    real = statistics_kept

    @contextlib.contextmanager
    def flagged(module):
        in_generator_phase.append(True)
        with real(module):
            yield

    monkeypatch.setattr(step, "statistics_kept", flagged)
    nets.readout.register_forward_hook(lambda m, i, out: out * float("nan") if in_generator_phase else out)
    before = copy.deepcopy(nets)
    hp = dataclasses.replace(SETTINGS["doubly-adversarial"], update_order="alternating")
    with pytest.raises(NonFiniteError) as e:
        training_step(nets, optimizers, torch.rand(6, 1, 32, 32) * 2 - 1, hp)
    assert e.value.terms == ["gradient of generator"]
    assert e.value.stepped == ["discriminator", "readout", "inference"]
    for name in ("generator", "discriminator"):
        pairs = zip(nets.parts()[name].parameters(), before.parts()[name].parameters())
        assert all(torch.equal(a, b) for a, b in pairs) == (name == "generator"), name


@pytest.mark.parametrize("order", ["alternating", "simultaneous"])
@pytest.mark.parametrize("name", ["paper-mnist", "doubly-adversarial"])
def test_the_plain_autograd_path_trains_as_the_written_out_one(name, order):
    """--d-gradients autograd (double backward through Discriminator.forward, for a D of one's own)
    against the written-out default: three steps with a learning rate, in float64."""
    nets = _quiet_nets(readout=SETTINGS[name].gamma < 1, dtype=torch.float64)
    x = torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1
    after = {}
    for path in ("written-out", "autograd"):
        hp = dataclasses.replace(SETTINGS[name], update_order=order, d_gradients=path)
        run = copy.deepcopy(nets)
        optimizers = {n: torch.optim.SGD(net.parameters(), lr=0.1) for n, net in run.parts().items()}
        torch.manual_seed(3)
        for _ in range(3):
            training_step(run, optimizers, x, hp)
        after[path] = run
    for net_name in nets.parts():
        for a, b in zip(after["autograd"].parts()[net_name].parameters(),
                        after["written-out"].parts()[net_name].parameters()):
            # Round-off of two orders of summation (~1e-12 a step), grown by three steps through BatchNorm
            # and the L1 terms to ~1e-8; any real difference between the paths is orders larger.
            assert (a - b).abs().max() <= 1e-6 * b.abs().max() + 1e-12, net_name
    moved = max((a - b).abs().max().item() for a, b in zip(after["autograd"].discriminator.parameters(),
                                                          nets.discriminator.parameters()))
    assert moved > 1e-4  # the steps did something for the two paths to agree on


def _head_with_slope(slope):
    """Discriminator._head as a researcher might edit it: another LeakyReLU slope, written inline."""
    def head(self, hidden):
        a = models._add_noise(hidden, self.sigma)
        r = torch.nn.functional.leaky_relu(a, slope)
        n = models.divisive_norm(r) if self.divisive_normalization else r
        return self.out(n).squeeze(1), a, r
    return head


def test_the_written_out_d_gradients_check_themselves_against_discriminator_forward(monkeypatch):
    """The unedited D passes the start-of-run check and keeps the fast path; a D edited in its
    forward pass (another LeakyReLU slope) fails it, and the step falls back to autograd, saying so."""
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True))
    shapes = nets.cfg.state_shapes()
    hp = StepConfig(gamma=0.9)
    said = []
    assert discriminator_gradients.agrees_with_autograd(nets.discriminator, shapes)
    assert check_d_gradients(nets, hp, say=lambda *a, **k: said.append(a)) is hp and not said

    monkeypatch.setattr(models.Discriminator, "_head", _head_with_slope(0.2))
    assert not discriminator_gradients.agrees_with_autograd(nets.discriminator, shapes)
    checked = check_d_gradients(nets, hp, say=lambda *a, **k: said.append(a))
    assert checked.d_gradients == "autograd" and checked.gamma == hp.gamma
    assert len(said) == 1 and "--d-gradients autograd" in said[0][0]
    # --d-gradients autograd, given, is left alone; gamma 0 never scores a state.
    for given in (dataclasses.replace(hp, d_gradients="autograd"), StepConfig(gamma=0.0)):
        assert check_d_gradients(nets, given, say=lambda *a, **k: said.append(a)) is given
    assert len(said) == 1


def test_the_check_leaves_the_random_stream_alone():
    """It draws its own numbers: a run's noise, and so exact resume, are as without it."""
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6))
    torch.manual_seed(7)
    discriminator_gradients.agrees_with_autograd(nets.discriminator, nets.cfg.state_shapes())
    after_check = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_check, torch.rand(3))


def test_classes_trains_on_those_labels_only_and_the_checkpoint_records_them(mnist_root, tmp_path, monkeypatch):
    for train_split in (True, False):
        every = make_batches("mnist", mnist_root, 32, 8, "cpu", train=train_split)
        some = make_batches("mnist", mnist_root, 32, 8, "cpu", train=train_split, classes=[0, 1])
        seen = torch.cat([y for _, y in some])
        assert set(seen.tolist()) == {0, 1} and len(seen) == int((every.labels < 2).sum())
    made = []
    monkeypatch.setattr(train, "make_batches", lambda *a, **k: made.append(make_batches(*a, **k)) or made[-1])
    _run(TINY + ["--dataset", "mnist", "--data", mnist_root, "--classes", "0", "1", "-b", "4", "--epochs", "1",
                 "--probe-folds", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert made and all(set(b.labels.tolist()) == {0, 1} for b in made)
    assert torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["config"]["classes"] == [0, 1]


def test_isolated_rng_draws_its_seeds_numbers_and_leaves_the_callers_stream_alone():
    torch.manual_seed(7)
    with isolated_rng(3):
        inside = torch.rand(3)
    after = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(inside, torch.rand(3))
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def test_a_run_with_an_edited_discriminator_trains_with_autograd(monkeypatch, capsys, tmp_path):
    """End to end: train.py says in one line that D was edited and trains it with the plain path."""
    monkeypatch.setattr(models.Discriminator, "_head", _head_with_slope(0.2))
    used = []
    real = losses.score_and_state_gradients

    def recording(*args, **kwargs):
        used.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "score_and_state_gradients", recording)
    _run(TINY + ["--epochs", "1", "-b", "300", "--probe-folds", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("Discriminator.forward") == 1 and "training with --d-gradients autograd" in err
    assert used  # the autograd path scored the states
