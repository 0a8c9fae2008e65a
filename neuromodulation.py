#!/usr/bin/env python
"""The wake/sleep discriminator as a neuromodulator: record it, and put a trained model through
the protocols by which cholinergic and novelty responses are studied (docs/neuromodulation.md).

    python neuromodulation.py --path RUN                       # the three experiments, on the run's data
    python neuromodulation.py --path RUN --experiments novelty --ood-dataset cifar10 --ood-data CIFAR

The paper maps D's score of the network's state onto a neuromodulator (#1, putatively
acetylcholine): high in wake, pushed down in sleep, and projected back to gate the plasticity of
the feedforward (inference) connections. recording.py records each input's signal, gate and weight
by the training step's own code (the weight only for runs trained with --scale-gen-surprisal-by-D,
the one place it acts); every condition here is scored in batches of its own, all of one
size (-b), and with its own seed.

Experiments: wake-sleep (wake states of training images against sleep states dreamed by G);
novelty (familiar training images, novel test images, and out-of-distribution inputs); and
familiarization (training goes on, with the run's own step and flags, on a stream where K images
repeat and novel images replace one of them now and then; the checkpoint on disk is never written).
Each prints a table of means, spreads and effect sizes (AUROC with a bootstrap interval over the
scored batches), appends one JSON line per condition to --json, and with matplotlib draws a figure
into --out.
"""
import argparse
import datetime
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import train
from checkpoint import add_checkpoint_flags, dataset_of, load_networks, resolve_checkpoint_path
from data import DATASETS, channels_of, split_images
from losses import StepConfig
from recording import record_dreams, record_images
from step import NonFiniteError, check_d_gradients, make_optimizers, training_step
from utils import UserError, append_jsonl, pick_device, pyplot, run_main, unwritable_folder, write_figure, \
    write_json

EXPERIMENTS = ("wake-sleep", "novelty", "familiarization")
N_LAYERS = 5  # F's layers h1..h5, the ones D's gradient teaches


def get_parser():
    p = argparse.ArgumentParser(description="Record the wake/sleep discriminator as a neuromodulator",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    p.add_argument("-b", "--batch-size", type=int, default=100,
                   help="the one size of every scored batch (D's minibatch std couples a batch's samples)")
    p.add_argument("--n-images", type=int, default=1000, help="inputs per condition (a multiple of -b is used)")
    p.add_argument("--ood-dataset", default=None, choices=DATASETS,
                   help="an out-of-distribution dataset (its test split), e.g. cifar10 for an MNIST model; "
                        "converted to the model's channels and resized to its image size")
    p.add_argument("--ood-data", default=None, metavar="DIR", help="the root of --ood-dataset")
    p.add_argument("--repeats", type=int, default=32, metavar="K",
                   help="familiarization: the repeated set, K test images (also the batch of every step)")
    p.add_argument("--presentations", type=int, default=200, help="familiarization: training steps on the stream")
    p.add_argument("--novel-rate", type=float, default=0.25,
                   help="familiarization: chance that a step's batch has one repeated image replaced by a novel one")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of each bootstrap interval")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs drawn, the networks' noise and the stream")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    p.add_argument("--json", default=None, metavar="FILE.jsonl", help="append one record per condition here")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the figures and records.json (default: neuromodulation/ beside the checkpoint)")
    return p


def check_args(args, parser):
    problems = [f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}"
                for k in ("n_images", "repeats", "presentations", "bootstrap") if getattr(args, k) < 1]
    if args.seed < 0:  # numpy's generators (the bootstrap) take no negative seed
        problems.append(f"--seed must not be negative, got {args.seed}")
    if args.batch_size < 2:
        problems.append(f"-b must be at least 2 (BatchNorm and the minibatch std need two samples), got "
                        f"{args.batch_size}")
    elif args.n_images < args.batch_size:
        problems.append(f"--n-images {args.n_images} is less than one batch (-b {args.batch_size})")
    if args.repeats < 2:
        problems.append("--repeats must be at least 2 (the stream's batch)")
    if not 0 <= args.novel_rate <= 1:
        problems.append(f"--novel-rate must lie in [0, 1], got {args.novel_rate}")
    if (args.ood_dataset is None) != (args.ood_data is None) and args.ood_dataset != "digits":
        problems.append("--ood-dataset and --ood-data go together (digits needs no --ood-data)")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        problems.append(f"--json {args.json}: its folder does not exist")
    if problems:
        parser.error("; ".join(problems))


