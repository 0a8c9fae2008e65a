"""The experiments neuromodulation.py puts a trained model through (docs/neuromodulation.md).

Each returns recordings (recording.Recording: each input's signal, gate, weight and generative
surprisal); neuromodulation.py turns them into effects, tables and figures.

- wake_sleep: wake states of training images against sleep states G dreams.
- novelty: familiar (training split), novel exemplars (test split), novel classes (test images of
  labels the run never saw, train.py --classes) and out-of-distribution inputs.
- dose_response: the familiar images moved away from the data step by step along several axes.
- plasticity: what F's weights do with each condition: D's gradient into F, and F's Adam update,
  from whole training steps and from D's term alone (gate_step).
- familiarization: training goes on, on streams of repeated images with rare novel ones, and on
  control streams of as many images with no repetition (control_stream).

Each runs on a Subject: the trained networks, or a control (the same networks at initialization,
an early checkpoint), with the Adam state training goes on from. Every draw comes from Setup.seed,
the run's own seed unless --seed is given.

Two designs score a condition. Whole-batch: batches of its own, as training scores a batch. But in
training mode F's BatchNorm normalizes a batch by its own statistics and D's minibatch-std feature
is shared by it, so a whole-batch effect mixes each input's response with its batch's. Oddball: a
few probes in each batch of familiar inputs, compared with their own batch-mates, so the batch is
familiar for both. The difference of the two is the batch effect, measured.
"""
import copy
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import losses
from data import class_labels, split_images
from losses import StepConfig
from models import Networks
from recording import record_dreams, record_images, record_oddball
from step import NonFiniteError, _update, make_optimizers, training_mode, training_step
from utils import UserError, progress_bar

FAMILIAR = "familiar: training split"
DOSE_AXES = ("contrast", "shuffle", "noise", "mixture")
DOSE_LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def condition_seed(seed, name):
    """Each condition's own seed: its records do not depend on which other conditions ran."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63


# --- Inputs -----------------------------------------------------------------------------------------

def with_channels(images, channels):
    """images with the model's channels: (images, None), or converted and a phrase saying how."""
    if images.size(1) == channels:
        return images, None
    if channels == 1:
        return images.mean(dim=1, keepdim=True), f"averaged from {images.size(1)} channels to 1"
    if images.size(1) == 1:
        return images.expand(-1, channels, -1, -1).contiguous(), f"1 channel repeated to {channels}"
    raise UserError(f"cannot turn {images.size(1)}-channel images into the model's {channels} channels")


def pixel_shuffled(images, seed, fraction=1.0):
    """Each image with a random `fraction` of its pixel positions permuted among themselves (an order
    of its own): at 1, the image's pixel statistics without its shape."""
    gen = torch.Generator().manual_seed(seed)
    flat = images.flatten(2).clone()
    P = flat.size(2)
    k = int(round(fraction * P))
    for i in range(len(images)):
        chosen = torch.randperm(P, generator=gen)[:k]
        flat[i, :, chosen] = flat[i, :, chosen[torch.randperm(k, generator=gen)]]
    return flat.view_as(images)


def perturbed(axis, images, level, seed, other=None):
    """The images moved a distance `level` in [0, 1] along `axis`; level 0 leaves them as they are.

    contrast: x (1 - 2 level), from the image to its negative; shuffle: that fraction of pixels
    shuffled; noise: x + level N(0, 1), clipped to the pixel range; mixture: (1 - level) x + level o,
    towards `other`, out-of-distribution images."""
    if level == 0:
        return images
    if axis == "contrast":
        return images * (1 - 2 * level)
    if axis == "shuffle":
        return pixel_shuffled(images.cpu(), seed, level).to(images.device)
    if axis == "noise":
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
        return (images + level * noise.to(images.device)).clamp(-1, 1)
    if axis == "mixture":
        return (1 - level) * images + level * other[:len(images)]
    raise ValueError(axis)


# --- The model and its inputs -----------------------------------------------------------------------

