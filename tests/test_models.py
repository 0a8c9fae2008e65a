"""Shapes, layers and schedules of the four networks (docs/algorithm.md)."""
import math

import pytest
import torch

from conftest import DEVICES
import discriminator_gradients
from models import DeReLU, ModelConfig, Networks, divisive_norm, minibatch_stddev


@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("divisive", [False, True])
def test_state_shapes(side, channels, divisive):
    cfg = ModelConfig(image_size=side, channels=channels, n_filters=4, noise_dim=6,
                      divisive_normalization=divisive, readout=True)
    nets = Networks(cfg)
    B = 3
    expected = [(B, channels, side, side), (B, 4, side // 2, side // 2), (B, 8, side // 4, side // 4),
                (B, 16, side // 8, side // 8), (B, 32, side // 16, side // 16), (B, 6, 1, 1)]
    assert cfg.state_shapes() == [e[1:] for e in expected]
    wake = nets.inference(torch.randn(B, channels, side, side))
    sleep = nets.generator(torch.randn(B, 6, 1, 1))
    assert [tuple(h.shape) for h in wake] == expected
    assert [tuple(h.shape) for h in sleep] == expected
    assert nets.discriminator(wake).shape == (B,)
    assert nets.discriminator(sleep).shape == (B,)
    assert nets.readout(wake[4]).shape == (B,)
    # Layers 1..4 of both networks are ReLU outputs; the image is a tanh.
    for h in wake[1:5] + sleep[1:5]:
        assert (h >= 0).all()
    assert sleep[0].abs().max() <= 1


def test_image_size_is_checked():
    for bad in (16, 40, 0):
        with pytest.raises(ValueError, match="multiple of 16"):
            ModelConfig(image_size=bad)


def test_divisive_norm_hand_value():
    # One pixel with channel values 3 and 4: mean square 12.5.
    h = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)
    out = divisive_norm(h)
    assert torch.allclose(out.flatten(), torch.tensor([3.0, 4.0]) / math.sqrt(12.5 + 1e-8))
    # On a 2-D tensor it normalizes each row.
    rows = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert torch.allclose(divisive_norm(rows), torch.tensor([[1.0, 1.0], [0.0, math.sqrt(2)]]), atol=1e-6)


# float64: the arithmetic to rounding; float32: the fast matrix products (oneDNN on CPUs) too.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("divisive, hidden", [(False, 128), (True, 128), (True, 20)])
def test_written_out_state_gradients_equal_double_backpropagation(divisive, hidden, dtype, device):
    """The written-out score_and_state_gradients against autograd on D.forward: scores, state gradients, their L1
    norms, and the gradients w.r.t. D's parameters of a loss of scores and norms (second order)."""
    import losses
    torch.manual_seed(0)
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=divisive,
                                discriminator_hidden=hidden)).to(device, dtype)
    D = nets.discriminator
    assert D.out.in_features == 5 * hidden
    D.sigma.fill_(0.3)  # noise on, large enough that both slopes of the LeakyReLU are in play
    x = torch.rand(5, 1, 32, 32, dtype=dtype, device=device) * 2 - 1
    states = [h.detach() for h in nets.inference(x)]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=dtype, device=device)

    def loss(scores, norms):  # unequal weights on the norms reach every row of the hand-written backward
        return (scores * weights).sum() + 0.7 * (norms * weights.flip(0)).sum()

    torch.manual_seed(1)
    leaves = [h.clone().requires_grad_(True) for h in states]
    ref_scores = D(leaves)
    ref_grads = losses.state_gradients(ref_scores, leaves)
    ref_norms = losses.l1_norms(ref_grads)
    ref_params = torch.autograd.grad(loss(ref_scores, ref_norms), list(D.parameters()))
    torch.manual_seed(1)
    scores, grads, norms = discriminator_gradients.score_and_state_gradients(D, states)
    params = torch.autograd.grad(loss(scores, norms), list(D.parameters()))

    tol = TOLERANCE[dtype]
    assert torch.allclose(scores, ref_scores, rtol=tol, atol=tol)
    assert torch.allclose(norms, ref_norms, rtol=tol, atol=0)
    for got, want in list(zip(grads, ref_grads)) + list(zip(params, ref_params)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * want.abs().max()
        assert want.abs().max() > 0


def test_minibatch_stddev_hand_value():
    # Feature 1 takes 0 and 2 (unbiased variance 2), feature 2 takes 1 and 5 (variance 8), as torch.var.
    h = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    out = minibatch_stddev(h)
    assert out.shape == (2, 3)
    assert torch.allclose(out[:, :2], h)
    expected = (math.sqrt(2 + 1e-8) + math.sqrt(8 + 1e-8)) / 2
    assert torch.allclose(out[:, 2], torch.full((2,), expected))


def test_derelu_keeps_positives_and_spreads_the_rest():
    torch.manual_seed(0)
    m = DeReLU(2, scale=0.5)
    h = torch.zeros(4000, 2, 3, 3)
    h[:, 0] = 1.5
    h[::2, 1] = -2.0  # not only zeros: every entry <= 0 is replaced
    h.requires_grad_(True)
    out = m(h)
    assert torch.equal(out[:, 0], h[:, 0])
    rest = out[:, 1]
    assert (rest < 0).all()
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.equal(grad, (h > 0).float())  # the replaced entries carry no gradient
    # -0.5 * Exponential(1): mean -0.5, std 0.5.
    assert abs(rest.mean().item() + 0.5) < 0.02
    assert abs(rest.std().item() - 0.5) < 0.02


def test_inference_samples_in_eval_mode_generator_does_not():
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6))
    nets.eval()
    x = torch.randn(5, 1, 32, 32)
    a, b = nets.inference(x), nets.inference(x)
    assert not torch.equal(a[5], b[5])  # the posterior is sampled in eval mode too
    z = torch.randn(5, 6, 1, 1)
    assert all(torch.equal(u, v) for u, v in zip(nets.generator(z), nets.generator(z)))
    nets.train()
    assert not torch.equal(nets.generator(z)[1], nets.generator(z)[1])  # noise in train mode


