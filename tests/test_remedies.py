"""The remedies for the wake/sleep mismatch (docs/algorithm.md, "Dream noise" and "D's penalty"):
each layer against its formula written out with the same seeded noise, the learned Laplace scale's
gradient against autograd and its recovery of a known scale, the two-sided penalty by hand, and
each option through a checkpoint and a training step."""
import pytest
import torch
import torch.nn.functional as F

import losses
import train
from checkpoint import load_networks
from conftest import make_checkpoint
from models import ModelConfig, Networks, divisive_norm
from step import make_optimizers, training_step


def _nets(**options):
    torch.manual_seed(0)
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, **options))
    with torch.no_grad():  # untrained, G's layers are ~1e-5: spread them so that the ReLU and N both act
        for conv in nets.generator.convs:
            conv.weight.mul_(12)
    return nets


def test_laplace_dreams_are_relu_of_the_prediction_plus_b_times_the_difference_of_two_exponentials():
    G = _nets(dream_noise="laplace").generator.train()
    with torch.no_grad():
        for log_b in G.log_scales:
            log_b.copy_(torch.linspace(-2, 0.5, len(log_b)))
        h3 = torch.randn(5, 16, 4, 4)
        torch.manual_seed(7)
        got = G.block(3, h3)
        torch.manual_seed(7)
        e1 = torch.empty(5, 8, 8, 8).exponential_()
        e2 = torch.empty(5, 8, 8, 8).exponential_()
        b = torch.linspace(-2, 0.5, 8).exp().view(1, -1, 1, 1)
        by_hand = F.relu(F.relu(G.convs[2](h3)) + b * (e1 - e2))  # max(0, mu + b e), mu = ReLU(ConvT_3(h3)), no N
    assert torch.allclose(got, by_hand, atol=1e-6)
    G.eval()
    with torch.no_grad():
        assert torch.equal(G.block(3, h3), G.predict(3, h3))  # no noise out of training: the location itself
        h1 = torch.rand(5, 4, 16, 16)
        torch.manual_seed(1)
        G.train()
        assert torch.equal(G.block(1, h1), torch.tanh(G.convs[0](h1)))  # the image, noiseless as the release's


def test_a_standard_laplace_draw_has_mean_absolute_value_one_and_variance_two():
    from models import laplace_like
    torch.manual_seed(0)
    e = laplace_like(torch.empty(400_000))
    assert e.abs().mean().item() == pytest.approx(1.0, abs=0.01)
    assert e.var().item() == pytest.approx(2.0, abs=0.03)
    assert abs(e.mean().item()) < 0.01


def test_before_convt_noise_enters_each_block_s_input_below_the_top_and_the_output_is_noiseless():
    nets = _nets(dream_noise="before-convt", generator_noise=0.3)
    G = nets.generator.train()
    with torch.no_grad():
        h3 = torch.randn(5, 16, 4, 4)
        torch.manual_seed(3)
        got = G.block(3, h3)
        torch.manual_seed(3)
        by_hand = F.relu(divisive_norm(G.convs[2](h3 + 0.3 * torch.randn(5, 16, 4, 4))))  # ReLU(N(ConvT(h3 + s e)))
        assert torch.allclose(got, by_hand, atol=1e-6)
        h5 = divisive_norm(torch.randn(5, 6, 1, 1))
        assert torch.equal(G.block(5, h5), G.block(5, h5))  # the top block's input is the noise: none added
        h1 = torch.rand(5, 4, 16, 16)
        torch.manual_seed(4)
        image = G.block(1, h1)
        torch.manual_seed(4)
        assert torch.allclose(image, torch.tanh(G.convs[0](h1 + 0.3 * torch.randn(5, 4, 16, 16))), atol=1e-6)
        G.eval()
        assert torch.equal(G.block(3, h3), F.relu(divisive_norm(G.convs[2](h3))))


def test_the_laplace_scale_loss_by_hand_and_its_gradient_against_autograd_of_the_written_out_nll():
    nets = _nets(dream_noise="laplace")
    G = nets.generator
    with torch.no_grad():
        wake = nets.inference(torch.rand(6, 1, 32, 32) * 2 - 1)
        for log_b in G.log_scales:
            log_b.copy_(torch.randn(len(log_b)) * 0.5)
    loss = losses.laplace_scale_loss(G, wake)
    grads = torch.autograd.grad(loss, list(G.log_scales))
    total = 0.0
    for k in range(2, 6):
        with torch.no_grad():
            r = (F.relu(G.convs[k - 1](wake[k])) - wake[k - 1]).abs().double()  # |W_{k-1} - mu_k|
        log_b = G.log_scales[k - 2].detach().double().view(1, -1, 1, 1)
        total += (r / log_b.exp() + log_b).mean().item()
        # d/d log b_c of the mean over all entries: mean over channel c's entries of (1 - |r| / b_c), over C
        by_hand = (1 - r / log_b.exp()).mean(dim=(0, 2, 3)) / r.size(1)
        assert torch.allclose(grads[k - 2].double(), by_hand, rtol=1e-4, atol=1e-6), k
    assert loss.item() == pytest.approx(total, rel=1e-6)
    conv_grads = torch.autograd.grad(losses.laplace_scale_loss(G, wake), list(G.convs.parameters()), allow_unused=True)
    assert all(g is None for g in conv_grads)  # it reaches the scales alone


