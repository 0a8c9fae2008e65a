#!/usr/bin/env python3
"""One training step of this code and of the original release, from the same weights, on the same
batch and the same z, with every noise source set to zero: how far apart are the gradients and the
new weights?

Usage (from the repository root):
    python experiments/step_vs_release.py RELEASE_DIR [--doubly] [--update-order O] [--checkpoint RUN]
                                          [--noise shared] [--data MNIST_DIR]

RELEASE_DIR holds the release's files (github.com/KordingLab/adversarial-wake-sleep: train.py,
dcgan_models.py, utils.py). Its train() runs unchanged on the CPU with two stand-ins: `.cuda()`
returns its tensor, and its optimizers update the weights in place without telling autograd, as
PyTorch 1.3's did, so its graphs back-propagate through the stepped weights as they did then.
The flags are the paper's pure command line, or its doubly adversarial one with --doubly.

Noise off (sigma 0, DeReLU scale 0) makes one step a deterministic function of the weights, the
batch and z, so what remains is what the two codes compute differently. For each network and
step it prints the relative difference of the gradients each optimizer stepped on,
||g_ours - g_release|| / ||g_release||, and of the weight change; then that of the gradients the
release's step amounts to, computed with this code's networks and terms (as_the_release); and
that of the BatchNorm running statistics. docs/fidelity.md reads the figures.

--noise shared turns F's, DeReLU's and G's noise back on and hands both codes the same draws
(SharedDraws; D's noise stays off, since the two codes make different numbers of D passes): then the
step is again deterministic, and agreement says that the noise enters both codes' steps alike.

The batches are uniform noise images, or with --data real digits (the states of digits have exact
zeros and saturated pixels that noise images rarely give).
"""
import argparse
import contextlib
import copy
import io
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train as ours  # noqa: E402  (its flags and model_config: the run's own reading of a command line)
from step import make_optimizers, training_step  # noqa: E402
from models import DeReLU, Networks  # noqa: E402
import losses  # noqa: E402
from losses import StepConfig  # noqa: E402
from checkpoint import load_checkpoint  # noqa: E402
from data import load_in_memory, to_unit_range  # noqa: E402

PURE = ("--dataset mnist --image-size 32 --n-filters 32 --noise-dim 40 --lr-g 0.00001 --lr-d 0.0001 "
        "--lr-e 0.0003 --beta1 0.64 --beta2 .999 --lamda .9 --kl-from-sn --divisive-normalization True")
DOUBLY = ("--dataset mnist -b 128 --image-size 32 --n-filters 32 --noise-dim 40 --lr-g 0.0002 --lr-d 0.00001 "
          "--lr-e 0.0008 --lr-rd 0.00001 --beta1 0 --beta2 .9 --lamda .7 --lamda2 7 --kl-from-sn "
          "--divisive-normalization True --gamma 0.9")


class StaleGraphAdam:
    """torch.optim.Adam stepping aliases of the parameters (p.data shares the storage, not the
    version counter): a graph recorded before the step back-propagates through the new weights."""

    def __init__(self, params, **kw):
        self.params = list(params)
        self.aliases = [p.data for p in self.params]
        self.adam = torch.optim.Adam(self.aliases, **kw)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        for p, a in zip(self.params, self.aliases):
            a.grad = p.grad
        # The gradients it stepped on: backward passes after the step may add to p.grad.
        self.used = {p: None if p.grad is None else p.grad.clone() for p in self.params}
        self.adam.step()


def import_release(folder):
    """The release's train.py as a module. It imports its own `utils` and `train`, names this
    repository uses too: ours leave sys.modules while it loads and come back afterwards."""
    torch.Tensor.cuda = lambda self, *args, **kw: self
    torch.nn.Module.cuda = lambda self, *args, **kw: self
    names = [f[:-3] for f in os.listdir(folder) if f.endswith(".py")]
    kept = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, os.path.abspath(folder))
    try:
        import train as release
    finally:
        sys.path.pop(0)
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(kept)
    return release


def release_networks(T, args):
    """The release's networks for args (its own parser's namespace), as its main_worker builds them."""
    dn, nf, nz, S = args.divisive_normalization == "True", args.n_filters, args.noise_dim, args.image_size
    inf = T.Inference(nz, nf, 1, image_size=S, noise_before=False, hard_norm=dn, spec_norm=False)
    gen = T.Generator(nz, nf, 1, image_size=S, hard_norm=dn)
    disc = T.Discriminator(nz, nf, 1, image_size=S, hard_norm=dn, hidden_dim=128)
    rd = T.ReadoutDiscriminator(nf, S, spec_norm=False) if args.gamma < 1 else None
    return inf, gen, disc, rd