def test_generator_prediction_has_no_norm_and_no_noise():
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True))
    G = nets.generator
    h2 = torch.rand(3, 8, 8, 8)
    p = G.predict(2, h2)
    assert torch.equal(p, torch.relu(G.convs[1](h2)))
    assert torch.equal(G.predict(2, h2), p)  # deterministic even in train mode
    h1 = torch.rand(3, 4, 16, 16)
    assert torch.equal(G.predict(1, h1), torch.tanh(G.convs[0](h1)))


def test_noise_schedule_divides_every_noise_level_by_ten():
    nets = Networks(ModelConfig(n_filters=4, noise_dim=6))
    nets.decay_noise(10.0)
    for net in (nets.inference, nets.generator, nets.discriminator):
        assert net.sigma.item() == pytest.approx(0.001)
    for m in nets.inference.derelu[1:]:
        assert torch.allclose(m.scale, torch.full_like(m.scale, 0.05))
    # The schedule's state lives in buffers, so it travels with a checkpoint.
    fresh = Networks(ModelConfig(n_filters=4, noise_dim=6))
    fresh.load_state_dict(nets.state_dict())
    assert fresh.inference.sigma.item() == pytest.approx(0.001)


def test_initialization_and_optional_parts():
    torch.manual_seed(0)
    nets = Networks(ModelConfig(n_filters=16, noise_dim=40))
    assert nets.readout is None  # gamma = 1 builds no readout discriminator
    w = torch.cat([m.weight.flatten() for m in nets.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert abs(w.std().item() - 0.02) < 0.001
    assert all((m.bias == 0).all() for m in nets.generator.convs)
    sn = Networks(ModelConfig(n_filters=4, noise_dim=6, spectral_norm=True, readout=True))
    assert all(hasattr(c, "parametrizations") for c in sn.inference.convs)
    assert hasattr(sn.readout.linear, "parametrizations")
    assert not hasattr(sn.generator.convs[0], "parametrizations")


def test_fast_matrix_product_equals_torch_mm_for_every_layout():
    """discriminator_gradients._mm (oneDNN for float32 on CPUs) on dense, transposed and strided operands."""
    from discriminator_gradients import _mm
    torch.manual_seed(0)
    a, b, wide = torch.randn(40, 70), torch.randn(70, 30), torch.randn(40, 100)
    cases = {"dense": (a, b), "a transposed": (a.t().contiguous().t(), b), "b transposed": (a, b.t().contiguous().t()),
             "a column slice": (wide[:, 10:80], b), "float64": (a.double(), b.double())}
    for name, (x, y) in cases.items():
        got = _mm(x, y)
        assert got.dtype == x.dtype, name
        assert torch.allclose(got.double(), x.double() @ y.double(), rtol=1e-5, atol=1e-5), name
