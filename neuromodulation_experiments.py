"""The experiments neuromodulation.py puts a trained model through (docs/neuromodulation.md).

Each returns recordings (recording.Recording: each input's signal, gate, weight and generative
surprisal); neuromodulation.py turns them into effects, tables and figures.

- wake_sleep: wake states of training images against sleep states G dreams.
- novelty: familiar (training split), novel exemplars (test split), novel classes (test images of
  labels the run never saw, train.py --classes) and out-of-distribution inputs.
- dose_response: the familiar images moved away from the data step by step along several axes.
- plasticity: what F's weights do with each condition: D's gradient into F, and F's Adam update.
- familiarization: training goes on, on streams of repeated images with rare novel ones.

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

import losses
from data import class_labels, split_images
from losses import StepConfig
from models import Networks
from recording import record_dreams, record_images, record_oddball
from step import NonFiniteError, make_optimizers, training_mode, training_step
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

    def images(self, train, n, name, classes="run"):
        """n images of a split, seeded by name: of the run's classes (train.py --classes), or of `classes`."""
        if classes == "run":
            classes = self.run_flags.classes if self.dataset == self.run_flags.dataset else None
        seed = condition_seed(self.args.seed, name)
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
                           condition_seed(a.seed, "ood"))
        ood, how = with_channels(ood, self.nets.cfg.channels)
        if len(ood) < a.batch_size:
            raise UserError(f"--ood-data {a.ood_data} holds {len(ood)} images, fewer than one batch (-b {a.batch_size})")
        return ood.to(self.device), how

    def record(self, name, images, nets=None):
        """The whole-batch design: the images in batches of their own, from the condition's seed."""
        if len(images) < self.args.batch_size:
            raise UserError(f"{name}: {len(images)} images, fewer than one batch (-b {self.args.batch_size})")
        torch.manual_seed(condition_seed(self.args.seed, name))
        return record_images(nets or self.nets, self.hp, images, self.args.batch_size)

    def record_oddball(self, name, probes, familiar, nets=None):
        """The oddball design: --oddballs probes in each batch of familiar images, from the condition's seed."""
        a = self.args
        torch.manual_seed(condition_seed(a.seed, "oddball " + name))
        return record_oddball(nets or self.nets, self.hp, probes[:a.n_oddball], familiar, a.oddballs, a.batch_size)


def initial_networks(s: Setup):
    """The run's networks as train.py initializes them (same flags, same seed), untrained: the control
    for an effect of the architecture or of D's penalty rather than of learning."""
    torch.manual_seed(s.state.get("seed") or 0)
    nets = Networks(s.nets.cfg).to(s.device)
    nets.train()
    return nets


# --- The experiments --------------------------------------------------------------------------------

def wake_sleep(s: Setup):
    """Wake states of training images against sleep states G dreams: [(condition, Recording)], the reference."""
    n = s.args.n_images
    wake = s.record("wake", s.images(True, n, "familiar"))
    torch.manual_seed(condition_seed(s.args.seed, "sleep"))
    sleep = record_dreams(s.nets, s.hp, n, s.args.batch_size, s.device)
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
    conditions += [("OOD: test split, pixels shuffled", pixel_shuffled(novel.cpu(), s.args.seed).to(s.device)),
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


def novelty(s: Setup, conditions):
    """Each of novelty_inputs' conditions in both designs: {condition: Recording} (whole-batch) and
    {condition: (probes, batch-mates)} (oddball, every condition but the familiar)."""
    familiar = oddball_familiar(s)
    whole = {name: s.record(name, x) for name, x in conditions}
    oddball = {name: s.record_oddball(name, x, familiar) for name, x in conditions if name != FAMILIAR}
    return whole, oddball


def dose_inputs(s: Setup):
    """The familiar condition's images, the out-of-distribution images the mixture axis moves
    towards (--ood-dataset's, or else the test split with its pixels shuffled), and the familiar
    images of the oddball batches: drawn once for the trained networks and every control."""
    base = s.images(True, s.args.n_images, "familiar")
    ood = s.ood(len(base))
    other = ood[0] if ood is not None else pixel_shuffled(s.images(False, len(base), "novel").cpu(), s.args.seed)
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
            x = perturbed(axis, base, level, condition_seed(s.args.seed, name), other)
            curves[axis].append((level, s.record(name, x, nets), s.record_oddball(name, x, familiar, nets)))
    return curves


# --- Plasticity: does the gate move F's weights? ----------------------------------------------------

def _flat_parameters(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def adversarial_gradient_norm(nets, hp, x):
    """||d (gamma mean_b D(F(x))_b) / d theta_F||: the gradient F's weights get from D for the batch x,
    as the training step takes it (losses.inference_follows), the networks in training mode."""
    F = nets.inference
    with training_mode(nets):
        wake = F(x)
        _, grads, _ = losses.d_terms(nets.discriminator, losses.as_data(wake, x.dtype), hp, graph=False)
        follows = losses.inference_follows(wake, grads, hp.gamma)
        params = [p for p in F.parameters() if p.requires_grad]
        g = torch.autograd.grad(follows, params, allow_unused=True)
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in g if t is not None)))