def pairs(nets, rel):
    """(network name, our tensor, the release's tensor) for every parameter and BatchNorm buffer."""
    inf, gen, disc, rd = rel
    out = []
    for k in range(1, 6):
        block = getattr(inf, f"inference_{k}from{k - 1}_conv")
        out.append(("inference", nets.inference.convs[k - 1].weight, block.conv1.weight))
        for name in ("weight", "bias", "running_mean", "running_var"):
            out.append(("inference", getattr(nets.inference.norms[k - 1], name), getattr(block.bn1, name)))
        conv = getattr(gen, f"generative_{k}to{k - 1}_conv")
        out += [("generator", nets.generator.convs[k - 1].weight, conv.weight),
                ("generator", nets.generator.convs[k - 1].bias, conv.bias)]
    for l, name in enumerate(("linear01", "linear12", "linear23", "linear34", "linear45")):
        lin = getattr(disc, name)
        out += [("discriminator", nets.discriminator.pairs[l].weight, lin.weight),
                ("discriminator", nets.discriminator.pairs[l].bias, lin.bias)]
    out += [("discriminator", nets.discriminator.out.weight, disc.linear2.weight),
            ("discriminator", nets.discriminator.out.bias, disc.linear2.bias)]
    if rd is not None:
        lin = [m for m in rd.modules() if isinstance(m, torch.nn.Linear)]
        assert len(lin) == 1, "expected the release's readout to be one Linear"
        out += [("readout", nets.readout.linear.weight, lin[0].weight),
                ("readout", nets.readout.linear.bias, lin[0].bias)]
    return out


def silence_noise(nets, rel, keep_f_and_g=False):
    """D's noise off in both codes; F's, DeReLU's and G's too unless keep_f_and_g."""
    inf, gen, disc, _ = rel
    with torch.no_grad():
        nets.discriminator.sigma.zero_()
        disc.sigma2 = 0.0
        if keep_f_and_g:
            return
        for net in (nets.inference, nets.generator):
            net.sigma.zero_()
        for m in nets.inference.derelu:
            if isinstance(m, DeReLU):
                m.scale.zero_()
        inf.sigma2 = gen.sigma2 = 0.0
        for m in inf.modules():
            if hasattr(m, "scale") and isinstance(m.scale, torch.nn.Parameter):
                m.scale.zero_()


@contextlib.contextmanager
def fixed_z(z):
    """Both codes' draw of the generator's input returns z: ours calls torch.randn, the release
    fills an empty tensor with normal_() (with noise off, every other draw is multiplied by 0)."""
    randn, normal_ = torch.randn, torch.Tensor.normal_

    def our_randn(*size, **kw):
        return z.clone() if tuple(size) == tuple(z.shape) else randn(*size, **kw)

    def release_normal_(t, *a, **kw):
        return t.copy_(z) if t.shape == z.shape and t.dim() == 4 else normal_(t, *a, **kw)

    torch.randn, torch.Tensor.normal_ = our_randn, release_normal_
    try:
        yield
    finally:
        torch.randn, torch.Tensor.normal_ = randn, normal_


class SharedDraws:
    """Every code's k-th random draw of one kind and shape in a step gets the same numbers.

    Both codes draw F's noise (layer by layer), then z, then G's noise, so with D's noise off (its
    passes differ in number) the k-th normal draw of a shape is the same source in both: F's, DeReLU's
    and G's noise and z are then equal, and one step with the noise on is again a deterministic
    function of the weights. DeReLU: the release fills log(U), U in [1e-8, 1); this code log(1 - U),
    so this code is handed 1 - U (and U is drawn where both are exact)."""

    def __init__(self):
        self.bank, self.counts, self.code = {}, {}, None
        self.randn = torch.randn  # the real one: installed() replaces it

    def draw(self, kind, shape):
        key = (kind, tuple(shape))
        counts = self.counts.setdefault(self.code, {})
        i = counts[key] = counts.get(key, -1) + 1
        bank = self.bank.setdefault(key, [])
        while len(bank) <= i:
            bank.append(self.randn(*shape) if kind == "normal" else self.uniform(shape))
        return bank[i].clone()

    @staticmethod
    def uniform(shape):
        """U on the grid k / 2^24, k = 1 .. 2^24 - 1, where 1 - U and 1 - (1 - U) are exact in float32."""
        return torch.randint(1, 2 ** 24, shape).float().div_(2 ** 24)

    def z(self, shape):
        return self.bank[("normal", tuple(shape))][1]  # F's top layer drew the first of that shape

    @contextlib.contextmanager
    def installed(self):
        saved = torch.randn, torch.randn_like, torch.rand_like, torch.Tensor.normal_, torch.Tensor.uniform_
        torch.randn = lambda *size, **kw: self.draw("normal", size[0] if len(size) == 1 else size)
        torch.randn_like = lambda t, **kw: self.draw("normal", t.shape)
        torch.rand_like = lambda t, **kw: 1 - self.draw("uniform", t.shape)
        torch.Tensor.normal_ = lambda t, *a, **kw: t.copy_(self.draw("normal", t.shape))
        torch.Tensor.uniform_ = lambda t, *a, **kw: t.copy_(self.draw("uniform", t.shape))
        try:
            yield self
        finally:
            torch.randn, torch.randn_like, torch.rand_like, torch.Tensor.normal_, torch.Tensor.uniform_ = saved