def condition_seed(seed, name):
    """Each condition's own seed: its records do not depend on which other conditions ran."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2 ** 63


# --- Effect sizes -----------------------------------------------------------------------------------

def _average_ranks(x):
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = x.argsort(kind="stable")
    ordered = x[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]  # where a run of equal values begins
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(x)])
    ranks = np.empty(len(x))
    ranks[order] = (first + (counts + 1) / 2)[np.cumsum(starts) - 1]
    return ranks


def auroc(a, b):
    """P(a > b) for one value drawn from a and one from b, ties counting half: Mann-Whitney's U / (n_a n_b)."""
    ranks = _average_ranks(np.concatenate([a, b]))
    return float((ranks[:len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def bootstrap_interval(statistic, samples, reps, seed, batch_size=1, level=0.95):
    """Percentile interval of statistic(*resampled) over reps resamples of each sample, resampling
    whole batches of batch_size consecutive values (a sample's length is a multiple of it).

    The batches a condition was scored in are its independent draws, not its inputs: D's
    minibatch-std feature shifts the scores of one batch together."""
    rng = np.random.default_rng(seed)
    rows = [s.reshape(-1, batch_size) for s in samples]
    values = [statistic(*(r[rng.integers(0, len(r), len(r))].ravel() for r in rows)) for _ in range(reps)]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def compare(a, b, reps, seed, batch_size=1):
    """a against b: AUROC P(a > b) and the difference of means, each with a 95 % bootstrap interval
    over the batches each was scored in."""
    diff = lambda x, y: float(x.mean() - y.mean())  # noqa: E731
    return {"auroc": auroc(a, b), "auroc_ci": bootstrap_interval(auroc, (a, b), reps, seed, batch_size),
            "mean_difference": diff(a, b),
            "mean_difference_ci": bootstrap_interval(diff, (a, b), reps, seed, batch_size),
            "batches": [len(a) // batch_size, len(b) // batch_size]}


def summary(values):
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": int(len(values))}


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


def pixel_shuffled(images, seed):
    """Each image's pixels in a random order of its own: the digit's pixel statistics without its shape."""
    gen = torch.Generator().manual_seed(seed)
    flat = images.flatten(2)
    order = torch.stack([torch.randperm(flat.size(2), generator=gen) for _ in range(len(images))])
    return flat.gather(2, order.unsqueeze(1).expand_as(flat)).view_as(images)


# --- The three experiments --------------------------------------------------------------------------

@dataclass
class Setup:
    args: argparse.Namespace
    nets: object
    hp: StepConfig
    run_flags: argparse.Namespace
    state: dict
    checkpoint: str
    dataset: str
    data: str
    device: torch.device

    def images(self, train, n, name):
        """n images of the run's classes (train.py --classes) of a split of the dataset, seeded by name."""
        seed, classes = condition_seed(self.args.seed, name), self.run_flags.classes
        if self.dataset != self.run_flags.dataset:  # another dataset's labels are not the run's
            classes = None
        return split_images(self.dataset, self.data, self.nets.cfg.image_size, train, n, seed, classes).to(self.device)

    def record(self, name, images):
        if len(images) < self.args.batch_size:
            raise UserError(f"{name}: {len(images)} images, fewer than one batch (-b {self.args.batch_size})")
        torch.manual_seed(condition_seed(self.args.seed, name))
        return record_images(self.nets, self.hp, images, self.args.batch_size)


def wake_sleep(s: Setup):
    """Wake states of training images against sleep states G dreams: [(condition, Recording)], the reference."""
    n = s.args.n_images
    wake = s.record("wake", s.images(True, n, "familiar"))
    torch.manual_seed(condition_seed(s.args.seed, "sleep"))
    sleep = record_dreams(s.nets, s.hp, n, s.args.batch_size, s.device)
    return [("wake: training images", wake), ("sleep: dreams of G", sleep)], "sleep: dreams of G"


def novelty(s: Setup):
    """Familiar (training split), novel (test split) and out-of-distribution inputs."""
    n = s.args.n_images
    familiar = s.images(True, n, "familiar")
    novel = s.images(False, n, "novel")
    conditions = [("familiar: training split", familiar), ("novel: test split", novel),
                  ("OOD: test split, pixels shuffled", pixel_shuffled(novel.cpu(), s.args.seed).to(s.device)),
                  ("OOD: test split, contrast inverted", -novel)]
    if s.args.ood_dataset:
        ood = split_images(s.args.ood_dataset, s.args.ood_data, s.nets.cfg.image_size, False, n,
                           condition_seed(s.args.seed, "ood"))
        ood, how = with_channels(ood, s.nets.cfg.channels)
        print(f"--ood-dataset {s.args.ood_dataset}: {len(ood)} test images, resized to "
              f"{s.nets.cfg.image_size}x{s.nets.cfg.image_size}" + (f", {how}" if how else ""))
        if len(ood) < s.args.batch_size:
            raise UserError(f"--ood-data {s.args.ood_data} holds {len(ood)} images, fewer than one batch "
                            f"(-b {s.args.batch_size})")
        conditions.append((f"OOD: {s.args.ood_dataset}", ood.to(s.device)))
    return [(name, s.record(name, x)) for name, x in conditions], "familiar: training split"


@dataclass
class Stream:
    """What familiarization recorded: per step t and batch position, the signal, the gate (summed over
    h1..h5) and who was shown (index into the repeated set, or -1 for a novel image)."""
    signal: np.ndarray  # (T, K)
    gate: np.ndarray  # (T, K)
    shown: np.ndarray  # (T, K) int

    def repeated(self, key):
        """The values of `key` of the repeated images, NaN where a novel image stood: (T, K)."""
        return np.where(self.shown >= 0, getattr(self, key), np.nan)


def familiarization(s: Setup):
    """Training goes on from the checkpoint (its optimizers too), with the run's step and flags, on a
    stream of batches of K repeated test images, in which a novel test image replaces one of them at
    random steps. Each batch is recorded before the step it trains. The networks are a copy: the
    loaded model and the file on disk stay as they were."""
    import copy
    args = s.args
    K, T = args.repeats, args.presentations
    pool = s.images(False, 10 ** 9, "familiarization")
    if len(pool) <= K:
        raise UserError(f"--repeats {K} needs more than {K} test images (a repeated set and novel ones); the "
                        f"test split has {len(pool)}")
    nets = copy.deepcopy(s.nets)
    optimizers = make_optimizers(nets, s.run_flags)
    try:
        for name, opt in optimizers.items():
            opt.load_state_dict(s.state["optimizers"][name])
    except (KeyError, ValueError) as e:
        raise UserError(f"{s.checkpoint} has no usable optimizer state to continue training from ({e})") from None
    gen = torch.Generator().manual_seed(condition_seed(args.seed, "stream"))
    repeated, novel = pool[:K], pool[K:]
    torch.manual_seed(condition_seed(args.seed, "familiarization noise"))
    rows, used, wanted = [], 0, 0
    for t in tqdm(range(T), desc="familiarization", unit="step", leave=False):
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


def familiarization_effects(stream: Stream, reps, seed):
    """Habituation of the repeated set (each image's mean over the first tenth of the stream against
    its mean over the last tenth) and the novelty response (a novel image against the repeated images
    of its own batch), for the signal and the gate, each with a 95 % bootstrap interval. Repeated
    image i sits at position i. Tenths rather than single presentations: every step moves D, which
    can shift a whole batch's scores from one step to the next by more than images differ."""
    T, K = stream.shown.shape
    novel_t, novel_k = np.nonzero(stream.shown < 0)
    tenth = max(1, T // 10)
    early, late = slice(0, tenth), slice(T - tenth, T)
    effects = {"steps": T, "repeated": K, "novel_insertions": len(novel_t)}
    mean = lambda x: float(x.mean())  # noqa: E731
    for key in ("signal", "gate"):
        repeated = stream.repeated(key)
        first = np.nanmean(repeated[early], axis=0)
        change = np.nanmean(repeated[late], axis=0) - first
        effect = {"repeated_by_step": np.nanmean(repeated, axis=1).tolist(), "repeated_first_tenth": mean(first),
                  "repeated_last_tenth": float(np.nanmean(repeated[late])), "habituation": mean(change),
                  "habituation_ci": bootstrap_interval(mean, (change,), reps, seed)}
        if len(novel_t):
            novel = getattr(stream, key)[novel_t, novel_k]
            response = novel - np.nanmean(repeated[novel_t], axis=1)
            halves = np.array_split(response, 2)
            effect.update({
                "novel": novel.tolist(), "novel_steps": novel_t.tolist(),
                "novelty_response": mean(response),
                "novelty_response_ci": bootstrap_interval(mean, (response,), reps, seed),
                "novel_vs_repeated_auroc": auroc(novel, repeated[novel_t][~np.isnan(repeated[novel_t])]),
                "novelty_response_halves": [mean(h) if len(h) else None for h in halves],
                "novelty_response_halves_ci": [bootstrap_interval(mean, (h,), reps, seed) if len(h) > 1 else None
                                               for h in halves]})
        effects[key] = effect
    return effects


# --- Reporting: tables, JSON lines, figures ---------------------------------------------------------

def condition_records(s: Setup, experiment, conditions, reference):
    """One record per condition; every condition but the reference compared with it."""
    ref = dict(conditions)[reference].numpy()
    # The weight 2 sigmoid(-D) acts only in a run trained with --scale-gen-surprisal-by-D: elsewhere
    # it is a number nothing uses, and is not recorded.
    keys = ("signal", "gate", "weight") if s.run_flags.scale_gen_surprisal_by_D else ("signal", "gate")
    records = []
    for name, rec in conditions:
        values = rec.numpy()
        record = {"experiment": experiment, "condition": name, "n": len(rec.signal),
                  **{k: summary(values[k]) for k in keys},
                  "gate_by_layer": rec.gate.mean(dim=0).tolist()}
        if name != reference:
            record["against"] = reference
            record["comparison"] = {k: compare(values[k], ref[k], s.args.bootstrap, s.args.seed, s.args.batch_size)
                                    for k in ("signal", "gate")}
        records.append(record)
    return records


def _interval(ci):
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def print_conditions(title, records):
    reference = next(r["against"] for r in records if "against" in r)
    print(f"\n{title} (mean (sd) per input; AUROC = P(condition > {reference}), 95 % interval of a bootstrap "
          f"over the scored batches)")
    print(f"{'condition':<36} {'n':>5}  {'signal':>16}  {'gate (L1, h1..h5)':>18}  {'weight':>13}  "
          f"{'AUROC signal':>22}  {'AUROC gate':>22}")
    for r in records:
        cells = [f"{r[k]['mean']:.4g} ({r[k]['sd']:.2g})" if k in r else "unused" for k in ("signal", "gate", "weight")]
        comparison = r.get("comparison")
        aurocs = [f"{comparison[k]['auroc']:.3f} {_interval(comparison[k]['auroc_ci'])}" if comparison else "reference"
                  for k in ("signal", "gate")]
        print(f"{r['condition']:<36} {r['n']:>5}  {cells[0]:>16}  {cells[1]:>18}  {cells[2]:>13}  "
              f"{aurocs[0]:>22}  {aurocs[1]:>22}")


def print_familiarization(effects):
    print(f"\nfamiliarization: {effects['steps']} training steps on {effects['repeated']} repeated test images, "
          f"{effects['novel_insertions']} novel insertions (95 % bootstrap intervals)")
    for key in ("signal", "gate"):
        e = effects[key]
        line = (f"  {key:<6} repeated: first tenth {e['repeated_first_tenth']:.4g}, last tenth "
                f"{e['repeated_last_tenth']:.4g}, change {e['habituation']:.3g} {_interval(e['habituation_ci'])}")
        if "novelty_response" in e:
            halves = ", ".join("-" if h is None else f"{h:.3g}" for h in e["novelty_response_halves"])
            line += (f"\n         novel - repeated of the same batch: {e['novelty_response']:.3g} "
                     f"{_interval(e['novelty_response_ci'])} (first and second half of the stream: {halves}); "
                     f"AUROC novel vs repeated {e['novel_vs_repeated_auroc']:.3f}")
        print(line)


def plot_conditions(title, conditions, path):
    """The signal and the gate of every condition, as box plots (the gate on a log axis: out-of-
    distribution inputs move it by orders of magnitude, familiar against novel by a few per cent)."""
    plt = pyplot("the figures")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.5 * len(conditions)), sharey=True)
    names = [name for name, _ in conditions]
    for ax, key, label in ((axes[0], "signal", "signal: D's score of the state"),
                           (axes[1], "gate", "plasticity gate: L1 of D's gradient to h1..h5")):
        values = [rec.numpy()[key] for _, rec in conditions]
        try:  # matplotlib 3.10 and later; vert= is deprecated there
            ax.boxplot(values, orientation="horizontal", whis=(1, 99), sym=".", flierprops={"markersize": 2})
        except TypeError:
            ax.boxplot(values, vert=False, whis=(1, 99), sym=".", flierprops={"markersize": 2})
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].set_yticks(range(1, len(names) + 1), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title} (boxes: quartiles; whiskers: 1st and 99th percentiles)")
    fig.tight_layout()
    write_figure(fig, plt, path)


def plot_familiarization(stream: Stream, path):
    """The signal and the gate of every presentation: the repeated set's mean and spread per step,
    and each novel insertion."""
    plt = pyplot("the figures")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = np.arange(1, len(stream.shown) + 1)
    novel_t, novel_k = np.nonzero(stream.shown < 0)
    for ax, key, label in ((axes[0], "signal", "signal"), (axes[1], "gate", "plasticity gate (L1, h1..h5)")):
        repeated = stream.repeated(key)
        m, sd = np.nanmean(repeated, axis=1), np.nanstd(repeated, axis=1)
        ax.plot(steps, m, color="C0", label="repeated set: mean")
        ax.fill_between(steps, m - sd, m + sd, color="C0", alpha=0.25, label="repeated set: sd")
        ax.plot(novel_t + 1, getattr(stream, key)[novel_t, novel_k], "o", color="C3", ms=3, label="novel insertion")
        ax.set_xlabel("presentation (training step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("familiarization: training on a repeated set")
    fig.tight_layout()
    write_figure(fig, plt, path)


# --- The script -------------------------------------------------------------------------------------

def setup(args):
    """Checkpoint, networks, the run's flags and the step's D path; the dataset the model trained on."""
    device = pick_device(args.device, args.gpu)
    path = resolve_checkpoint_path(args.path)
    state, nets = load_networks(path, device)
    if nets.discriminator is None:
        raise UserError(f"{path} was trained with --inference-rule wake-sleep: it has no wake/sleep discriminator, "
                        f"so no neuromodulator to record")
    config = state.get("config") or {}
    dataset, data = dataset_of(path, state, args)
    if channels_of(dataset) != nets.cfg.channels:
        raise UserError(f"{path} holds a model of {nets.cfg.channels}-channel images; --dataset {dataset} has "
                        f"{channels_of(dataset)}")
    # the run's flags: the checkpoint's, over train.py's defaults for any it predates
    run_flags = train.get_parser().parse_args([])
    vars(run_flags).update({k: v for k, v in config.items() if k in vars(run_flags)})
    if run_flags.gamma == 0:
        raise UserError(f"{path} was trained with --gamma 0 (a WGAN-GP): its wake/sleep discriminator never "
                        f"trained, so there is no neuromodulator to record; nothing was computed")
    nets.train()
    hp = check_d_gradients(nets, StepConfig.from_args(run_flags))
    return Setup(args, nets, hp, run_flags, state, path, dataset, data, device)


def neuromodulation(args):
    s = setup(args)
    out = args.out or os.path.join(os.path.dirname(s.checkpoint), "neuromodulation")
    problem = unwritable_folder(out)  # before the work, which a figure or records.json could not keep
    if problem:
        raise UserError(f"--out {out} cannot be written ({problem}); nothing was computed")
    common = {"checkpoint": os.path.abspath(s.checkpoint), "epoch": s.state.get("epoch"), "model": s.state["model"],
              "dataset": s.dataset, "data": os.path.abspath(s.data) if s.data else None,
              "d_gradients": s.hp.d_gradients, "batch_size": args.batch_size, "flags": vars(args),
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"{s.checkpoint}: epoch {s.state.get('epoch')}, gamma {s.hp.gamma}, {s.dataset}; every condition "
          f"scored in batches of {args.batch_size} of its own, networks in training mode")
    records = []
    for name, (run, title) in {"wake-sleep": (wake_sleep, "wake and sleep"),
                               "novelty": (novelty, "familiar, novel and out-of-distribution inputs")}.items():
        if name in args.experiments:
            conditions, reference = run(s)
            found = condition_records(s, name, conditions, reference)
            print_conditions(title, found)
            plot_conditions(title, conditions, os.path.join(out, f"{name}.png"))
            records += found
    if "familiarization" in args.experiments:
        stream = familiarization(s)
        effects = familiarization_effects(stream, args.bootstrap, args.seed)
        print_familiarization(effects)
        plot_familiarization(stream, os.path.join(out, "familiarization.png"))
        records.append({"experiment": "familiarization", "condition": "stream", "novel_rate": args.novel_rate,
                        **effects})
    records = [{**common, **r} for r in records]
    write_json(os.path.join(out, "records.json"), records)
    if args.json:
        for r in records:
            append_jsonl(args.json, r)
    print(f"records: {os.path.join(out, 'records.json')}" + (f" (and appended to {args.json})" if args.json else ""))
    return 0


def main(argv=None):
    return run_main(get_parser(), check_args, neuromodulation, argv)


if __name__ == "__main__":
    sys.exit(main())
