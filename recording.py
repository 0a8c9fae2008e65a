"""The wake/sleep discriminator read as a neuromodulator (docs/neuromodulation.md): for each input,
  signal  D's score of the wake state F infers from it;
  gate    the L1 size, per sample, of the gradient D sends back to each of F's layers h1..h5 (what
          F's weights learn from; F's loss scales it by gamma / batch), and
  weight  the generator's per-sample weight 2 sigmoid(-signal) (--scale-gen-surprisal-by-D), and
  surprisal  the input's generative surprisal under the model: G's prediction error of the state,
          sum_k mean |G.predict(k, h_k) - h_(k-1)| (losses.generator_prediction_errors, the term G
          learns from; its negative log-likelihood under Laplace noise, up to constants),
by the training step's own code (losses.d_terms, either --d-gradients path) with the networks in
training mode, as the step runs them. D's minibatch-std feature couples the samples of a batch, so
a batch is always scored as one.

A module of its own because two scripts read it: train.py, which records the novelty gap every
epoch (NoveltyGap), and neuromodulation.py, whose experiments record whole conditions. So train.py
never imports the experiments' script, which imports train.py (for the run's flags): no circle.
"""
import dataclasses
import sys
from dataclasses import dataclass

import torch

import losses
from data import DataError, TensorBatches, seeded_draw, split_images
from losses import StepConfig
from step import training_mode
from utils import isolated_rng


@dataclass
class Recording:
    signal: torch.Tensor  # (N,) D's score of the state
    gate: torch.Tensor  # (N, 5) L1 size of d sum_b D / d h_l for l = 1..5, per sample
    weight: torch.Tensor  # (N,) 2 sigmoid(-signal)
    surprisal: torch.Tensor = None  # (N,) G's prediction error of the state (record_passes)

    KEYS = ("signal", "gate", "weight", "surprisal")

    @staticmethod
    def cat(recordings):
        return Recording(*(torch.cat([getattr(r, k) for r in recordings]) for k in Recording.KEYS))

    def select(self, rows):
        return Recording(*(getattr(self, k)[rows] for k in self.KEYS))

    def numpy(self):
        return {"signal": self.signal.numpy(), "gate": self.gate.sum(dim=1).numpy(), "weight": self.weight.numpy(),
                "surprisal": self.surprisal.numpy()}


def score_states(D, states, hp: StepConfig):
    """Record one batch of states (h0..h5) by the step's D path (losses.d_terms, hp.d_gradients)."""
    autocast = torch.autocast(states[0].device.type, dtype=torch.bfloat16, enabled=hp.amp)
    with autocast:
        score, grads, _ = losses.d_terms(D, losses.as_data(states, torch.float32), hp, graph=False)
    score = score.detach().float()
    gate = torch.stack([g.detach().float().flatten(1).abs().sum(dim=1) for g in grads[1:]], dim=1)
    return Recording(score.cpu(), gate.cpu(), losses.surprisal_weights(score).cpu())


def record_passes(nets, hp, network, inputs):
    """Score the state `network` (nets.inference or nets.generator) makes of each batch of inputs,
    each batch as one (score_states), the networks in training mode."""
    out = []
    with training_mode(nets):
        for x in inputs:
            with torch.no_grad():
                states = network(x)
                # G's prediction is deterministic: recording it draws no random number
                surprisal = losses.generator_prediction_errors(nets.generator, states).float().cpu()
            out.append(dataclasses.replace(score_states(nets.discriminator, states, hp), surprisal=surprisal))
    return Recording.cat(out)


def record_images(nets, hp, images, batch_size):
    """Wake states of images in [-1, 1], scored batch by batch (one size; a remainder is dropped)."""
    n = len(images) // batch_size * batch_size
    return record_passes(nets, hp, nets.inference, images[:n].split(batch_size))


def record_oddball(nets, hp, probes, familiar, per_batch, batch_size):
    """The oddball design: per_batch probes at the end of each batch of batch_size, the rest familiar
    images (taken in turn, over again where they run out), each batch scored as one. (Recording of
    the probes, Recording of their familiar batch-mates), both in batch order, so that batch i's
    probes are rows i*per_batch.. and its mates rows i*(batch_size - per_batch)..."""
    n, mates = len(probes) // per_batch, batch_size - per_batch
    turn = torch.arange(n * mates) % len(familiar)
    batches = [torch.cat([familiar[turn[i * mates:(i + 1) * mates].to(familiar.device)],
                          probes[i * per_batch:(i + 1) * per_batch]]) for i in range(n)]
    recorded = record_passes(nets, hp, nets.inference, batches)
    is_probe = torch.arange(n * batch_size) % batch_size >= mates
    return recorded.select(is_probe), recorded.select(~is_probe)


def record_dreams(nets, hp, n, batch_size, device):
    """Sleep states G dreams from z ~ N(0, 1), scored as record_images scores wake states."""
    z = (torch.randn(batch_size, nets.cfg.noise_dim, 1, 1, device=device) for _ in range(n // batch_size))
    return record_passes(nets, hp, nets.generator, z)  # each z drawn just before its pass, as before


class NoveltyGap:
    """The mean signal on a fixed batch of training images and on one of held-out images, which the
    training loop records every epoch: the novelty gap as it forms. Its own seeded random numbers and
    kept buffers, so that the run's steps, and exact resume, are as without it."""

    SIZE = 64

    def __init__(self, familiar, heldout, device):
        n = min(len(familiar), len(heldout))  # one batch size for both (D's minibatch std)
        self.familiar, self.heldout, self.device = familiar[:n].to(device), heldout[:n].to(device), device

    @classmethod
    def of_run(cls, batches, dataset, root, image_size, batch_size, device, classes=None):
        """For a run's training batches and data (of its --classes); None (said once) where there is no
        held-out split to compare with. Digits, MNIST and CIFAR-10 only (their batches hold every
        training image, which are drawn from there rather than read again): listing an image folder
        (all of ImageNet's files) is not worth it."""
        if not isinstance(batches, TensorBatches):
            return None
        n = min(cls.SIZE, batch_size)
        try:
            familiar = seeded_draw(batches.images, n, seed=1)  # what split_images(..., True, n, 1) would read
            heldout = split_images(dataset, root, image_size, False, n, seed=1, classes=classes)
        except DataError as e:
            print(f"note: the novelty gap (signal_train, signal_heldout in metrics.csv) is not recorded: {e}",
                  file=sys.stderr)
            return None
        return cls(familiar, heldout, device) if min(len(familiar), len(heldout)) >= 2 else None

    def __call__(self, nets, hp):
        with isolated_rng(0):
            train = record_images(nets, hp, self.familiar, len(self.familiar)).signal.mean().item()
            heldout = record_images(nets, hp, self.heldout, len(self.heldout)).signal.mean().item()
        return {"signal_train": train, "signal_heldout": heldout}