@dataclass
class Setup:
    args: object  # neuromodulation.py's flags
    nets: Networks
    hp: StepConfig
    run_flags: object  # the run's train.py flags
    state: dict
    checkpoint: str
    dataset: str
    data: str
    device: torch.device
    # The seed that draws every input, oddball position, stream and noise: the run's own (its
    # checkpoint's) unless --seed is given, so that runs of several seeds are independent draws of
    # images as well as of weights; seed_from says which ("run" or "--seed").
    seed: int
    seed_from: str

    def images(self, train, n, name, classes="run"):
        """n images of a split, seeded by name: of the run's classes (train.py --classes), or of `classes`."""
        if classes == "run":
            classes = self.run_flags.classes if self.dataset == self.run_flags.dataset else None
        seed = condition_seed(self.seed, name)
        return split_images(self.dataset, self.data, self.nets.cfg.image_size, train, n, seed, classes).to(self.device)

    def novel_classes(self):
        """The labels the run never trained on (none without --classes, or on another dataset)."""
        if self.run_flags.classes is None or self.dataset != self.run_flags.dataset:
            return []
        return [c for c in class_labels(self.dataset, self.data) if c not in self.run_flags.classes]

    def ood(self, n):
        """--ood-dataset's test images, in the model's channels and size (None without the flag)."""
        a = self.args
        if not a.ood_dataset:
            return None
        ood = split_images(a.ood_dataset, a.ood_data, self.nets.cfg.image_size, False, n,
                           condition_seed(self.seed, "ood"))
        ood, how = with_channels(ood, self.nets.cfg.channels)
        if len(ood) < a.batch_size:
            raise UserError(f"--ood-data {a.ood_data} holds {len(ood)} images, fewer than one batch (-b {a.batch_size})")
        return ood.to(self.device), how

    def record(self, name, images, nets=None):
        """The whole-batch design: the images in batches of their own, from the condition's seed."""
        if len(images) < self.args.batch_size:
            raise UserError(f"{name}: {len(images)} images, fewer than one batch (-b {self.args.batch_size})")
        torch.manual_seed(condition_seed(self.seed, name))
        return record_images(nets or self.nets, self.hp, images, self.args.batch_size)

    def record_oddball(self, name, probes, familiar, nets=None):
        """The oddball design: --oddballs probes in each batch of familiar images, from the condition's seed."""
        a = self.args
        torch.manual_seed(condition_seed(self.seed, "oddball " + name))
        return record_oddball(nets or self.nets, self.hp, probes[:a.n_oddball], familiar, a.oddballs, a.batch_size)


@dataclass
class Subject:
    """Networks an experiment is run on: the trained ones, or a control beside them. `optimizers`
    holds the Adam states that training goes on from (plasticity, familiarization); None is fresh
    Adam, as a run starts. epoch and steps say how far the networks trained."""
    label: str  # "trained", "initialization", "early" or "epoch E": the name its effects carry
    nets: Networks
    optimizers: dict = None
    epoch: int = None
    steps: int = None


def steps_of(state):
    """Training steps behind a checkpoint: each finished epoch's (its history row) and the current one's."""
    return sum(row.get("steps", 0) for row in state.get("history") or []) + (state.get("step") or 0)


def of_checkpoint(label, state, nets):
    """A checkpoint's networks in training mode; a missing optimizer state is refused by the
    experiments that continue training (an empty one: not None, which is fresh Adam)."""
    nets.train()
    return Subject(label, nets, state.get("optimizers") or {}, state.get("epoch"), steps_of(state))


def trained(s: Setup):
    return of_checkpoint("trained", s.state, s.nets)


def initial_networks(s: Setup):
    """The run's networks as train.py initializes them (same flags, the run's own seed whatever
    --seed says), untrained, with fresh Adam: the control for an effect of the architecture, the
    images or D's penalty rather than of learning."""
    nets = checkpoint.initial_networks(s.nets.cfg, s.state.get("seed") or 0, s.device)
    nets.train()
    return Subject("initialization", nets, None, 0, 0)


# --- The experiments --------------------------------------------------------------------------------

