"""The four networks of Adversarial Wake-Sleep (Benjamin & Kording 2020, arXiv:2006.10811).

A DCGAN-shaped hierarchy with six layers of state h0 (the image) .. h5 (the top):

    layer  name    shape
    h0     Input   c   x S    x S
    h1     Layer1  nf  x S/2  x S/2
    h2     Layer2  2nf x S/4  x S/4
    h3     Layer3  4nf x S/8  x S/8
    h4     Layer4  8nf x S/16 x S/16
    h5     Layer5  nz  x 1    x 1

Inference (feedforward) samples h1..h5 from an image; Generator (feedback) samples
h0..h4 from h5 = N(z); the wake/sleep Discriminator scores a whole state; the
Readout discriminator scores Inference's h4 and turns Inference into an image critic
when gamma < 1. Every network takes its sizes as constructor arguments, so
`Networks(ModelConfig(...))` is all a script or a test needs.
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NAMES = ("Input", "Layer1", "Layer2", "Layer3", "Layer4", "Layer5")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the networks; stored in every checkpoint as plain data."""
    image_size: int = 32
    channels: int = 1
    n_filters: int = 64
    noise_dim: int = 40
    divisive_normalization: bool = False
    spectral_norm: bool = False
    readout: bool = False  # a readout discriminator exists only when gamma < 1
    discriminator: bool = True  # a wake/sleep discriminator exists only under --inference-rule adversarial
    norm_order: str = "release"  # where G applies N: "release" before its noise and ReLU, "matched" after, as F
    inference_batchnorm: bool = True  # BatchNorm after each of F's convolutions (the release's)
    inference_noise: float = 0.01  # sigma of F's Gaussian noise after each BatchNorm (0: off; DeReLU stays)
    generator_noise: float = 0.01  # sigma of G's Gaussian noise on h4..h1 in train mode (0: off)
    discriminator_hidden: int = 128  # D's hidden units per adjacent pair of layers
    # how G's dreams vary around its blocks (docs/algorithm.md, "Dream noise"): "release", Gaussian sigma
    # after N and before the ReLU; "laplace", a learned per-channel Laplace scale around G's prediction;
    # "before-convt", Gaussian sigma on a block's input, so its output varies with the ConvT's structure
    dream_noise: str = "release"

    NORM_ORDERS = ("release", "matched")
    DREAM_NOISES = ("release", "laplace", "before-convt")

    def __post_init__(self):
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError(f"image size must be a multiple of 16 and at least 32, got {self.image_size}")
        if self.norm_order not in self.NORM_ORDERS:
            raise ValueError(f"norm_order must be one of {self.NORM_ORDERS}, got {self.norm_order!r}")
        if self.dream_noise not in self.DREAM_NOISES:
            raise ValueError(f"dream_noise must be one of {self.DREAM_NOISES}, got {self.dream_noise!r}")
        for name in ("channels", "n_filters", "noise_dim", "discriminator_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("inference_noise", "generator_noise"):
            if not getattr(self, name) >= 0:  # also refuses nan
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)}")
        return cls(**d)

    def state_shapes(self):
        """Shapes (without batch) of h0..h5."""
        s, nf = self.image_size, self.n_filters
        return [(self.channels, s, s), (nf, s // 2, s // 2), (2 * nf, s // 4, s // 4),
                (4 * nf, s // 8, s // 8), (8 * nf, s // 16, s // 16), (self.noise_dim, 1, 1)]


def divisive_norm(h, eps=1e-8):
    """Pixel-wise normalization over channels (ProGAN): h / sqrt(mean_c h^2 + eps). Rows of a 2-D input."""
    return h * torch.rsqrt(h.pow(2).mean(dim=1, keepdim=True) + eps)


def _centered_and_std(flat):
    """(B, J) -> (flat minus its batch mean, each feature's batch std), the variance unbiased (the
    release's torch.var)."""
    # The variance written out: torch.var over the batch axis is several times slower on CPUs.
    centered = flat - flat.mean(dim=0, keepdim=True)
    return centered, torch.sqrt(centered.pow(2).sum(dim=0).div_(flat.size(0) - 1) + 1e-8)


def minibatch_stddev(h):
    """(B, ...) -> (B, F+1): flatten and append the mean over features of the batch std (ProGAN)."""
    flat = h.flatten(1)
    std = _centered_and_std(flat)[1].mean()
    return torch.cat([flat, std.expand(flat.size(0), 1)], dim=1)


def _add_noise(h, sigma):
    # sigma is a 0-d buffer; multiplying keeps it on the device (no host sync). The noise is drawn
    # in float32 whatever h is, so bf16 autocast (--amp) draws the same numbers as float32.
    return torch.addcmul(h, torch.randn_like(h, dtype=torch.float32), sigma)  # one pass; h + noise * sigma takes two


def laplace_like(h):
    """Standard Laplace noise (density exp(-|e|) / 2) shaped like h: the difference of two Exponential(1)."""
    return torch.empty_like(h, dtype=torch.float32).exponential_() - torch.empty_like(h, dtype=torch.float32).exponential_()


class DeReLU(nn.Module):
    """Entries > 0 pass; the others are replaced by -scale * Exponential(1), scale per channel.

    The inference network's inputs (after ReLU) are mostly exact zeros; this makes them
    a sample of a continuous density again, which the wake/sleep discriminator needs to
    compare with the generator's states (docs/algorithm.md, 'DeReLU')."""

    def __init__(self, channels, scale=0.5):
        super().__init__()
        self.register_buffer("scale", torch.full((channels,), float(scale)))

    def forward(self, h):
        # -scale * E with E ~ Exponential(1) drawn by inversion, E = -log(1 - U): the same law as
        # exponential_() (and log() rather than log1p()), several times faster on CPUs.
        fill = torch.rand_like(h, dtype=torch.float32).neg_().add_(1).log_().mul_(self.scale.view(1, -1, 1, 1))
        # where(h > 0, h, fill) in arithmetic, exact for finite h: CPUs run torch.where several times
        # slower than a multiply. Its gradient is the same mask.
        keep = (h > 0).to(h.dtype)
        return torch.addcmul(fill.mul_(1 - keep), h, keep)


class Inference(nn.Module):
    """F: image -> [x, h1, .., h5]. A posterior sampler: its noise is on in eval mode too."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.divisive_normalization = cfg.divisive_normalization
        widths = [s[0] for s in cfg.state_shapes()]
        self.derelu = nn.ModuleList([nn.Identity()] + [DeReLU(widths[k]) for k in range(1, 5)])
        convs = []
        for k in range(1, 6):
            kernel, stride, pad = (cfg.image_size // 16, 1, 0) if k == 5 else (4, 2, 1)
            # a bias only where no BatchNorm follows (BatchNorm's own shift makes one redundant)
            conv = nn.Conv2d(widths[k - 1], widths[k], kernel, stride, pad, bias=not cfg.inference_batchnorm)
            if cfg.spectral_norm:
                conv = nn.utils.parametrizations.spectral_norm(conv)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList([nn.BatchNorm2d(w) if cfg.inference_batchnorm else nn.Identity()
                                    for w in widths[1:]])
        self.register_buffer("sigma", torch.tensor(float(cfg.inference_noise)))

    def forward(self, x, to_layer=5):
        states = [x]
        h = x
        for k in range(1, to_layer + 1):
            h = self.norms[k - 1](self.convs[k - 1](self.derelu[k - 1](h)))
            h = _add_noise(h, self.sigma)
            if k < 5:
                h = F.relu(h)
            if self.divisive_normalization:
                h = divisive_norm(h)
            states.append(h)  # (B, nf * 2^(k-1), S / 2^k, S / 2^k); h5: (B, nz, 1, 1)
        return states

    def predict(self, k, h):
        """N(b_k(BN_k(Conv_k(DeReLU_k(h))))): F's wake computation of hk from h(k-1) less its output
        noise, the location of F's conditional (classic Wake-Sleep's sleep-phase term, docs/algorithm.md).
        The DeReLU draws its fill as at wake, because F must learn on the inputs it is run on: a dreamed
        layer has exact zeros (G's ReLU) that the wake pass always fills. The output noise sigma is the
        spread around that location and is left out, as G.predict leaves out G's. b_k: ReLU below the
        top, linear at h5; N where --divisive-normalization. BatchNorm normalizes by this batch's own
        statistics, as in F's training passes, but leaves the running statistics to the wake passes
        that evaluation reads."""
        bn, out = self.norms[k - 1], self.convs[k - 1](self.derelu[k - 1](h))
        if isinstance(bn, nn.BatchNorm2d):
            out = F.batch_norm(out, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        if k < 5:
            out = F.relu(out)
        return divisive_norm(out) if self.divisive_normalization else out


class Generator(nn.Module):
    """G: z -> [h0, .., h5], top-down. `predict(k, h)` is G's noiseless guess of h(k-1) from hk."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.divisive_normalization = cfg.divisive_normalization
        self.norm_after_relu = cfg.norm_order == "matched"
        widths = [s[0] for s in cfg.state_shapes()]
        convs = []
        for k in range(1, 6):
            kernel, stride, pad = (cfg.image_size // 16, 1, 0) if k == 5 else (4, 2, 1)
            convs.append(nn.ConvTranspose2d(widths[k], widths[k - 1], kernel, stride, pad))
        self.convs = nn.ModuleList(convs)  # convs[k-1] maps hk -> h(k-1)
        self.register_buffer("sigma", torch.tensor(float(cfg.generator_noise)))
        self.dream_noise = cfg.dream_noise
        # log b of layers h1..h4, per channel (log_scales[k-2] for the output of block k = 2..5), learned by
        # maximum likelihood on wake states (losses.laplace_scale_loss); b = 1 is about an untrained G's residual
        self.log_scales = nn.ParameterList([nn.Parameter(torch.zeros(w)) for w in widths[1:5]]
                                           if cfg.dream_noise == "laplace" else [])

    def _norm(self, h):
        return divisive_norm(h) if self.divisive_normalization else h

    def predict(self, k, h):
        """a_k(ConvT_k(hk)): tanh onto the image, ReLU above; no N and no noise (docs/algorithm.md,
        G's prediction loss)."""
        out = self.convs[k - 1](h)
        return torch.tanh(out) if k == 1 else F.relu(out)

    def forward(self, z):
        return self.descend(self._norm(z), 5)  # h0 (B, c, S, S) .. h5 = N(z) (B, nz, 1, 1)

    def descend(self, h, from_layer):
        """G's top-down path from a state hk of layer k = from_layer: [h0, .., hk], hk as given.

        Each block as in forward (N, noise in train mode only, ReLU; tanh onto the image), so an
        inferred hk can be carried down to an image (inference_metrics.reconstructions)."""
        states = [h]
        for k in range(from_layer, 0, -1):
            h = self.block(k, h)
            states.append(h)
        return states[::-1]

    def block(self, k, h):
        """G's block k: h(k-1) from hk, as G dreams it (its noise in train mode only)."""
        if self.dream_noise == "laplace":
            return self._laplace_block(k, h)
        if self.dream_noise == "before-convt" and k < 5 and self.training:
            h = _add_noise(h, self.sigma)  # h5 = N(z) is itself the noise of the top block
        h = self.convs[k - 1](h)
        if k == 1:
            return torch.tanh(h)
        # release: N, noise, ReLU (channel RMS below 1 after the ReLU); matched: noise, ReLU, N, the
        # order of F's layers, so that wake and sleep layers both have channel RMS 1
        if not self.norm_after_relu:
            h = self._norm(h)
        if self.training and self.dream_noise == "release":
            h = _add_noise(h, self.sigma)
        h = F.relu(h)
        return self._norm(h) if self.norm_after_relu else h

    def _laplace_block(self, k, h):
        """max(0, mu + b * e), mu = predict(k, hk), e standard Laplace per entry: a draw from the Laplace
        density that G's prediction loss fits, with its learned per-channel scale b, kept at or above 0
        where wake states are (their ReLU). No N: the loss fits mu to wake states, N included."""
        mu = self.predict(k, h)
        if k == 1 or not self.training:
            return mu
        b = self.log_scales[k - 2].exp().view(1, -1, 1, 1)
        return F.relu(torch.addcmul(mu, laplace_like(mu), b))


class Discriminator(nn.Module):
    """D: a whole state [h0, .., h5] -> (B,) score, high for wake, low for sleep.

    One Linear per adjacent pair of layers (each layer flattened + minibatch std), `hidden` units
    each (640 in all by default), noise, LeakyReLU, row-wise N, Linear to one score."""

    slope = 0.01  # of the LeakyReLU

    def __init__(self, cfg: ModelConfig, sigma=0.01):
        super().__init__()
        hidden = cfg.discriminator_hidden
        self.widths = [c * h * w for c, h, w in cfg.state_shapes()]  # features of each layer, before the std
        self.pairs = nn.ModuleList([nn.Linear(self.widths[l] + self.widths[l + 1] + 2, hidden) for l in range(5)])
        self.out = nn.Linear(5 * hidden, 1)
        self.divisive_normalization = cfg.divisive_normalization
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, states):
        return self._head(self.hidden(states))[0]

    def hidden(self, states):
        """The 5 x 128 hidden pre-activations, before the noise: (B, 640)."""
        feats = [minibatch_stddev(h) for h in states]
        return torch.cat([pair(torch.cat([feats[l], feats[l + 1]], dim=1)) for l, pair in enumerate(self.pairs)], dim=1)

    def _head(self, hidden):
        a = _add_noise(hidden, self.sigma)
        r = F.leaky_relu(a, self.slope)
        n = divisive_norm(r) if self.divisive_normalization else r
        return self.out(n).squeeze(1), a, r


class Readout(nn.Module):
    """R: Inference's h4 -> (B,) image-critic score (used only when gamma < 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, h, w = cfg.state_shapes()[4]
        self.linear = nn.Linear(c * h * w + 1, 1)
        if cfg.spectral_norm:
            self.linear = nn.utils.parametrizations.spectral_norm(self.linear)

    def forward(self, h4):
        return self.linear(minibatch_stddev(h4)).squeeze(1)


def init_weights(module):
    """DCGAN initialization: conv and linear weights ~ N(0, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            # Under spectral norm the trainable tensor is parametrizations.weight.original.
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Networks(nn.Module):
    """The four networks as one module, so one `.to(device)` and one state_dict cover them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.inference = Inference(cfg)
        self.generator = Generator(cfg)
        self.discriminator = Discriminator(cfg) if cfg.discriminator else None
        self.readout = Readout(cfg) if cfg.readout else None
        init_weights(self)

    def parts(self):
        """name -> network, for the networks that exist (readout only when gamma < 1, the
        discriminator only under the adversarial rule)."""
        names = ("inference", "generator", "discriminator", "readout")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @torch.no_grad()
    def decay_noise(self, factor=10.0):
        """The paper's 'lr-decay' schedule: divide every noise level and DeReLU scale by factor (the
        learned Laplace scales of --dream-noise laplace are fit to the wake states, not scheduled)."""
        for net in (self.inference, self.generator, self.discriminator):
            if net is not None:
                net.sigma /= factor
        for m in self.inference.derelu:
            if isinstance(m, DeReLU):
                m.scale /= factor