@contextlib.contextmanager
def stale(new, old):
    """Each layer of `new` with weights outputs what the same layer of `old` outputs, while gradients
    flow back through new's weights: a graph recorded at the old weights and back-propagated after
    an in-place optimizer step, as the release's backward passes after a step were on PyTorch 1.3."""
    handles = []
    for m, m_old in zip(new.modules(), old.modules()):
        if next(m.parameters(recurse=False), None) is not None:
            def swap(module, inputs, out, m_old=m_old):
                return out + (m_old(*inputs) - out).detach()
            handles.append(m.register_forward_hook(swap))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def as_the_release(old, new, x, z, hp):
    """The gradient the release steps each network on, computed with this code's networks and loss
    terms: at the weights before the step (`old`), except where the release back-propagates after
    an optimizer stepped, there through the stepped weights (`new`) with the old activations (F's
    adversarial term through D; G's readout term through F and R); and at gamma < 1 D's wake
    penalty at the mixed state (G's image, F's h1..h5 of x). Returns {parameter name: gradient}."""
    F0, G0, D0, R0 = old.inference, old.generator, old.discriminator, old.readout
    xr = x.detach().requires_grad_(R0 is not None)
    wake = F0(xr)
    sleep = G0(z)
    data = [h.detach() for h in sleep]
    d_wake, _, n_wake = losses.score_and_state_gradients(D0, [h.detach() for h in wake])
    d_sleep, _, n_sleep = losses.score_and_state_gradients(D0, data)
    if R0 is not None:
        n_wake = losses.score_and_state_gradients(D0, [data[0]] + [h.detach() for h in wake[1:]])[2]
    loss_d = losses.discriminator_loss(d_wake, d_sleep, losses.l1_gradient_penalty(n_wake),
                                       losses.l1_gradient_penalty(n_sleep), hp.gamma, hp.lamda)
    with stale(new.discriminator, D0):
        loss_f = losses.inference_adversarial_loss(new.discriminator(wake), hp.gamma)
    loss_f = loss_f + 1e-4 * losses.kl_from_standard_normal(wake[5])
    loss_g = hp.gamma * losses.generator_prediction_loss(G0, wake)
    loss_r = 0
    if R0 is not None:
        loss_r = losses.readout_terms(F0, R0, xr, wake[4], sleep[0], hp)[0]
        with stale(new.inference, F0), stale(new.readout, R0):
            loss_g = loss_g + losses.generator_readout_loss(new.readout(new.inference(sleep[0], to_layer=4)[4]),
                                                            hp.gamma)
    grads = {}
    for name, loss in (("discriminator", loss_d), ("inference", loss_f + loss_r), ("generator", loss_g),
                       ("readout", loss_r)):
        if name in old.parts():
            params = dict(old.parts()[name].named_parameters())
            g = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
            if name in ("discriminator", "inference") and hp.gradient_clipping > 0:  # as both codes clip
                largest = torch.stack([t.abs().max() for t in g]).max()
                g = [t * (hp.gradient_clipping / (largest + 1e-6)).clamp(max=1.0) for t in g]
            grads.update({f"{name}.{n}": t for n, t in zip(params, g)})
    return grads


