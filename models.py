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
import platform
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

    def __post_init__(self):
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError(f"image size must be a multiple of 16 and at least 32, got {self.image_size}")
        for name in ("channels", "n_filters", "noise_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

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
    """(B, J) -> (flat minus its batch mean, each feature's batch std), the variance biased."""
    # The variance written out: torch.var over the batch axis is several times slower on CPUs.
    centered = flat - flat.mean(dim=0, keepdim=True)
    return centered, torch.sqrt(centered.pow(2).mean(dim=0) + 1e-8)


def minibatch_stddev(h):
    """(B, ...) -> (B, F+1): flatten and append the mean over features of the batch std (ProGAN)."""
    flat = h.flatten(1)
    std = _centered_and_std(flat)[1].mean()
    return torch.cat([flat, std.expand(flat.size(0), 1)], dim=1)


def _std_and_its_gradient(flat):
    """The minibatch-std feature of (B, J) features and its gradient d std / d flat, (B, J)."""
    centered, std = _centered_and_std(flat)
    return std.mean(), centered.div_(std * (flat.size(0) * flat.size(1)))


def _add_noise(h, sigma):
    # sigma is a 0-d buffer; multiplying keeps it on the device (no host sync). The noise is drawn
    # in float32 whatever h is, so bf16 autocast (--amp) draws the same numbers as float32.
    return torch.addcmul(h, torch.randn_like(h, dtype=torch.float32), sigma)  # one pass; h + noise * sigma takes two


class DeReLU(nn.Module):
    """Entries > 0 pass; the others are replaced by -scale * Exponential(1), scale per channel.

    The inference network's inputs (after ReLU) are mostly exact zeros; this makes them
    a sample of a continuous density again, which the wake/sleep discriminator needs to
    compare with the generator's states (SPEC: 'DeReLU')."""

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

    def __init__(self, cfg: ModelConfig, sigma=0.01):
        super().__init__()
        self.divisive_normalization = cfg.divisive_normalization
        widths = [s[0] for s in cfg.state_shapes()]
        self.derelu = nn.ModuleList([nn.Identity()] + [DeReLU(widths[k]) for k in range(1, 5)])
        convs = []
        for k in range(1, 6):
            kernel, stride, pad = (cfg.image_size // 16, 1, 0) if k == 5 else (4, 2, 1)
            conv = nn.Conv2d(widths[k - 1], widths[k], kernel, stride, pad, bias=False)
            if cfg.spectral_norm:
                conv = nn.utils.parametrizations.spectral_norm(conv)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList([nn.BatchNorm2d(w) for w in widths[1:]])
        self.register_buffer("sigma", torch.tensor(float(sigma)))

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


class Generator(nn.Module):
    """G: z -> [h0, .., h5], top-down. `predict(k, h)` is G's noiseless guess of h(k-1) from hk."""

    def __init__(self, cfg: ModelConfig, sigma=0.01):
        super().__init__()
        self.divisive_normalization = cfg.divisive_normalization
        widths = [s[0] for s in cfg.state_shapes()]
        convs = []
        for k in range(1, 6):
            kernel, stride, pad = (cfg.image_size // 16, 1, 0) if k == 5 else (4, 2, 1)
            convs.append(nn.ConvTranspose2d(widths[k], widths[k - 1], kernel, stride, pad))
        self.convs = nn.ModuleList(convs)  # convs[k-1] maps hk -> h(k-1)
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def _norm(self, h):
        return divisive_norm(h) if self.divisive_normalization else h

    def predict(self, k, h):
        """a_k(ConvT_k(hk)): tanh onto the image, ReLU above; no N and no noise (SPEC, L_G)."""
        out = self.convs[k - 1](h)
        return torch.tanh(out) if k == 1 else F.relu(out)

    def forward(self, z):
        h = self._norm(z)
        states = [h]
        for k in range(5, 0, -1):
            h = self.convs[k - 1](h)
            if k > 1:
                h = self._norm(h)
                if self.training:
                    h = _add_noise(h, self.sigma)
                h = F.relu(h)
            else:
                h = torch.tanh(h)
            states.append(h)
        return states[::-1]  # h0 (B, c, S, S) .. h5 (B, nz, 1, 1)


class Discriminator(nn.Module):
    """D: a whole state [h0, .., h5] -> (B,) score, high for wake, low for sleep.

    One Linear per adjacent pair of layers (each layer flattened + minibatch std),
    640 hidden units in all, noise, LeakyReLU, row-wise N, Linear to one score."""

    slope = 0.01  # of the LeakyReLU

    def __init__(self, cfg: ModelConfig, hidden=128, sigma=0.01):
        super().__init__()
        self.widths = [c * h * w for c, h, w in cfg.state_shapes()]  # features of each layer, before the std
        self.pairs = nn.ModuleList([nn.Linear(self.widths[l] + self.widths[l + 1] + 2, hidden) for l in range(5)])
        self.out = nn.Linear(5 * hidden, 1)
        self.divisive_normalization = cfg.divisive_normalization
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, states):
        feats = [minibatch_stddev(h) for h in states]
        hidden = torch.cat([pair(torch.cat([feats[l], feats[l + 1]], dim=1))
                            for l, pair in enumerate(self.pairs)], dim=1)  # (B, 640)
        return self._head(hidden)[0]

    def _head(self, hidden):
        a = _add_noise(hidden, self.sigma)
        r = F.leaky_relu(a, self.slope)
        n = divisive_norm(r) if self.divisive_normalization else r
        return self.out(n).squeeze(1), a, r

    def score_and_state_gradients(self, states):
        """D's score of states that are data (not functions of parameters), its gradient w.r.t. them,
        and that gradient's L1 norm per sample: (score (B,), [d sum_b score_b / d h_l], norms (B,)).

        score and norms carry the same gradients w.r.t. D's parameters as D(states) and the L1 norm of
        autograd.grad(D(states).sum(), states, create_graph=True) would; the state gradients are
        detached values. Written out, so that one first-order backward pass does the work of
        autograd's double backward in a fraction of its passes over the big (B, features) tensors
        (the hot spot of a training step)."""
        B = states[0].size(0)
        with torch.no_grad():
            flats = [h.reshape(B, -1).contiguous() for h in states]
            stds, slopes = zip(*(_std_and_its_gradient(f) for f in flats))
        blocks_and_std_weights = _LayerBlocks.apply(tuple(self.widths), *(p.weight for p in self.pairs))
        hidden = _PairLayers.apply(flats, stds, *blocks_and_std_weights, *(p.bias for p in self.pairs))
        score, a, r = self._head(hidden)

        # d score / d hidden, row by row: back through N (its row-wise Jacobian), then the LeakyReLU.
        v = self.out.weight  # (1, 640)
        if self.divisive_normalization:
            rho = torch.rsqrt(r.pow(2).mean(dim=1, keepdim=True) + 1e-8)
            g = rho * v - r * (rho.pow(3) * (r * v).mean(dim=1, keepdim=True))
        else:
            g = v.expand_as(r)
        g = g * torch.where(a > 0, 1.0, self.slope).to(g.dtype)

        norms, *grads = _StateGradientL1.apply(g, slopes, *blocks_and_std_weights)
        return score, [gr.view_as(h) for gr, h in zip(grads, states)], norms


def _autocast_dtype(device_type):
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast(device_type, dtype):
    """The forward pass's autocast state again, for a hand-written backward (which runs outside it)."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _onednn_matmul_available():
    # Measured on x86-64 only (tests/benchmark.py); elsewhere torch.mm's own BLAS is kept.
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_matmul_available()


def _dense_or_transposed(t):
    return t.is_contiguous() or t.t().is_contiguous()


def _mm(a, b):
    """a @ b for 2-D tensors.

    Float32 products on the CPU go to oneDNN's matmul (the one PyTorch's compiler uses), which
    runs D's products about twice as fast as the default BLAS on AMD CPUs (tests/benchmark.py).
    It wants each operand dense or the transpose of a dense tensor: other strides take it
    thousands of times longer, so those, other dtypes, autocast and GPUs use torch.mm."""
    if (_ONEDNN and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and _dense_or_transposed(a) and _dense_or_transposed(b)):
        return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
    return a @ b


def _readers(l, n_layers):
    """The pairs that read layer l, in the order of their rows in layer l's block: pair l-1, then pair l."""
    return ([l - 1] if l > 0 else []) + ([l] if l < n_layers - 1 else [])


def _columns(q, l, widths):
    """First column of layer l's features in pair q's weight ([flat q, std q, flat q+1, std q+1])."""
    return 0 if l == q else widths[q] + 1


class _LayerBlocks(torch.autograd.Function):
    """D's pair weights regrouped by layer: for each layer l, the dense (rows, features) block of the
    columns that read its features (pair l-1's rows, then pair l's) and the same rows' weights on
    its minibatch-std feature. The same numbers as the pairs' own; the products on a layer's
    features then become one dense product each instead of two on strided column slices."""

    @staticmethod
    def forward(ctx, widths, *weights):
        n_layers = len(widths)
        blocks, std_weights = [], []
        for l, w in enumerate(widths):
            rows = [(weights[q], _columns(q, l, widths)) for q in _readers(l, n_layers)]
            blocks.append(torch.cat([W[:, c:c + w] for W, c in rows], dim=0))
            std_weights.append(torch.cat([W[:, c + w] for W, c in rows], dim=0))
        ctx.widths = widths
        ctx.shapes = [W.shape for W in weights]
        return (*blocks, *std_weights)

    @staticmethod
    def backward(ctx, *grads):
        widths = ctx.widths
        n_layers = len(widths)
        d_blocks, d_std = grads[:n_layers], grads[n_layers:]
        d_weights = [d_blocks[0].new_empty(shape) for shape in ctx.shapes]  # every column is written below
        H = d_weights[0].size(0)
        for l, w in enumerate(widths):
            for i, q in enumerate(_readers(l, n_layers)):
                c = _columns(q, l, widths)
                d_weights[q][:, c:c + w] = d_blocks[l][i * H:(i + 1) * H]
                d_weights[q][:, c + w] = d_std[l][i * H:(i + 1) * H]
        return (None, *d_weights)


class _PairLayers(torch.autograd.Function):
    """The five pair Linears of D on each layer's features (data) and minibatch std, from the
    per-layer blocks of _LayerBlocks: (B, 5 x 128) hidden units."""

    @staticmethod
    def forward(ctx, flats, stds, *params):
        n_layers = len(flats)
        blocks, std_weights, biases = params[:n_layers], params[n_layers:2 * n_layers], params[2 * n_layers:]
        H = biases[0].size(0)
        outs = [_mm(f, V.t()) for f, V in zip(flats, blocks)]  # (B, rows of layer l)
        shift = [b.clone() for b in biases]  # the std features are one value for all rows: a bias
        for l, (std, s) in enumerate(zip(stds, std_weights)):
            for i, q in enumerate(_readers(l, n_layers)):
                shift[q] += std.to(s.dtype) * s[i * H:(i + 1) * H]
        hidden = []
        for q in range(n_layers - 1):
            lo = outs[q][:, -H:]  # pair q is the last reader of layer q and the first of layer q+1
            hi = outs[q + 1][:, :H]
            hidden.append((lo + hi).add_(shift[q].to(lo.dtype)))
        ctx.flats, ctx.stds, ctx.H = flats, stds, H
        return torch.cat(hidden, dim=1)

    @staticmethod
    def backward(ctx, d_hidden):
        flats, stds, H = ctx.flats, ctx.stds, ctx.H
        n_layers = len(flats)
        parts = d_hidden.split(H, dim=1)
        d_blocks, d_std = [], []
        for l, (f, std) in enumerate(zip(flats, stds)):
            d_out = torch.cat([parts[q] for q in _readers(l, n_layers)], dim=1)
            d_blocks.append(_mm(d_out.t(), f.to(d_out.dtype)))
            d_std.append(d_out.sum(dim=0) * std)
        d_biases = [p.sum(dim=0) for p in parts]
        return (None, None, *d_blocks, *d_std, *d_biases)


class _StateGradientL1(torch.autograd.Function):
    """From g = d score / d hidden (B, 640) and D's per-layer blocks: each layer's state gradient
    and their summed L1 norm per sample, with a hand-written backward for the norm.

    Layer l's gradient is G_l V_l, G_l the columns of g of the pairs that read it, plus, through the
    minibatch-std feature (one value for all rows), c_l * d std_l / d h_l with c_l = sum G_l s_l.
    The backward multiplies sign(gradient) into the blocks directly: two passes over each
    (B, features) gradient where autograd's double backward makes about ten."""

    @staticmethod
    def forward(ctx, g, slopes, *params):
        # Under autocast (--amp) the matrix products run in its dtype, in the backward pass too.
        amp = _autocast_dtype(g.device.type)
        n_layers = len(slopes)
        blocks, std_weights = params[:n_layers], params[n_layers:]
        g_pairs = g.split(g.size(1) // (n_layers - 1), dim=1)
        reads = [torch.cat([g_pairs[q] for q in _readers(l, n_layers)], dim=1) for l in range(n_layers)]
        grads = []
        for G, V, s, slope in zip(reads, blocks, std_weights, slopes):
            c = (G @ s).sum()
            grads.append(_mm(G, V).to(slope.dtype).addcmul_(c.to(slope.dtype), slope))
        norms = sum(gr.abs().sum(dim=1) for gr in grads)
        ctx.slopes, ctx.amp = slopes, amp
        ctx.save_for_backward(*reads, *blocks, *std_weights, *grads)
        ctx.mark_non_differentiable(*grads)
        return (norms, *grads)

    @staticmethod
    def backward(ctx, grad_norms, *_):
        with _autocast(grad_norms.device.type, ctx.amp):
            return _StateGradientL1._backward(ctx, grad_norms)

    @staticmethod
    def _backward(ctx, grad_norms):
        slopes = ctx.slopes
        n_layers = len(slopes)
        saved = ctx.saved_tensors
        reads, blocks, std_weights, grads = (saved[i * n_layers:(i + 1) * n_layers] for i in range(4))
        H = std_weights[0].size(0)  # layer 0 is read by one pair only: one pair's hidden units
        d_pairs = [None] * (n_layers - 1)
        d_blocks, d_std = [], []
        per_row = grad_norms.unsqueeze(1)
        for l, (G, V, s, slope, gr) in enumerate(zip(reads, blocks, std_weights, slopes, grads)):
            sign = gr.sign()
            # d loss / d c_l: the same for every row's std column
            through_std = (grad_norms * (sign * slope).sum(dim=1)).sum()
            d_blocks.append(_mm((per_row * G).t(), sign.to(G.dtype)))
            d_std.append(through_std * G.sum(dim=0))
            d_read = (per_row * _mm(sign.to(V.dtype), V.t())).add_(through_std * s)
            for i, q in enumerate(_readers(l, n_layers)):
                part = d_read[:, i * H:(i + 1) * H]
                d_pairs[q] = part if d_pairs[q] is None else d_pairs[q] + part
        return (torch.cat(d_pairs, dim=1), None, *d_blocks, *d_std)


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
        self.discriminator = Discriminator(cfg)
        self.readout = Readout(cfg) if cfg.readout else None
        init_weights(self)

    def parts(self):
        """name -> network, for the networks that exist (readout only when gamma < 1)."""
        names = ("inference", "generator", "discriminator", "readout")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    @torch.no_grad()
    def decay_noise(self, factor=10.0):
        """The paper's 'lr-decay' schedule: divide every noise level and DeReLU scale by factor."""
        for net in (self.inference, self.generator, self.discriminator):
            net.sigma /= factor
        for m in self.inference.derelu:
            if isinstance(m, DeReLU):
                m.scale /= factor

