"""The structural options that test why wake and sleep states do not match (docs/algorithm.md,
"Options of the architecture"): each layer against its formula written out, the matched order's
channel RMS, the default unchanged, and each option through a checkpoint."""
import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint, load_networks
from conftest import make_checkpoint
from models import ModelConfig, Networks, divisive_norm


def _nets(**options):
    torch.manual_seed(0)
    return Networks(ModelConfig(n_filters=4, noise_dim=6, divisive_normalization=True, **options))


def _rms(h):
    """Each pixel's root mean square over channels."""
    return h.pow(2).mean(dim=1).sqrt()


def test_the_matched_order_is_n_after_relu_and_every_layer_has_channel_rms_one():
    nets = _nets(norm_order="matched")
    G = nets.generator.eval()  # no noise: the layer is its formula exactly
    h3 = torch.randn(5, 16, 4, 4)
    by_hand = divisive_norm(F.relu(G.convs[2](h3)))  # h2 = N(ReLU(ConvT_3(h3)))
    assert torch.allclose(G.descend(h3, 3)[2], by_hand, atol=1e-6)
    nets.train()
    with torch.no_grad():  # untrained, G's layers are ~1e-5, where N's eps (1e-8 under the root) still shows
        for conv in nets.generator.convs:
            conv.weight.mul_(12)
        wake, sleep = nets.inference(torch.rand(8, 1, 32, 32) * 2 - 1), nets.generator(torch.randn(8, 6, 1, 1))
    for k in range(1, 5):
        for h in (wake[k], sleep[k]):
            # A pixel whose channels the ReLU all zeroed has nothing to normalize; one left with values
            # near sqrt(eps) = 1e-4 comes out a little below 1 (N's eps): every other pixel is at 1.
            rms = _rms(h)[h.abs().amax(dim=1) > 0]
            assert len(rms) > 0.8 * h[:, 0].numel() and (rms > 0.9).all() and (rms < 1 + 1e-6).all()
            assert ((rms - 1).abs() < 1e-5).float().mean() > 0.95, k
    release = _nets()
    with torch.no_grad():
        dreamed = release.generator(torch.randn(8, 6, 1, 1))
    assert _rms(dreamed[2]).mean() < 0.9  # the release's order: N before the ReLU, which removes part of it


def test_f_without_batchnorm_is_conv_with_a_bias_then_noise_relu_and_n():
    nets = _nets(inference_batchnorm=False)
    Fnet = nets.inference
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in Fnet.modules())
    assert all(c.bias is not None for c in Fnet.convs)
    Fnet.sigma.zero_()  # no noise: h1 is its formula exactly (DeReLU acts from h1 up, not on the image)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    by_hand = divisive_norm(F.relu(F.conv2d(x, Fnet.convs[0].weight, Fnet.convs[0].bias, stride=2, padding=1)))
    assert torch.allclose(Fnet(x, to_layer=1)[1], by_hand, atol=1e-6)
    h1 = torch.rand(4, 4, 16, 16)
    assert torch.allclose(Fnet.predict(2, h1), divisive_norm(F.relu(Fnet.convs[1](h1))))  # h1 > 0: no fill


def test_generator_noise_is_sigma_times_a_standard_normal_before_the_relu_and_zero_turns_it_off():
    sigma = 0.4
    G = _nets(generator_noise=sigma).generator.train()
    h3 = torch.randn(5, 16, 4, 4)
    torch.manual_seed(3)
    got = G.descend(h3, 3)[2]
    pre = divisive_norm(G.convs[2](h3))
    torch.manual_seed(3)
    by_hand = F.relu(pre + sigma * torch.randn_like(pre))  # h2 = ReLU(N(ConvT_3(h3)) + sigma * eps)
    assert torch.allclose(got, by_hand, atol=1e-6)
    assert not torch.allclose(got, F.relu(pre), atol=1e-3)
    off = _nets(generator_noise=0.0).generator
    z = torch.randn(4, 6, 1, 1)
    assert torch.equal(off.train()(z)[0], off.eval()(z)[0])  # train mode dreams as eval mode does


def test_inference_noise_is_sigma_after_batchnorm_and_zero_turns_it_off():
    for sigma in (0.0, 0.5):
        Fnet = _nets(inference_noise=sigma).inference.train()
        x = torch.rand(4, 1, 32, 32) * 2 - 1
        torch.manual_seed(5)
        got = Fnet(x, to_layer=1)[1]  # h1: no DeReLU below it, so the noise is the only randomness
        pre = Fnet.norms[0](Fnet.convs[0](x))
        torch.manual_seed(5)
        by_hand = divisive_norm(F.relu(pre + sigma * torch.randn_like(pre)))
        assert torch.allclose(got, by_hand, atol=1e-5)
        assert torch.allclose(got, divisive_norm(F.relu(pre)), atol=1e-5) == (sigma == 0)


def test_the_discriminator_width_is_its_hidden_units_per_pair():
    D = _nets(discriminator_hidden=20).discriminator
    assert [p.out_features for p in D.pairs] == [20] * 5 and D.out.in_features == 100
    states = _nets().inference(torch.rand(3, 1, 32, 32))
    assert D(states).shape == (3,)
    for bad in ({"discriminator_hidden": 0}, {"generator_noise": -0.1}, {"inference_noise": float("nan")}):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


def test_the_default_is_the_release_order_with_batchnorm_and_old_configs_load_as_it():
    new = ("norm_order", "inference_batchnorm", "inference_noise", "generator_noise", "discriminator_hidden")
    cfg = ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items()
                                 if k not in new})  # a checkpoint from before the options
    assert cfg.norm_order == "release" and cfg.inference_batchnorm
    assert (cfg.inference_noise, cfg.generator_noise, cfg.discriminator_hidden) == (0.01, 0.01, 128)
    a, b = _nets(), _nets(norm_order="release", inference_batchnorm=True)
    assert a.state_dict().keys() == b.state_dict().keys()
    a.eval()
    b.eval()
    z = torch.randn(3, 6, 1, 1)
    assert torch.equal(a.generator(z)[0], b.generator(z)[0])
    with pytest.raises(ValueError):
        ModelConfig(norm_order="sideways")


@pytest.mark.parametrize("flags, field, value", [(["--norm-order", "matched"], "norm_order", "matched"),
                                                 (["--inference-batchnorm", "False"], "inference_batchnorm", False),
                                                 (["--inference-noise", "0"], "inference_noise", 0.0),
                                                 (["--generator-noise", "0.3"], "generator_noise", 0.3),
                                                 (["--d-hidden", "16"], "discriminator_hidden", 16)])
def test_a_checkpoint_of_each_option_reloads_as_that_option(mnist_root, tmp_path, flags, field, value):
    path = make_checkpoint(tmp_path / "run", "mnist", mnist_root, *flags)
    assert load_checkpoint(path)["model"][field] == value
    _, nets = load_networks(path, "cpu")
    assert getattr(nets.cfg, field) == value
    sigmas = {"inference_noise": nets.inference.sigma, "generator_noise": nets.generator.sigma}
    if field in sigmas:  # the buffer the networks draw with, not only the recorded field
        assert float(sigmas[field]) == pytest.approx(value)