def wake_sleep(s: Setup, nets=None):
    """Wake states of training images against sleep states G dreams, by `nets` (the run's by
    default): [(condition, Recording)], the reference."""
    n, nets = s.args.n_images, nets or s.nets
    wake = s.record("wake", s.images(True, n, "familiar"), nets)
    torch.manual_seed(condition_seed(s.seed, "sleep"))
    sleep = record_dreams(nets, s.hp, n, s.args.batch_size, s.device)
    return [("wake: training images", wake), ("sleep: dreams of G", sleep)], "sleep: dreams of G"


def novelty_inputs(s: Setup):
    """[(condition, images)]: familiar, novel exemplar, novel class (where the run left classes out),
    pixels shuffled, contrast inverted, and --ood-dataset."""
    n = s.args.n_images
    novel = s.images(False, n, "novel")
    conditions = [(FAMILIAR, s.images(True, n, "familiar")), ("novel: test split", novel)]
    other = s.novel_classes()
    if other:
        conditions.append((f"novel class: test split, labels {' '.join(map(str, other))}",
                           s.images(False, n, "novel class", classes=other)))
    conditions += [("OOD: test split, pixels shuffled", pixel_shuffled(novel.cpu(), s.seed).to(s.device)),
                   ("OOD: test split, contrast inverted", -novel)]
    ood = s.ood(n)
    if ood is not None:
        print(f"--ood-dataset {s.args.ood_dataset}: {len(ood[0])} test images, resized to "
              f"{s.nets.cfg.image_size}x{s.nets.cfg.image_size}" + (f", {ood[1]}" if ood[1] else ""))
        conditions.append((f"OOD: {s.args.ood_dataset}", ood[0]))
    return conditions


def oddball_familiar(s: Setup):
    """The familiar images of the oddball batches, drawn apart from the familiar condition's."""
    return s.images(True, s.args.n_images, "oddball familiar")


def novelty(s: Setup, conditions, nets=None):
    """Each of novelty_inputs' conditions in both designs, by `nets` (the run's by default):
    {condition: Recording} (whole-batch) and {condition: (probes, batch-mates)} (oddball, every
    condition but the familiar)."""
    familiar = oddball_familiar(s)
    whole = {name: s.record(name, x, nets) for name, x in conditions}
    oddball = {name: s.record_oddball(name, x, familiar, nets) for name, x in conditions if name != FAMILIAR}
    return whole, oddball


def dose_inputs(s: Setup):
    """The familiar condition's images, the out-of-distribution images the mixture axis moves
    towards (--ood-dataset's, or else the test split with its pixels shuffled), and the familiar
    images of the oddball batches: drawn once for the trained networks and every control."""
    base = s.images(True, s.args.n_images, "familiar")
    ood = s.ood(len(base))
    other = ood[0] if ood is not None else pixel_shuffled(s.images(False, len(base), "novel").cpu(), s.seed)
    if len(other) < len(base):
        other = other.repeat((len(base) + len(other) - 1) // len(other), 1, 1, 1)
    return base, other[:len(base)].to(s.device), oddball_familiar(s)


def dose_response(s: Setup, nets=None, inputs=None):
    """{axis: [(level, whole-batch Recording, (probes, batch-mates))]} for the networks `nets` (the
    run's by default). Level 0 is the familiar condition itself, from its own seed, so it equals
    the novelty experiment's familiar records; the same images are moved at every level."""
    base, other, familiar = inputs or dose_inputs(s)
    at_zero = s.record(FAMILIAR, base, nets), s.record_oddball(FAMILIAR, base, familiar, nets)
    curves = {}
    for axis in DOSE_AXES:
        curves[axis] = [(0.0, *at_zero)]
        for level in DOSE_LEVELS[1:]:
            name = f"dose {axis} {level:g}"
            x = perturbed(axis, base, level, condition_seed(s.seed, name), other)
            curves[axis].append((level, s.record(name, x, nets), s.record_oddball(name, x, familiar, nets)))
    return curves


# --- Plasticity: does the gate move F's weights? ----------------------------------------------------

def _flat_parameters(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def adversarial_gradient(nets, hp, x):
    """(F's parameters, d L_F / d each) for L_F = gamma mean_b D(F(x))_b, the term F descends to
    lower D's score of its wake states (docs/algorithm.md): the gradient F's weights get from D
    for the batch x, as the training step takes it (losses.d_terms, losses.inference_follows), the
    networks in training mode; None for a parameter D's term does not reach."""
    F = nets.inference
    with training_mode(nets):
        wake = F(x)
        _, grads, _ = losses.d_terms(nets.discriminator, losses.as_data(wake, x.dtype), hp, graph=False)
        follows = losses.inference_follows(wake, grads, hp.gamma)
        params = [p for p in F.parameters() if p.requires_grad]
        return params, torch.autograd.grad(follows, params, allow_unused=True)


def adversarial_gradient_norm(nets, hp, x):
    """||d L_F / d theta_F|| for the batch x (adversarial_gradient)."""
    _, g = adversarial_gradient(nets, hp, x)
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in g if t is not None)))