def test_the_learned_scale_recovers_a_known_laplace_scale_within_10_percent():
    nets = _nets(dream_noise="laplace")
    G = nets.generator
    torch.manual_seed(0)
    true_b = [torch.linspace(0.05, 0.8, len(s)) for s in G.log_scales]
    widths = [1, 4, 8, 16, 32, 6]
    sides = [32, 16, 8, 4, 2, 1]
    with torch.no_grad():
        wake = [None] * 6
        wake[5] = torch.randn(256, 6, 1, 1)
        wake[4] = torch.rand(256, 32, 2, 2)
        for k in range(5, 1, -1):  # each wake layer h1..h4 = G's prediction + Laplace noise of the known scale
            mu = G.predict(k, wake[k]) if k < 5 else G.predict(5, wake[5])
            wake[k - 1] = mu + true_b[k - 2].view(1, -1, 1, 1) * torch.distributions.Laplace(0.0, 1.0).sample(mu.shape)
        wake[0] = torch.zeros(256, 1, 32, 32)
    assert [w.shape[1] for w in wake] == widths and [w.shape[-1] for w in wake] == sides
    opt = torch.optim.Adam(list(G.log_scales), lr=0.05)
    for step in range(300):
        if step == 250:  # Adam's steps of ~lr keep log b within ~lr of its optimum: a smaller lr to end
            opt.param_groups[0]["lr"] = 0.005
        opt.zero_grad()
        losses.laplace_scale_loss(G, wake).backward()
        opt.step()
    for log_b, b in zip(G.log_scales, true_b):
        assert torch.allclose(log_b.detach().exp(), b, rtol=0.1), (log_b.exp(), b)


def test_the_two_sided_penalty_by_hand_and_the_l2_norm_of_the_whole_state():
    g = [torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.tensor([[4.0], [0.5]])]
    norms = losses.l2_norms(g)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert losses.two_sided_gradient_penalty(norms).item() == pytest.approx(((5 - 1) ** 2 + (0.5 - 1) ** 2) / 2)
    assert losses.l1_gradient_penalty(losses.l1_norms(g)).item() == pytest.approx(((7 - 1) + (0.5 - 1)) / 2)


def test_d_loss_under_the_two_sided_penalty_against_autograd_of_the_written_out_loss():
    nets = _nets()
    D = nets.discriminator
    D.sigma.zero_()  # D's noise off: the two passes are the same function
    hp = losses.StepConfig(gamma=0.9, lamda=0.7, d_penalty="two-sided-l2")
    torch.manual_seed(2)
    states = [torch.randn(4, *s) for s in nets.cfg.state_shapes()]
    score, grads, norms = losses.d_terms(D, states, hp)
    leaves = [h.clone().requires_grad_(True) for h in states]
    (by_autograd,) = [torch.autograd.grad(D(leaves).sum(), leaves, create_graph=True)]
    l2 = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in by_autograd))
    assert torch.allclose(norms, l2, rtol=1e-5)
    d_params = list(D.parameters())
    got = torch.autograd.grad(((norms - 1) ** 2).mean(), d_params, allow_unused=True)
    want = torch.autograd.grad(((l2 - 1) ** 2).mean(), d_params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("flags", [["--dream-noise", "laplace"], ["--dream-noise", "before-convt", "--generator-noise", "0.2"],
                                   ["--d-penalty", "two-sided-l2"]])
def test_each_remedy_trains_a_finite_step_and_its_checkpoint_reloads_as_it(mnist_root, tmp_path, flags):
    path = make_checkpoint(tmp_path / "run", "mnist", mnist_root, *flags, "--gamma", "0.9")
    _, nets = load_networks(path, "cpu")
    args = train.get_parser().parse_args(["--dataset", "mnist", "--data", mnist_root, *flags, "--gamma", "0.9"])
    assert nets.cfg.dream_noise == args.dream_noise
    assert len(nets.generator.log_scales) == (4 if args.dream_noise == "laplace" else 0)
    optimizers = make_optimizers(nets, args)
    before = [p.detach().clone() for p in nets.generator.log_scales]
    nets.train()
    out = training_step(nets, optimizers, torch.rand(8, 1, 32, 32) * 2 - 1, losses.StepConfig.from_args(args))
    assert all(torch.isfinite(v) for v in out.values())
    if before:  # the scales step at their own rate: log b moves by about lr-scale in Adam's first step
        assert optimizers["generator"].param_groups[1]["lr"] == 1e-2
        moved = torch.cat([(p.detach() - b).abs() for p, b in zip(nets.generator.log_scales, before)])
        assert moved.max().item() == pytest.approx(1e-2, rel=0.05)


def test_an_unknown_remedy_is_refused_and_a_remedy_flag_on_a_checkpoint_made_without_it_is_named(
        mnist_root, tmp_path, capsys):
    with pytest.raises(ValueError, match="dream_noise must be one of"):
        ModelConfig(dream_noise="pink")
    with pytest.raises(SystemExit):
        train.get_parser().parse_args(["--dream-noise", "pink"])
    assert "invalid choice: 'pink'" in capsys.readouterr().err
    path = make_checkpoint(tmp_path / "run", "mnist", mnist_root)
    argv = ["--n-filters", "4", "--noise-dim", "8", "--dataset", "mnist", "--data", mnist_root, "-b", "8",
            "--epochs", "2", "--probe-folds", "0", "--out", str(tmp_path / "more"), "--resume", path,
            "--dream-noise", "laplace", "--device", "cpu"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "trained with --dream-noise release; the flags say --dream-noise laplace" in lines[0]


def test_an_old_checkpoint_config_loads_with_the_release_s_dream_noise():
    cfg = ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "dream_noise"})
    assert cfg.dream_noise == "release"
    assert len(Networks(cfg).generator.log_scales) == 0
