"""The training step of Adversarial Wake-Sleep: which network steps on which gradient, and when.

losses.py defines every term and the forward passes of one step (step_losses); this module owns
what follows them, as the training loop of train.py calls it once per batch: backward into each
network alone, the order of updates (docs/algorithm.md, "Order of updates"), clipping, the check
that nothing non-finite reaches the weights, and the Adam steps.
"""
import contextlib
import dataclasses
import sys

import torch

import discriminator_gradients
import losses
from losses import StepConfig, step_losses


def make_optimizers(nets, args):
    lrs = {"inference": args.lr_e, "generator": args.lr_g, "discriminator": args.lr_d, "readout": args.lr_rd}
    groups = {name: [{"params": list(net.parameters())}] for name, net in nets.parts().items()}
    scales = list(nets.generator.log_scales)
    if scales:  # --dream-noise laplace: the scales at their own rate, log b moving ~lr a step (Adam)
        groups["generator"] = [{"params": [p for p in nets.generator.parameters() if all(p is not q for q in scales)]},
                               {"params": scales, "lr": getattr(args, "lr_scale", 1e-2)}]
    # fused: one kernel per parameter group instead of a dozen per tensor (CPU and CUDA)
    return {name: torch.optim.Adam(groups[name], lr=lrs[name], betas=(args.beta1, args.beta2),
                                   weight_decay=args.wd, fused=True)
            for name in nets.parts()}


class NonFiniteError(Exception):
    """A non-finite loss or gradient, refused before it reached the weights of the networks that
    had not yet stepped; `stepped` names those that had (the critics, in the alternating order)."""

    def __init__(self, terms, stepped=()):
        super().__init__(", ".join(terms))
        self.terms = terms
        self.stepped = list(stepped)


def _inf_norm(tensors):
    """max |entry| over tensors, NaN if any entry is. (get_total_norm(..., "inf") is the same
    number, but its CPU kernel runs ~20x slower than amax and amin.)"""
    return torch.stack([torch.maximum(t.amax(), -t.amin()) for t in tensors]).amax()


def _backward(loss, nets, names):
    """Gradients of `loss` into the networks `names` (those that exist) alone."""
    if loss.requires_grad:
        loss.backward(inputs=[p for n, net in nets.parts().items() if n in names for p in net.parameters()])


def _update(nets, optimizers, names, out, hp, check_finite, average, stepped=()):
    """Average (several processes), check, clip and step the networks `names`, whose gradients are
    complete; `out` (the metrics, or {}) is averaged and checked with them. Returns `out`."""
    names = [n for n in names if n in nets.parts()]
    if average is not None:
        out = average(nets, out, names)
    # Each network's largest gradient entry: clipping needs it, and it is NaN or inf exactly when
    # some entry is, so it also serves the finiteness check.
    grads = {n: [p.grad for p in nets.parts()[n].parameters() if p.grad is not None] for n in names}
    norms = {n: _inf_norm(g) for n, g in grads.items() if g}
    if check_finite and (out or norms):  # one host sync per phase
        if not bool(torch.isfinite(torch.stack([*out.values(), *norms.values()])).all()):
            bad = [k for k, v in out.items() if not torch.isfinite(v)]
            bad += [f"gradient of {n}" for n, v in norms.items() if not torch.isfinite(v)]
            raise NonFiniteError(bad, stepped)
    if hp.gradient_clipping > 0:
        for n in ("discriminator", "inference"):
            if n in norms:
                torch.nn.utils.clip_grads_with_norm_(nets.parts()[n].parameters(), hp.gradient_clipping, norms[n])
    for n in names:
        optimizers[n].step()
    return out


@contextlib.contextmanager
def statistics_kept(module):
    """Passes that only re-evaluate a gradient leave BatchNorm statistics and spectral-norm
    estimates where the step's own passes left them."""
    kept = [b.clone() for b in module.buffers()]
    yield
    with torch.no_grad():
        for b, k in zip(module.buffers(), kept):
            b.copy_(k)