def plasticity(s: Setup, conditions):
    """For each (condition, images): D's gradient into F per batch (its norm), and the size of F's
    actual Adam update after one training step and after --sustained-steps on batches of the
    condition, each from the checkpoint's networks and optimizer state (on a copy: the loaded
    model and the file stay as they were). {condition: {"gradient": [per batch], "update_1", "update_n"}}."""
    B, out = s.args.batch_size, {}
    for name, x in progress_bar(conditions, desc="plasticity", unit="condition", leave=False):
        batches = list(x[:len(x) // B * B].split(B))
        torch.manual_seed(condition_seed(s.args.seed, "plasticity " + name))
        gradient = [adversarial_gradient_norm(s.nets, s.hp, b) for b in batches]
        nets = copy.deepcopy(s.nets)
        optimizers = _optimizers_of(s, nets)
        start, sizes = _flat_parameters(nets.inference), []
        for t in range(s.args.sustained_steps):
            try:
                training_step(nets, optimizers, batches[t % len(batches)], s.hp)
            except NonFiniteError as e:
                raise UserError(f"plasticity, {name}, step {t + 1}: non-finite {e}; nothing was written") from None
            sizes.append(float((_flat_parameters(nets.inference) - start).norm()))
        out[name] = {"gradient": gradient, "update_1": sizes[0], "update_n": sizes[-1]}
    return out


def _optimizers_of(s: Setup, nets=None):
    """Adam for `nets` (the run's), from the checkpoint's optimizer state."""
    optimizers = make_optimizers(nets or s.nets, s.run_flags)
    try:
        for name, opt in optimizers.items():
            opt.load_state_dict(s.state["optimizers"][name])
    except (KeyError, ValueError) as e:
        raise UserError(f"{s.checkpoint} has no usable optimizer state to continue training from ({e})") from None
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


def familiarization(s: Setup, stream_index):
    """Training goes on from the checkpoint (its optimizers too), with the run's step and flags, on a
    stream of batches of K repeated test images, in which a novel test image replaces one of them at
    random steps. Each batch is recorded before the step it trains. Every stream has its own images
    and seed; the networks are a copy: the loaded model and the file on disk stay as they were."""
    args = s.args
    K, T = args.repeats, args.presentations
    pool = s.images(False, 10 ** 9, f"familiarization {stream_index}")
    if len(pool) <= K:
        raise UserError(f"--repeats {K} needs more than {K} test images (a repeated set and novel ones); the "
                        f"test split has {len(pool)}")
    nets = copy.deepcopy(s.nets)
    optimizers = _optimizers_of(s, nets)
    gen = torch.Generator().manual_seed(condition_seed(args.seed, f"stream {stream_index}"))
    repeated, novel = pool[:K], pool[K:]
    torch.manual_seed(condition_seed(args.seed, f"familiarization noise {stream_index}"))
    rows, used, wanted = [], 0, 0
    for t in progress_bar(range(T), desc=f"familiarization, stream {stream_index + 1}", unit="step", leave=False):
        batch, shown = repeated.clone(), torch.arange(K)
        wanted += torch.rand((), generator=gen).item() < args.novel_rate
        if wanted > used and used < len(novel):
            position = int(torch.randint(K, (), generator=gen))
            batch[position], shown[position] = novel[used], -1
            used += 1
        rows.append((record_images(nets, s.hp, batch, K), shown))
        try:
            training_step(nets, optimizers, batch, s.hp)
        except NonFiniteError as e:
            raise UserError(f"familiarization step {t + 1}: non-finite {e}; nothing was written") from None
    if wanted > used:
        print(f"note: the {len(novel)} novel test images ran out; {wanted - used} insertions were not made",
              file=sys.stderr)
    values = [r.numpy() for r, _ in rows]
    return Stream(*(np.stack([v[k] for v in values]) for k in ("signal", "gate")),
                  np.stack([shown.numpy() for _, shown in rows]))