def rel_diff(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def continue_from(path, nets, optimizers, table, ropt):
    """Both codes start from this code's checkpoint: its weights, and its Adam moments in both."""
    state = load_checkpoint(path)
    nets.load_state_dict(state["networks"])
    by_name = dict(zip(("inference", "generator", "discriminator", "readout"), ropt))
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    for name, mine, theirs in table:
        if isinstance(mine, torch.nn.Parameter) and mine in optimizers[name].state:
            alias = by_name[name].aliases[[id(q) for q in by_name[name].params].index(id(theirs))]
            by_name[name].adam.state[alias] = {k: v.clone() for k, v in optimizers[name].state[mine].items()}


def report(step, nets, table, before, ropt, emulated):
    """One line per network: this code's and the emulation's distance from the release's step."""
    used = {}
    for o in ropt:
        used.update(o.used if o is not None else {})
    name_of = {id(p): n for n, p in nets.named_parameters()}
    for net in dict.fromkeys(n for n, _, _ in table):
        rows = [(m, t, b0, b1) for (n, m, t), (_, b0, b1) in zip(table, before) if n == net]
        params = [r for r in rows if isinstance(r[0], torch.nn.Parameter) and used[r[1]] is not None]
        stats = [r for r in rows if not isinstance(r[0], torch.nn.Parameter)]
        flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
        g_ours, g_rel = flat(m.grad for m, _, _, _ in params), flat(used[t] for _, t, _, _ in params)
        d_ours = flat(m.detach() - b0 for m, _, b0, _ in params)
        d_rel = flat(t.detach() - b1 for _, t, _, b1 in params)
        g_emulated = flat(emulated[name_of[id(m)]] for m, _, _, _ in params)
        line = (f"{step:4d}  {net:13s}  {rel_diff(g_ours, g_rel):18.2e}  {rel_diff(d_ours, d_rel):18.2e}"
                f"  {rel_diff(g_emulated, g_rel):18.2e}")
        if stats:
            line += f"  ({rel_diff(flat(m for m, _, _, _ in stats), flat(t for _, t, _, _ in stats)):.2e})"
        print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("release_dir")
    p.add_argument("--doubly", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="start both from this code's checkpoint (weights and Adam moments) of "
                   "a run with the same flags, instead of a fresh initialization")
    p.add_argument("--update-order", default="alternating", help="this code's order of updates")
    p.add_argument("--noise", choices=("off", "shared"), default="off",
                   help="shared: F's, DeReLU's and G's noise on, the same draws in both codes (D's off)")
    p.add_argument("--data", help="an MNIST folder: batches of its training digits instead of uniform noise images")
    a = p.parse_args()
    if a.doubly and a.noise == "shared":
        p.error("--noise shared takes the pure flags: at gamma < 1 the codes make different numbers of F passes")

    T = import_release(a.release_dir)
    flags = (DOUBLY if a.doubly else PURE).split()
    rargs = T.parser.parse_args(flags)
    rargs.scale_gen_surprisal_by_D = rargs.prioritized_replay = False
    args = ours.parse_args(ours.get_parser(), flags + ["--data", ".", "--update-order", a.update_order])
    hp = StepConfig.from_args(args)
    torch.manual_seed(a.seed)
    nets = Networks(ours.model_config(args))
    optimizers = make_optimizers(nets, args)
    rel = release_networks(T, rargs)
    inf, gen, disc, rd = rel
    kw = dict(betas=(rargs.beta1, rargs.beta2), weight_decay=rargs.wd)
    ropt = [StaleGraphAdam(net.parameters(), lr=lr, **kw) if net is not None else None
            for net, lr in ((inf, rargs.lr_e), (gen, rargs.lr_g), (disc, rargs.lr_d), (rd, rargs.lr_rd))]
    table = pairs(nets, rel)
    if a.checkpoint:
        continue_from(a.checkpoint, nets, optimizers, table, ropt)
    with torch.no_grad():
        for _, mine, theirs in table:
            theirs.copy_(mine)
    silence_noise(nets, rel, keep_f_and_g=a.noise == "shared")

    noise = "noise off" if a.noise == "off" else "F's, DeReLU's and G's noise on and shared, D's off"
    print(f"{'doubly' if a.doubly else 'pure'} flags, {noise}, batch {args.batch_size}, order {hp.update_order}")
    print("step  network        |grad diff|/|grad|  |step diff|/|step|  "
          "as the release: |grad diff|/|grad|  (BatchNorm running stats: |diff|/|stat|)")
    digits = to_unit_range(load_in_memory("mnist", a.data, 32)[0]) if a.data else None
    for step in range(a.steps):
        if digits is None:
            x = torch.rand(args.batch_size, 1, 32, 32) * 2 - 1
        else:
            x = digits[torch.randperm(len(digits))[:args.batch_size]]
        z = torch.randn(args.batch_size, args.noise_dim, 1, 1)
        before = [(n, m.detach().clone(), t.detach().clone()) for n, m, t in table]
        old = copy.deepcopy(nets)
        shared = SharedDraws()
        with fixed_z(z) if a.noise == "off" else shared.installed():
            shared.code = "ours"
            training_step(nets, optimizers, x, hp)
            shared.code = "release"
            with contextlib.redirect_stdout(io.StringIO()):
                T.train(rargs, inf, gen, [(x, None)], disc, ropt[2], ropt[1], ropt[0], 0, rd, ropt[3])
            new = copy.deepcopy(old)  # with the release's weights after its step
            with torch.no_grad():
                for (_, mine, _), (_, _, theirs) in zip(pairs(new, rel), table):
                    mine.copy_(theirs)
            shared.code = "emulation"
            emulated = as_the_release(old, new, x, z if a.noise == "off" else shared.z(z.shape), hp)
        report(step, nets, table, before, ropt, emulated)
        # Both go on from the release's weights: each line compares one step, not a drift.
        with torch.no_grad():
            for _, mine, theirs in table:
                mine.copy_(theirs)


if __name__ == "__main__":
    main()
