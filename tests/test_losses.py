"""Each loss term of the training step (docs/algorithm.md) against hand-computed values."""
import math

import pytest
import torch

import losses


def test_discriminator_loss_hand_value():
    d_wake, d_sleep = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    # gamma [ -2 + (-0.5) + 0.5 * (0.25 + 4) ] = 0.5 * (-0.375)
    got = losses.discriminator_loss(d_wake, d_sleep, torch.tensor(4.0), torch.tensor(0.25), gamma=0.5, lamda=0.5)
    assert got.item() == pytest.approx(0.5 * (-2 - 0.5 + 0.5 * 4.25))
    assert losses.centering_loss(d_wake, d_sleep).item() == pytest.approx(abs(2 - 0.5))


def test_inference_and_generator_readout_terms():
    d = torch.tensor([1.0, -2.0, 4.0])
    assert losses.inference_adversarial_loss(d, 0.9).item() == pytest.approx(0.9 * 1.0)
    assert losses.generator_readout_loss(d, 0.9).item() == pytest.approx(-0.1 * 1.0)
    r_real, r_fake = torch.tensor([2.0, 4.0]), torch.tensor([-1.0, 1.0])
    got = losses.readout_critic_loss(r_real, r_fake, torch.tensor(0.5), torch.tensor(1.5), gamma=0.75, lamda2=10)
    assert got.item() == pytest.approx(0.25 * (-3 + 0 + 10 * 2.0))


def test_l1_penalty_hand_value_for_a_linear_critic():
    # D(s) = sum_l <w_l, s_l> per sample: the gradient at every sample is w itself,
    # so P1 = sum_l ||w_l||_1 - 1 whatever the samples are.
    torch.manual_seed(0)
    w = [torch.randn(3, 4), torch.randn(5)]
    s = [torch.randn(6, 3, 4, requires_grad=True), torch.randn(6, 5, requires_grad=True)]
    scores = (s[0] * w[0]).flatten(1).sum(1) + s[1] @ w[1]
    grads = losses.state_gradients(scores, s)
    expected = w[0].abs().sum() + w[1].abs().sum() - 1
    assert losses.l1_gradient_penalty(losses.l1_norms(grads)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_l2_penalty_hand_value_for_a_linear_critic():
    w = torch.tensor([3.0, 4.0])  # ||w|| = 5
    u = torch.randn(7, 2, requires_grad=True)
    (g,) = losses.state_gradients(u @ w, [u])
    assert losses.l2_gradient_penalty(g).item() == pytest.approx(16.0)


def _per_sample_jacobian_norms(fn, inputs, p):
    """Direct autograd: the gradient of sum_b fn(inputs)_b for each sample, norms taken one sample at a time."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    grads = torch.autograd.grad(fn(inputs).sum(), inputs)
    B = inputs[0].shape[0]
    out = []
    for b in range(B):
        v = torch.cat([g[b].flatten() for g in grads])
        out.append(v.abs().sum() if p == 1 else v.pow(2).sum().sqrt())
    return torch.stack(out)


def test_penalties_match_direct_autograd_on_the_real_networks():
    from models import ModelConfig, Networks
    torch.manual_seed(1)
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, readout=True))
    nets.discriminator.sigma.zero_()  # deterministic, so two evaluations agree
    for m in nets.inference.derelu[1:]:
        m.scale.zero_()
    nets.inference.sigma.zero_()
    states = [h.detach() for h in nets.generator(torch.randn(5, 6, 1, 1))]

    leaves = [h.clone().requires_grad_(True) for h in states]
    p1 = losses.l1_gradient_penalty(losses.l1_norms(losses.state_gradients(nets.discriminator(leaves), leaves)))
    norms = _per_sample_jacobian_norms(nets.discriminator, states, p=1)
    assert p1.item() == pytest.approx((norms - 1).mean().item(), rel=1e-5)

    x = torch.rand(5, 1, 32, 32) * 2 - 1
    critic = lambda u: nets.readout(nets.inference(u[0], to_layer=4)[4])  # noqa: E731
    leaf = x.clone().requires_grad_(True)
    p2 = losses.l2_gradient_penalty(losses.state_gradients(critic([leaf]), [leaf])[0])
    norms = _per_sample_jacobian_norms(critic, [x], p=2)
    assert p2.item() == pytest.approx(((norms - 1) ** 2).mean().item(), rel=1e-5)

    # The penalties are differentiable in the critic's parameters (double back-propagation).
    (gw,) = torch.autograd.grad(p1, nets.discriminator.out.weight)
    assert gw.abs().sum() > 0


def test_kl_matches_closed_form_and_torch_distributions():
    torch.manual_seed(0)
    h5 = (torch.randn(64, 5) * torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0]) + torch.tensor([0.0, 1.0, -1.0, 2.0, 0.0]))
    mu, var = h5.mean(0), h5.var(0, unbiased=True)
    closed = sum(0.5 * (v + m * m - 1 - math.log(v)) for m, v in zip(mu.tolist(), var.tolist()))
    got = losses.kl_from_standard_normal(h5.view(64, 5, 1, 1))
    assert got.item() == pytest.approx(closed, rel=1e-5)
    dist = torch.distributions
    reference = dist.kl_divergence(dist.Normal(mu, var.sqrt()), dist.Normal(0.0, 1.0)).sum()
    assert got.item() == pytest.approx(reference.item(), rel=1e-4)
    # Zero for a batch whose mean is 0 and unbiased variance 1.
    z = torch.tensor([[-1.0], [1.0]]) / math.sqrt(2)  # unbiased variance (1/2 + 1/2) / 1
    assert losses.kl_from_standard_normal(z).item() == pytest.approx(0.0, abs=1e-6)


class _ZeroPredictor:
    """A stand-in generator whose every prediction is 0, so the loss is sum_k mean |W_(k-1)|."""

    def predict(self, k, h):
        return torch.zeros_like(self.targets[k - 1])


def test_generator_prediction_loss_hand_value():
    g = _ZeroPredictor()
    wake = [torch.tensor([[1.0, -3.0], [2.0, 2.0]])] + [torch.full((2, 1), float(k)) for k in range(1, 6)]
    g.targets = wake
    # k = 1: mean(|1|, |-3|, |2|, |2|) = 2; k = 2..5: means 1, 2, 3, 4.
    assert losses.generator_prediction_loss(g, wake).item() == pytest.approx(2 + 1 + 2 + 3 + 4)
    # Per-sample weights: sample 0's terms are 2 + 10, sample 1's are 2 + 10; weigh them 0.5 and 1.5.
    weights = torch.tensor([0.5, 1.5])
    expected = (0.5 * (2 + 10) + 1.5 * (2 + 10)) / 2
    assert losses.generator_prediction_loss(g, wake, weights).item() == pytest.approx(expected)


def test_surprisal_weights():
    w = losses.surprisal_weights(torch.tensor([0.0, 50.0, -50.0]))
    assert torch.allclose(w, torch.tensor([1.0, 0.0, 2.0]), atol=1e-6)