@contextlib.contextmanager
def training_mode(nets):
    """The networks as the training step runs them (BatchNorm on batch statistics, G's noise on),
    for measurements that must see what a step sees, with every buffer (BatchNorm's running
    statistics, spectral-norm estimates) left as it was."""
    was = nets.training
    nets.train()
    with statistics_kept(nets):
        yield
    nets.train(was)


def training_step(nets, optimizers, x, hp: StepConfig, check_finite=True, average=None):
    """One step of Adversarial Wake-Sleep: gradients, clipping, a check that nothing is
    non-finite, and each network's Adam step, in the order of updates `hp.update_order`:

    alternating (the release's order, docs/algorithm.md "Order of updates"): the critics step first and their
    opponents follow the moved critics, with exact gradients from fresh passes:
      1. D steps on L_D;
      2. F's adversarial gradient is taken through the stepped D (a fresh D pass at the wake
         state); R and F step on L_R, that and the KL term;
      3. G's readout gradient is taken through the stepped F and R (a fresh pass of G's image);
         G steps on it and its prediction term.
    simultaneous: every gradient at the same parameter values, one backward, every network steps.

    Under --inference-rule wake-sleep there is no D: step 1 is empty, F steps in step 2 on its sleep
    prediction term L_F,sleep (and L_R), G in step 3 on its own terms, as above.

    `average(nets, metrics, names) -> metrics` (several processes: distributed.Group.average)
    turns the gradients of `names` and the metrics into their means over the processes."""
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=hp.amp)
    with autocast:
        t = step_losses(nets, x, hp)
    F, D, R = nets.inference, nets.discriminator, nets.readout
    everything = list(nets.parts())
    if hp.update_order == "simultaneous":
        _backward(t.simultaneous_total(hp.gamma), nets, everything)
        return _update(nets, optimizers, everything, t.out, hp, check_finite, average)

    # (1) The wake/sleep discriminator steps.
    _backward(t.loss_d, nets, ["discriminator"])
    out = _update(nets, optimizers, ["discriminator"], t.out, hp, check_finite, average)
    # (2) F follows the stepped D; R and F, the image critic, step.
    inference_follows = 0
    if t.state_grads is not None:
        with autocast, torch.no_grad():
            _, state_grads, _ = losses.d_terms(D, losses.as_data(t.wake, x.dtype), hp, graph=False)
        inference_follows = losses.inference_follows(t.wake, state_grads, hp.gamma)
    _backward(t.loss_rest + inference_follows, nets, ["readout", "inference", "generator"])
    _update(nets, optimizers, ["readout", "inference"], {}, hp, check_finite, average, stepped=["discriminator"])
    # (3) G follows the stepped F and R, and steps.
    if R is not None:
        with autocast, statistics_kept(F):
            readout = losses.generator_readout_loss(R(F(t.image.to(x.dtype), to_layer=4)[4]).to(x.dtype), hp.gamma)
            _backward(readout, nets, ["generator"])
    _update(nets, optimizers, ["generator"], {}, hp, check_finite, average,
            stepped=[n for n in ("discriminator", "readout", "inference") if n in nets.parts()])
    return out


def check_d_gradients(nets, hp: StepConfig, say=print):
    """hp, or hp with d_gradients "autograd" where the written-out D gradients no longer match
    Discriminator.forward (D was edited): said in one line, and the plain path trains instead of
    the old D's formulas. Checked in well under a second, before the first step."""
    if hp.d_gradients != "written-out" or hp.gamma == 0 or nets.discriminator is None:  # nothing scores a state
        return hp
    if discriminator_gradients.agrees_with_autograd(nets.discriminator, nets.cfg.state_shapes()):
        return hp
    say("note: the written-out D gradients (discriminator_gradients.py) differ from autograd through "
        "Discriminator.forward, which must have been edited: training with --d-gradients autograd",
        file=sys.stderr)
    return dataclasses.replace(hp, d_gradients="autograd")
