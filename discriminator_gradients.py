"""D's score and its gradient w.r.t. the states, written out (the fast path of the training step).

`score_and_state_gradients(D, states)` returns, for a models.Discriminator D and states that are
data, what autograd would give from D.forward: the score (B,), d sum_b score_b / d h_l for each
layer, and that gradient's L1 norm per sample; the score and the norms carry the gradients w.r.t.
D's parameters that D(states) and the norm of autograd.grad(..., create_graph=True) would.

The identity that makes it exact: layer l's state gradient is G_l V_l + c_l d std_l / d h_l, where
G = d score / d hidden (the 640 pair outputs) comes from the closed forms of the head (row-wise
normalization and LeakyReLU, computed with autograd-tracked operations), V_l are the pair weights
that read layer l, and c_l = sum G_l s_l goes through the minibatch-std feature (s_l its weights).
That is bilinear in G and the weights, so the L1 norm's gradient w.r.t. them is written by hand
(sign(gradient) multiplied back, _StateGradientL1) and autograd takes the rest through G; the
LeakyReLU's mask has zero derivative, as in autograd's double backward. The pair weights are
regrouped by layer (_LayerBlocks) so that every product is one dense matrix product; float32 CPU
products go to oneDNN (_mm).

Held to autograd by tests/test_models.py::test_written_out_state_gradients_equal_double_backpropagation
(float64 and float32, noise on, divisive normalization on and off). A D of one's own trains at once
with `--d-gradients autograd` (losses.score_and_state_gradients), without this module; and since
these formulas describe one D, a run checks them against that D first (agrees_with_autograd).
"""
import copy
import platform

import torch

from models import _centered_and_std
from utils import isolated_rng


def _std_and_its_gradient(flat):
    """The minibatch-std feature of (B, J) features and its gradient d std / d flat, (B, J)."""
    centered, std = _centered_and_std(flat)
    return std.mean(), centered.div_(std * ((flat.size(0) - 1) * flat.size(1)))


def score_and_state_gradients(D, states):
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
    blocks_and_std_weights = _LayerBlocks.apply(tuple(D.widths), *(p.weight for p in D.pairs))
    hidden = _PairLayers.apply(flats, stds, *blocks_and_std_weights, *(p.bias for p in D.pairs))
    score, a, r = D._head(hidden)

    # d score / d hidden, row by row: back through N (its row-wise Jacobian), then the LeakyReLU.
    v = D.out.weight  # (1, 640)
    if D.divisive_normalization:
        rho = torch.rsqrt(r.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        g = rho * v - r * (rho.pow(3) * (r * v).mean(dim=1, keepdim=True))
    else:
        g = v.expand_as(r)
    g = g * torch.where(a > 0, 1.0, D.slope).to(g.dtype)

    norms, *grads = _StateGradientL1.apply(g, slopes, *blocks_and_std_weights)
    return score, [gr.view_as(h) for gr, h in zip(grads, states)], norms


def agrees_with_autograd(D, state_shapes, samples=4, rtol=1e-6):
    """Whether score_and_state_gradients still computes what autograd takes through D.forward:
    the scores, the state gradients, and the gradients w.r.t. D's parameters of a loss of scores and
    L1 norms, on random states of the given shapes (without batch).

    They differ once Discriminator has been edited (another slope, layer or head): the formulas here
    are those of the D they were written for, and would go on training with its gradients. Run in
    float64 on a CPU copy of D, where the two agree to ~1e-12, so an edit stands out at once; with
    its own seeded random numbers, so the caller's stream (and so exact resume) is untouched."""
    D = copy.deepcopy(D).to("cpu", torch.float64)
    with isolated_rng(0):
        states = [torch.randn(samples, *shape, dtype=torch.float64) for shape in state_shapes]
        weights = torch.randn(samples, dtype=torch.float64)

        def loss(scores, norms):
            return (scores * weights).sum() + 0.7 * (norms * weights.flip(0)).sum()

        torch.manual_seed(1)  # the same noise in D's head for both
        leaves = [h.clone().requires_grad_(True) for h in states]
        want_scores = D(leaves)
        want_grads = torch.autograd.grad(want_scores.sum(), leaves, create_graph=True)
        want_norms = sum(g.flatten(1).abs().sum(dim=1) for g in want_grads)
        want_params = torch.autograd.grad(loss(want_scores, want_norms), list(D.parameters()), allow_unused=True)
        torch.manual_seed(1)
        try:
            scores, grads, norms = score_and_state_gradients(D, states)
            params = torch.autograd.grad(loss(scores, norms), list(D.parameters()), allow_unused=True)
        except Exception:  # an edited D may lack what the formulas read (D.pairs, D._head ...)
            return False
    pairs = [(scores, want_scores), (norms, want_norms), *zip(grads, want_grads), *zip(params, want_params)]
    return all(got is not None and want is not None and got.shape == want.shape
               and (got - want).abs().max() <= rtol * want.abs().max() for got, want in pairs)


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