def gate_step(nets, optimizers, x, hp):
    """One step of F on D's term alone, L_F = gamma mean_b D(F(x))_b, through F's own Adam state, with
    the step's check and clipping (step._update): the update D's gate makes, without the readout
    critic and the KL term that a whole training step adds at gamma < 1. Only F moves."""
    params, grads = adversarial_gradient(nets, hp, x)
    for p in nets.inference.parameters():
        p.grad = None
    for p, g in zip(params, grads):
        p.grad = g
    _update(nets, optimizers, ["inference"], {}, hp, check_finite=True, average=None)


def plasticity(s: Setup, conditions, subject=None):
    """For each (condition, images): D's gradient into F per batch (its norm), and the size of F's
    Adam update after one step and after --sustained-steps on batches of the condition, two ways:
    whole training steps, and F's steps on D's term alone (gate_step, D fixed). Each from the
    subject's networks and optimizer state (the trained ones by default; on copies: the loaded model
    and the file stay as they were).
    {condition: {"gradient": [per batch], "update_1", "update_n", "gate_update_1", "gate_update_n"}}."""
    B, out, subject = s.args.batch_size, {}, subject or trained(s)
    for name, x in progress_bar(conditions, desc="plasticity", unit="condition", leave=False):
        batches = list(x[:len(x) // B * B].split(B))
        torch.manual_seed(condition_seed(s.seed, "plasticity " + name))
        gradient = [adversarial_gradient_norm(subject.nets, s.hp, b) for b in batches]
        whole = _update_sizes(s, subject, batches, training_step, name)
        torch.manual_seed(condition_seed(s.seed, "plasticity, the gate alone, " + name))
        gate = _update_sizes(s, subject, batches, gate_step, name)
        out[name] = {"gradient": gradient, "update_1": whole[0], "update_n": whole[-1], "gate_update_1": gate[0],
                     "gate_update_n": gate[-1]}
    return out


def _update_sizes(s: Setup, subject, batches, step, name):
    """||theta_F - theta_F at the start|| after each of --sustained-steps steps `step` (training_step or
    gate_step) on the batches in turn, from a copy of the subject's networks and Adam state."""
    nets = copy.deepcopy(subject.nets)
    optimizers = _optimizers_of(s, nets, subject)
    start, sizes = _flat_parameters(nets.inference), []
    for t in range(s.args.sustained_steps):
        try:
            step(nets, optimizers, batches[t % len(batches)], s.hp)
        except NonFiniteError as e:
            raise UserError(f"plasticity, {name}, step {t + 1}: non-finite {e}; nothing was written") from None
        sizes.append(float((_flat_parameters(nets.inference) - start).norm()))
    return sizes


def _optimizers_of(s: Setup, nets, subject):
    """Adam for `nets`, a copy of the subject's networks, from the subject's optimizer state (fresh
    where it has none: the networks at initialization)."""
    optimizers = make_optimizers(nets, s.run_flags)
    if subject.optimizers is None:
        return optimizers
    try:
        for name, opt in optimizers.items():
            # a copy: Adam's load_state_dict keeps the very tensors it is given and steps them in
            # place, so every condition and stream after the first would start from a moved state
            opt.load_state_dict(copy.deepcopy(subject.optimizers[name]))
    except (KeyError, ValueError) as e:
        raise UserError(f"the {subject.label} networks' checkpoint has no usable optimizer state to continue "
                        f"training from ({e})") from None
    return optimizers


# --- Familiarization ---------------------------------------------------------------------------------

@dataclass
class Stream:
    """What one familiarization stream recorded: per step t and batch position, the signal, the gate
    (summed over h1..h5) and who was shown (index into the repeated set, or -1 for a novel image)."""
    signal: np.ndarray  # (T, K)
    gate: np.ndarray  # (T, K)
    shown: np.ndarray  # (T, K) int

    def repeated(self, key):
        """The values of `key` of the repeated images, NaN where a novel image stood: (T, K)."""
        return np.where(self.shown >= 0, getattr(self, key), np.nan)


def familiarization(s: Setup, stream_index, subject=None):
    """Training goes on from the subject's networks and optimizers (the trained ones by default),
    with the run's step and flags, on a stream of batches of K repeated test images, in which a
    novel test image replaces one of them at random steps. Each batch is recorded before the step it
    trains. Every stream has its own images and seed, the same for every subject; the networks are a
    copy: the loaded model and the file on disk stay as they were."""
    args = s.args
    K, T = args.repeats, args.presentations
    pool = s.images(False, 10 ** 9, f"familiarization {stream_index}")
    if len(pool) <= K:
        raise UserError(f"--repeats {K} needs more than {K} test images (a repeated set and novel ones); the "
                        f"test split has {len(pool)}")
    # the stream drawn first, from a generator of its own: the networks' noise is not among its draws
    gen = torch.Generator().manual_seed(condition_seed(s.seed, f"stream {stream_index}"))
    repeated, novel = pool[:K], pool[K:]
    batches, shown_by_step, used, wanted = [], [], 0, 0
    for _ in range(T):
        batch, shown = repeated.clone(), torch.arange(K)
        wanted += torch.rand((), generator=gen).item() < args.novel_rate
        if wanted > used and used < len(novel):
            position = int(torch.randint(K, (), generator=gen))
            batch[position], shown[position] = novel[used], -1
            used += 1
        batches.append(batch)
        shown_by_step.append(shown.numpy())
    if wanted > used:
        print(f"note: the {len(novel)} novel test images ran out; {wanted - used} insertions were not made",
              file=sys.stderr)
    torch.manual_seed(condition_seed(s.seed, f"familiarization noise {stream_index}"))
    signal, gate = _train_on(s, subject or trained(s), batches, f"familiarization, stream {stream_index + 1}")
    return Stream(signal, gate, np.stack(shown_by_step))


def control_stream(s: Setup, stream_index, subject=None):
    """The control of familiarization's stream: as long, with batches as large, of test images with
    no repetition (each step K images the stream has not shown), so that what training on any
    stream does to the scores (its drift) is measured apart from repetition. Where the test split
    holds fewer than K x T images, they recur only once all have been shown: (Stream with every
    image marked novel, -1; the steps after which images recur, or None)."""
    K, T = s.args.repeats, s.args.presentations
    pool = s.images(False, 10 ** 9, f"familiarization control {stream_index}")
    order = torch.arange(K * T) % len(pool)
    batches = [pool[order[t * K:(t + 1) * K].to(pool.device)] for t in range(T)]
    torch.manual_seed(condition_seed(s.seed, f"familiarization control noise {stream_index}"))
    signal, gate = _train_on(s, subject or trained(s), batches, f"control stream {stream_index + 1}")
    recur = len(pool) // K if len(pool) < K * T else None
    return Stream(signal, gate, np.full((T, K), -1)), recur


def _train_on(s: Setup, subject, batches, name):
    """Each batch recorded, then trained on by the run's step, from a copy of the subject's networks
    and Adam state: the (T, K) signal and gate (summed over h1..h5)."""
    nets = copy.deepcopy(subject.nets)
    optimizers = _optimizers_of(s, nets, subject)
    values = []
    for t, batch in enumerate(progress_bar(batches, desc=name, unit="step", leave=False)):
        values.append(record_images(nets, s.hp, batch, len(batch)).numpy())
        try:
            training_step(nets, optimizers, batch, s.hp)
        except NonFiniteError as e:
            raise UserError(f"{name}, step {t + 1}: non-finite {e}; nothing was written") from None
    return tuple(np.stack([v[k] for v in values]) for k in ("signal", "gate"))
