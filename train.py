#!/usr/bin/env python
"""Train a DCGAN-shaped model with Adversarial Wake-Sleep (Benjamin & Kording 2020).

    python train.py                      # a few minutes on CPU: scikit-learn's digits, no download
    python train.py --dataset mnist --data PATH --image-size 32 --epochs 30 --n-filters 32 \
        --noise-dim 40 --lr-g 0.00001 --lr-d 0.0001 --lr-e 0.0003 --beta1 0.64 --beta2 .999 \
        --lamda .9 --kl-from-sn --divisive-normalization True --save-imgs

Writes to --out: checkpoint.pth.tar (after every epoch, whole), metrics.csv (a row per epoch),
config.json, with --save-every K checkpoint_epoch{E}.pth.tar every K epochs, and with --save-imgs
gen_images/imgs_epoch{E}.png. Ctrl-C (or SIGTERM) saves a checkpoint inside the epoch; --resume
continues from it as if never stopped. A non-finite loss stops the run and saves the state before
the bad step to nonfinite_state.pth.tar.

Several GPUs or machines (data-parallel, --batch-size is the global batch; see distributed.py):

    torchrun --nproc_per_node 8 train.py ...
"""
import argparse
import itertools
import os
import random
import signal
import sys
import time

import torch

import distributed
import monitor
from checkpoint import CHECKPOINT_NAME, CheckpointError, check_architecture, checkpoint_state, load_checkpoint, \
    save_checkpoint
from data import DATASETS, DataError, DataMissing, TensorBatches, channels_of, class_labels, make_batches, num_images
from matching_metrics import MatchingDuringTraining
from losses import D_PENALTIES, METRICS, StepConfig
from metrics import format_probe, layer_features, linear_probe
from models import ModelConfig, Networks
from recording import NoveltyGap
from sample_quality import DATASETS_MEASURED, QualityMeasure
from step import NonFiniteError, check_d_gradients, make_optimizers, training_step
from utils import (HelpFormatter, RunLock, UserError, WriteError, add_bool_flag, add_release_flags, keep_freed_memory,
                   nonfinite_floats, note_release_flags, progress_bar, remove_stray_temporaries, save_grid,
                   unwritable_folder, write_json, write_metrics_csv)


def get_parser():
    digits = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in DIGITS_DEFAULTS.items())
    p = argparse.ArgumentParser(description="Adversarial Wake-Sleep training (arXiv:2006.10811)",
                                formatter_class=HelpFormatter,
                                epilog="The defaults above are the original release's. With --dataset digits (the "
                                       f"default) these replace them, where not given: {digits}")
    _data_and_model_flags(p)
    _objective_flags(p)
    _optimization_flags(p)
    _run_flags(p)
    _process_flags(p)
    add_release_flags(p, {"--detailed-logging": (
        dict(action="store_true"), "the linear decoding probe of every layer runs after the last epoch here "
                                   "(--probe-folds), and every epoch's losses go to metrics.csv")})
    return p


def _data_and_model_flags(p):
    """The data and the architecture: what the checkpoint's model config records."""
    g = p.add_argument_group("data")
    g.add_argument("-d", "--data", metavar="DIR", default="../data",
                   help="dataset root: holds MNIST/raw, cifar-10-batches-py, or train/ and val/ image folders")
    g.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits: scikit-learn's bundled digits, no download; folder/imagenet/lfw: DATA/train")
    g.add_argument("--image-size", type=int, default=32, help="image side S, a multiple of 16, at least 32")
    g.add_argument("--classes", type=int, nargs="+", default=None, metavar="LABEL",
                   help="train (and evaluate) on the images of these labels only, e.g. 0 1 2 3 4: the others stay "
                        "novel classes (an image folder's label: its sub-folder's index in sorted order)")
    g.add_argument("-j", "--workers", type=int, default=4, help="data-loading processes (image folders only)")
    g = p.add_argument_group("model")
    g.add_argument("--n-filters", type=int, default=64, help="channels of Layer1 (doubling up to Layer4)")
    g.add_argument("--noise-dim", type=int, default=40, help="units of the top layer, Layer5")
    add_bool_flag(g, "--divisive-normalization", "normalize every layer over channels, pixel by pixel")
    add_bool_flag(g, "--spectral-norm", "spectral normalization on the inference and readout weights")
    g.add_argument("--norm-order", default="release", choices=ModelConfig.NORM_ORDERS,
                   help="where G applies divisive normalization: release, before its noise and ReLU (the "
                        "release's); matched, after its ReLU as F does (docs/algorithm.md)")
    add_bool_flag(g, "--inference-batchnorm", "BatchNorm after each of F's convolutions (False: none, and a bias)",
                  default=True)
    g.add_argument("--inference-noise", type=float, default=0.01, metavar="SIGMA",
                   help="standard deviation of F's Gaussian noise after each BatchNorm (0: off; DeReLU stays)")
    g.add_argument("--generator-noise", type=float, default=0.01, metavar="SIGMA",
                   help="standard deviation of G's Gaussian noise on Layer4..Layer1 in training (0: off)")
    g.add_argument("--dream-noise", default="release", choices=ModelConfig.DREAM_NOISES,
                   help="how G's dreams vary: release, Gaussian --generator-noise after N and before each ReLU (the "
                        "release's); laplace, a learned per-channel Laplace scale around G's prediction; "
                        "before-convt, Gaussian --generator-noise on each block's input (docs/algorithm.md)")
    g.add_argument("--d-hidden", type=int, default=128, metavar="UNITS",
                   help="hidden units of the wake/sleep discriminator per adjacent pair of layers")


def _objective_flags(p):
    """The terms of the objective and their weights (docs/algorithm.md)."""
    g = p.add_argument_group("objective")
    g.add_argument("--gamma", type=float, default=1.0,
                   help="1: pure wake-sleep; <1 adds the readout image critic; 0: a WGAN-GP")
    g.add_argument("--lamda", type=float, default=0.3, help="weight of D's L1 gradient penalty on states")
    g.add_argument("--lamda2", type=float, default=10.0, help="weight of the readout's L2 gradient penalty on images")
    g.add_argument("--d-penalty", default="one-sided-l1", choices=tuple(D_PENALTIES),
                   help="D's gradient penalty on states: one-sided-l1, mean(||grad||_1 - 1) (the release's); "
                        "two-sided-l2, mean((||grad||_2 - 1)^2), WGAN-GP's form")
    g.add_argument("--kl-from-sn", action="store_true", help="pull inferred Layer5 towards N(0, 1) (KL, weight 1e-4)")
    add_bool_flag(g, "--scale-gen-surprisal-by-D", "weigh each sample's generator loss by 2 sigmoid(-D(wake))")
    add_bool_flag(g, "--prioritized-replay", "dream half the sleep batch from the least wake-like wake tops")
    g.add_argument("--inference-rule", default="adversarial", choices=("adversarial", "wake-sleep"),
                   help="how F learns: adversarial (against the wake/sleep discriminator D), or classic "
                        "wake-sleep (predicting each dreamed layer from the one below; no D is built)")


def _optimization_flags(p):
    """Adam, the order of updates, the D path, the noise schedule."""
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=20, help="epochs to train in all (a resumed run counts those done)")
    g.add_argument("-b", "--batch-size", type=int, default=256, help="minibatch size")
    g.add_argument("--lr-g", type=float, default=1e-4, help="generator learning rate")
    g.add_argument("--lr-d", "--learning-rate-discriminator", type=float, default=1e-4,
                   help="wake/sleep discriminator learning rate")
    g.add_argument("--lr-e", type=float, default=1e-4, help="inference (encoder) learning rate")
    g.add_argument("--lr-rd", type=float, default=1e-4, help="readout discriminator learning rate")
    g.add_argument("--lr-scale", type=float, default=1e-2,
                   help="learning rate of G's log Laplace scales (--dream-noise laplace only)")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    g.add_argument("--beta2", type=float, default=0.99, help="Adam beta2")
    g.add_argument("--wd", "--weight-decay", type=float, default=0.0, help="Adam weight decay")
    g.add_argument("--gradient-clipping", type=float, default=50.0,
                   help="clip D's and F's gradients to this infinity norm; 0 turns it off")
    g.add_argument("--update-order", default="alternating", choices=("alternating", "simultaneous"),
                   help="alternating (the release's): D steps; then R, and F following the stepped D; then G "
                        "following the stepped F and R. simultaneous: every gradient at the same weights")
    g.add_argument("--d-gradients", default="written-out", choices=("written-out", "autograd"),
                   help="how D's gradients w.r.t. the states (its penalty, F's adversarial gradient) are taken: "
                        "written out for this D (fast), or autograd's double backward through "
                        "Discriminator.forward (slower; works for any D you write)")
    g.add_argument("--lr-decay", type=int, default=10000, metavar="N",
                   help="a noise schedule despite the name: every N epochs divide all noise levels by 10")


def _run_flags(p):
    """Where the run writes, resuming, the device, and what it measures on the way."""
    g = p.add_argument_group("run")
    g.add_argument("--out", default=".", help="folder for the checkpoint, metrics, config and images")
    g.add_argument("--resume", default="", metavar="PATH", help="continue from this checkpoint (file or run folder)")
    g.add_argument("--save-imgs", action="store_true", help="save a 10x10 grid of samples every epoch")
    g.add_argument("--save-every", type=int, default=0, metavar="K",
                   help="also keep checkpoint_epoch{E}.pth.tar every K epochs; 0 keeps only the latest")
    g.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip up to N steps (in the whole run) whose loss or gradient is not finite, "
                        "instead of stopping at the first")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: drawn, and recorded)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    g.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    g.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 autocast of the forward passes; losses, penalties and weights stay float32")
    g.add_argument("--probe-folds", type=int, default=5,
                   help="folds of the linear decoding probe after the last epoch; 0 skips it")
    g.add_argument("--quality-every", type=int, default=0, metavar="K",
                   help="every K epochs and after the last, the digit-classifier measure of 2,000 samples "
                        "(fd, kid, precision, recall, confidence, class_entropy: sample_quality.py) into metrics.csv; digits and mnist "
                        "only; 0: never")
    g.add_argument("--matching-every", type=int, default=0, metavar="K",
                   help="every K epochs and after the last, the wake/sleep two-sample accuracy (a fresh linear "
                        "classifier, inference_metrics.py) per layer and pair of layers into metrics.csv as "
                        "two_sample_*; digits, MNIST and CIFAR-10; 0: never")


def _process_flags(p):
    """Several processes: torchrun's, and the original release's older way."""
    g = p.add_argument_group("several processes (launch with torchrun; the other flags are the original's, "
                             "the older way)")
    g.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics of the global batch rather than of each process's shard")
    g.add_argument("--world-size", type=int, default=None,
                   help="processes in all (with --multiprocessing-distributed: machines); None: torchrun's "
                        "WORLD_SIZE, else 1")
    g.add_argument("--rank", type=int, default=None,
                   help="this process's rank (with --multiprocessing-distributed: this machine's); "
                        "None: torchrun's RANK, else 0")
    g.add_argument("--dist-url", default="env://",
                   help="where the processes meet: tcp://HOST:PORT of rank 0, or env:// "
                        "(MASTER_ADDR and MASTER_PORT, which torchrun sets)")
    g.add_argument("--dist-backend", default=None, choices=("nccl", "gloo"),
                   help="None: nccl on CUDA GPUs, gloo on CPUs")
    g.add_argument("--multiprocessing-distributed", action="store_true",
                   help="start one process per CUDA GPU of this machine (torchrun --nproc_per_node does the same)")


# `python train.py` alone trains on scikit-learn's bundled digits (no download) with these, where not
# given on the command line: the paper's doubly adversarial flags, with a smaller network and batch
# for 1,500 small digits and a few minutes of a laptop's CPU (measured: README, "First run").
DIGITS_DEFAULTS = {"n_filters": 16, "batch_size": 64, "epochs": 30, "gamma": 0.9, "lr_g": 2e-4, "lr_d": 1e-5,
                   "lr_e": 8e-4, "lr_rd": 1e-5, "beta1": 0.0, "beta2": 0.9, "lamda": 0.7, "lamda2": 7.0,
                   "kl_from_sn": True, "divisive_normalization": True, "seed": 0}


def parse_args(parser, argv=None):
    """The flags, with DIGITS_DEFAULTS in place of the original's defaults for --dataset digits
    (flags given explicitly win; the other datasets keep every default of the original)."""
    args = parser.parse_args(argv)
    if args.dataset == "digits":
        unset = object()
        # argparse fills in a default only where the namespace has no value yet: what stays unset was not given.
        given = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in vars(args)}))
        for k, v in DIGITS_DEFAULTS.items():
            # A resumed run keeps its checkpoint's seed unless one is given (train()).
            if getattr(given, k) is unset and not (k == "seed" and args.resume):
                setattr(args, k, v)
    return args


def check_args(args, parser):
    """Refuse bad values before any work starts (exit code 2, with the reason)."""
    nonfinite, problems = nonfinite_floats(parser, args)  # nan and inf would reach Adam or the step
    if args.image_size < 32 or args.image_size % 16:
        problems.append(f"--image-size must be a multiple of 16 and at least 32, got {args.image_size}")
    if "gamma" not in nonfinite and not 0.0 <= args.gamma <= 1.0:
        problems.append(f"--gamma must lie in [0, 1], got {args.gamma}")
    for flag in ("epochs", "n_filters", "noise_dim", "d_hidden", "lr_g", "lr_d", "lr_e", "lr_rd", "lr_scale"):
        if flag not in nonfinite and getattr(args, flag) <= 0:
            problems.append(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("inference_noise", "generator_noise"):
        if flag not in nonfinite and getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must be at least 0, got {getattr(args, flag)}")
    if args.batch_size < 2:
        problems.append(f"--batch-size must be at least 2 (BatchNorm on the 1x1 top layer and the minibatch "
                        f"std need two samples), got {args.batch_size}")
    world, dist_problems = distributed.check_flags(args)
    problems += dist_problems
    if world > 1 and args.batch_size % world:
        problems.append(f"--batch-size {args.batch_size} is the global batch, and does not divide evenly among "
                        f"the {world} processes")
    elif world > 1 and args.batch_size // world < 2:
        problems.append(f"--batch-size {args.batch_size} gives each of the {world} processes fewer than two samples "
                        f"(BatchNorm on the 1x1 top layer and the minibatch std need two)")
    for flag in ("lamda", "lamda2", "wd", "gradient_clipping", "lr_decay", "workers", "probe_folds", "save_every",
                 "skip_nonfinite", "quality_every", "matching_every"):
        if flag not in nonfinite and getattr(args, flag) < 0:
            problems.append(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if not {"beta1", "beta2"}.intersection(nonfinite) and not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        problems.append(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1}, {args.beta2}")
    if args.inference_rule == "wake-sleep":
        needs_d = [f for f in ("scale_gen_surprisal_by_D", "prioritized_replay") if getattr(args, f)]
        if needs_d:
            problems.append(f"--inference-rule wake-sleep builds no wake/sleep discriminator, which "
                            f"{' and '.join('--' + f.replace('_', '-') for f in needs_d)} need")
    if args.probe_folds == 1:
        problems.append("--probe-folds must be 0 (no probe) or at least 2")
    if args.quality_every > 0 and args.dataset not in DATASETS_MEASURED:
        problems.append(f"--quality-every measures digits (--dataset digits or mnist), not {args.dataset}; "
                        f"for natural images, generate_and_save_imgs.py --fid-ref gives Inception FID")
    if args.dataset != "digits" and not os.path.isdir(args.data):
        problems.append(f"--data {args.data} is not a folder")
    if args.resume:
        path = os.path.join(args.resume, CHECKPOINT_NAME) if os.path.isdir(args.resume) else args.resume
        if not os.path.isfile(path):
            problems.append(f"--resume {args.resume}: no checkpoint file at {path}")
    if (args.device == "cuda" or args.gpu is not None) and not torch.cuda.is_available():
        problems.append("--device cuda (or --gpu) asked for, but this PyTorch sees no CUDA device")
    elif args.gpu is not None and not 0 <= args.gpu < torch.cuda.device_count():
        problems.append(f"--gpu {args.gpu}: this machine has CUDA devices 0 .. {torch.cuda.device_count() - 1}")
    if problems:
        parser.error("; ".join(problems))


def model_config(args):
    return ModelConfig(image_size=args.image_size, channels=channels_of(args.dataset), n_filters=args.n_filters,
                       noise_dim=args.noise_dim, divisive_normalization=args.divisive_normalization,
                       spectral_norm=args.spectral_norm, readout=args.gamma < 1,
                       discriminator=args.inference_rule == "adversarial", norm_order=args.norm_order,
                       inference_batchnorm=args.inference_batchnorm, inference_noise=args.inference_noise,
                       generator_noise=args.generator_noise, discriminator_hidden=args.d_hidden,
                       dream_noise=args.dream_noise)


def unused_flags_note(args):
    """What --inference-rule wake-sleep leaves unused, said once: the paper's command lines stay
    runnable as they are with the rule switched, and nothing passes unnoticed."""
    if args.inference_rule != "wake-sleep":
        return None
    return ("note: --inference-rule wake-sleep builds no wake/sleep discriminator: --lr-d, --lamda, --d-penalty and "
            "--d-gradients are unused")


class BadArgument(UserError):
    """An argument that only the data or the file system can refute: refused like argparse's (exit 2)."""


def epoch_seed(seed, epoch):
    """The torch seed of one epoch: a run's randomness is a function of (seed, epoch) alone,
    so a run resumed at an epoch boundary draws exactly what the uninterrupted run drew."""
    return (seed * 1_000_003 + epoch) % (2 ** 63)


class Interrupt:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one exits at once."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig, frame):
        if self.signal is not None:
            # Asked twice: leave now. A checkpoint being written is abandoned (its temporary file
            # removed on the way out); the one on disk stays whole, as every write is atomic.
            raise KeyboardInterrupt
        self.signal = sig
        print(f"\n{signal.Signals(sig).name}: stopping after this step and saving a checkpoint "
              f"(interrupt again to exit at once)", file=sys.stderr)


def check_classes(args):
    """--classes among the dataset's labels (an image folder's need its folder: checked with the data)."""
    if args.classes is None:
        return
    labels = class_labels(args.dataset, args.data)
    lacking = [c for c in args.classes if c not in labels]
    if lacking:
        raise BadArgument(f"--classes {' '.join(map(str, lacking))}: {args.dataset} has the labels "
                          f"{labels[0]} .. {labels[-1]}")


def run_probe(nets, args, device):
    """Linear decoding of the labels from each layer on the test split (k-fold)."""
    try:
        batches = make_batches(args.dataset, args.data, args.image_size, 512, device, train=False,
                               workers=args.workers, shuffle=False, min_batch=1, classes=args.classes)
    except DataError as e:
        print(f"skipping the decoding probe: {e}")
        return None
    features, labels = layer_features(nets.inference, batches)
    return linear_probe(features, labels, n_folds=args.probe_folds, seed=0)


@torch.no_grad()
def samples_of(generator, z):
    """G's images of z in eval mode (no noise; sampling in train mode would add it, and move nothing else)."""
    generator.eval()
    images = generator(z)[0]
    generator.train()
    return images


QUALITY_SAMPLES = 2000  # as in the README's and docs/fidelity.md's fd figures: fd depends on the count


def resume_hint(path):
    return f"continue with the same command and --resume {path}"


class Run:
    """The training run of this process: the only one, or one of `group` (distributed.start).

    Run(args, group).train() -> exit code. Its parts, in the order they happen: _start (resume or
    begin: seed, data, folder, networks), then per epoch _begin_epoch (its random state), _step
    for each batch (refusing a non-finite one), _end_epoch (metrics, pictures, checkpoint), and
    after the last, _finish (probe, pictures, summary)."""

    def __init__(self, args, group):
        self.args, self.group, self.device = args, group, group.device
        self.ckpt_path = os.path.join(args.out, CHECKPOINT_NAME)
        self.grids, self.written = True, None  # sample grids still wanted; the epoch in ckpt_path this run wrote
        self.quality = None  # --quality-every's measure, made at its first use
        self._start()
        # D's signal on fixed training and held-out images each epoch (gamma 0 trains no D to ask,
        # wake-sleep builds none).
        no_d = self.hp.gamma == 0 or self.nets.discriminator is None
        self.novelty_gap = None if no_d else NoveltyGap.of_run(self.batches, args.dataset, args.data, args.image_size,
                                                               args.batch_size // group.world_size, self.device,
                                                               args.classes)
        self.matching = None
        if args.matching_every:
            images = self.batches.images if isinstance(self.batches, TensorBatches) else None
            self.matching = MatchingDuringTraining.of_run(images, args.batch_size // group.world_size, self.device)
        self.board = monitor.TensorBoard(args.out, enabled=group.is_main)
        # A fixed noise, so that the sample grids of successive epochs are comparable.
        self.fixed_z = torch.randn(100, self.cfg.noise_dim, 1, 1,
                                   generator=torch.Generator().manual_seed(self.seed)).to(self.device)

    def _start(self):
        args, group = self.args, self.group
        self.cfg = cfg = model_config(args)
        self.resumed = resumed = load_checkpoint(args.resume, map_location=self.device) if args.resume else None
        if resumed:
            check_architecture(ModelConfig.from_dict(resumed["model"]), cfg.to_dict(),
                               advice="resume it with the checkpoint's flags, or start a new run (no --resume)")
            seed = resumed["seed"] if args.seed is None else args.seed
        else:
            seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
        self.seed = args.seed = group.from_main(seed)  # a drawn seed differs between processes; the data order must not
        self.batches = self._data()
        if group.is_main:  # the only process that writes
            self._claim_folder()
        torch.manual_seed(self.seed)
        self.nets = Networks(cfg).to(self.device)
        if group.sync_bn:
            distributed.convert_sync_batchnorm(self.nets)
        self.optimizers = make_optimizers(self.nets, args)
        self.start_epoch, self.start_step, self.history, self.partial, self.skipped = 0, 0, [], None, 0
        if resumed:
            self._resume(resumed)
        # The fast D path holds only for the D it was written for: checked here, before the first step.
        say = print if group.is_main else lambda *a, **k: None
        self.hp = check_d_gradients(self.nets, StepConfig.from_args(args), say=say)
        note = unused_flags_note(args)
        if note:
            say(note, file=sys.stderr)
        group.broadcast_(self.nets)  # equal already (same seed, same file); now equal to the bit on any hardware
        self.average = group.average if group.active else None

    def _data(self):
        # The last checks of the arguments need the data and the file system; nothing is written before them.
        args, group = self.args, self.group
        try:
            check_classes(args)
            batches = make_batches(args.dataset, args.data, args.image_size, args.batch_size // group.world_size,
                                   self.device, train=True, workers=args.workers, rank=group.rank,
                                   world_size=group.world_size, classes=args.classes)
        except DataMissing as e:
            raise BadArgument(f"--data {args.data}: {e}") from None
        if num_images(batches) < args.batch_size:  # one batch of all the images: more likely a slip than meant
            raise BadArgument(f"--batch-size {args.batch_size} is larger than the {num_images(batches)} training "
                              f"images")
        return batches

    def _claim_folder(self):
        """--out writable, locked for this run, cleared of a killed run's temporary files; config.json."""
        args = self.args
        problem = unwritable_folder(args.out)
        if problem:
            raise BadArgument(f"--out {args.out} cannot be written ({problem})")
        self.lock = RunLock(args.out)  # held while this process lives
        stray = [os.path.join(d, n) for d in (args.out, os.path.join(args.out, "gen_images"))
                 for n in remove_stray_temporaries(d)]
        if stray:
            print(f"removed {len(stray)} temporary file(s) that a killed run left half-written: {', '.join(stray)}",
                  file=sys.stderr)
        write_json(os.path.join(args.out, "config.json"), {"model": self.cfg.to_dict(), "args": vars(args)})

    def _resume(self, resumed):
        args = self.args
        try:
            self.nets.load_state_dict(resumed["networks"])
            for name, opt in self.optimizers.items():
                opt.load_state_dict(resumed["optimizers"][name])
            self.start_epoch, self.start_step, self.history = resumed["epoch"], resumed["step"], resumed["history"]
            self.partial, self.skipped = resumed.get("partial"), resumed.get("skipped_steps", 0)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{args.resume} cannot be resumed: {e.__class__.__name__}: {e}") from None
        if self.partial is not None:
            # The step count inside the epoch means the same batches only with the same data and batch size.
            saved = {k: resumed["config"].get(k) for k in ("dataset", "batch_size")}
            changed = [f"--{k.replace('_', '-')} {saved[k]} (not {getattr(args, k)})"
                       for k in saved if saved[k] != getattr(args, k)]
            if changed:
                raise CheckpointError(f"{args.resume} stopped inside epoch {self.start_epoch + 1}; continuing it "
                                      f"needs {', '.join(changed)}")
        if self.group.is_main:
            print(f"resumed from {args.resume}: {self.start_epoch} epochs"
                  + (f" and {self.start_step} steps" if self.start_step else ""))

    def train(self):
        with Interrupt() as self.interrupt:
            for epoch in range(self.start_epoch, self.args.epochs):
                stop = self._epoch(epoch)
                if stop is not None:
                    return 128 + stop
        self.group.barrier()  # rank 0's last checkpoint is whole
        if self.group.is_main:  # the probe runs once, on rank 0
            self._finish()
        return 0

    def _begin_epoch(self, epoch):
        """The epoch's random state and metric sums: at an epoch boundary, or where an interrupted epoch stopped."""
        args, group, partial = self.args, self.group, self.partial
        if partial is None:  # an epoch boundary
            if epoch > 0 and args.lr_decay and epoch % args.lr_decay == 0:
                self.nets.decay_noise(10.0)
            torch.manual_seed(distributed.rank_seed(epoch_seed(self.seed, epoch), group.rank))
            self.sums = {k: torch.zeros((), device=self.device) for k in METRICS}
            self.epoch_skipped = 0
            return
        rngs = self.resumed.get("rng_by_rank", [self.resumed["rng"]])
        if len(rngs) == group.world_size:
            torch.set_rng_state(rngs[group.rank]["cpu"].cpu())
            if rngs[group.rank]["cuda"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all([s.cpu() for s in rngs[group.rank]["cuda"]])
        else:
            # Stopped with another number of processes. The global batches go on where they stopped,
            # but random streams cannot be split or merged: each process starts a new one, numbered
            # past the ranks' own.
            torch.manual_seed(distributed.rank_seed(epoch_seed(self.seed, epoch),
                                                    group.rank + group.world_size * self.start_step))
            if group.is_main:
                print(f"{args.resume} stopped inside an epoch with {len(rngs)} processes, not "
                      f"{group.world_size}: the rest of epoch {epoch + 1} draws other noise than the "
                      f"uninterrupted run would have", file=sys.stderr)
        self.sums = {k: torch.as_tensor(partial[k], device=self.device) for k in METRICS}
        self.epoch_skipped = partial.get("skipped", 0)

    def _epoch(self, epoch):
        """The steps of one epoch and its bookkeeping; the signal that stopped it, or None."""
        group, batches = self.group, self.batches
        self._begin_epoch(epoch)
        batches.set_epoch(self.seed, epoch)
        t0 = time.time()
        remaining = itertools.islice(iter(batches), self.start_step, None)
        bar = progress_bar(remaining, desc=f"epoch {epoch + 1}/{self.args.epochs}", initial=self.start_step,
                   total=len(batches), dynamic_ncols=True, disable=not group.is_main)
        step = self.start_step
        for step, (x, _) in enumerate(bar, start=self.start_step + 1):
            if batches.may_skip and not group.all_true(x is not None):
                self.epoch_skipped += 1  # some process read too few images of its shard: all skip the step
                continue
            out = self._step(x, epoch, step, bar)
            if out is None:
                continue
            for k in METRICS:
                self.sums[k] += out[k]
            if group.is_main and (step % 10 == 0 or step == len(batches)):
                good = step - self.epoch_skipped
                bar.set_postfix({k: f"{v.item() / good:.3g}" for k, v in self.sums.items()}, refresh=False)
                self.board.scalars(epoch * len(batches) + step, {k: v.item() for k, v in out.items()})
            stop = group.agreed_signal(self.interrupt.signal)  # every process stops at the same step
            if stop is not None:
                bar.close()
                self._save_inside_epoch(self.ckpt_path, epoch, step)
                if group.is_main:
                    print(f"saved {self.ckpt_path} at epoch {epoch + 1}, step {step}; "
                          f"{resume_hint(self.ckpt_path)}", file=sys.stderr)
                return stop
        bar.close()
        self.start_step, self.partial = 0, None
        self._end_epoch(epoch, step - self.epoch_skipped, time.time() - t0)
        stop = group.agreed_signal(self.interrupt.signal)  # it came during the epoch's last step or its bookkeeping
        if stop is not None and group.is_main:
            print(f"saved {self.ckpt_path} after epoch {epoch + 1}; {resume_hint(self.ckpt_path)}", file=sys.stderr)
        return stop

    def _step(self, x, epoch, step, bar):
        """One training step; None if it was non-finite and skipped (--skip-nonfinite)."""
        args, nets = self.args, self.nets
        # The forward pass moves BatchNorm statistics and spectral-norm estimates: keep them, so that a
        # step refused as non-finite leaves no trace.
        buffers = [b.clone() for b in nets.buffers()]
        try:
            return training_step(nets, self.optimizers, x, self.hp, average=self.average)
        except NonFiniteError as e:
            with torch.no_grad():
                for b, kept in zip(nets.buffers(), buffers):
                    b.copy_(kept)
            where = f"epoch {epoch + 1}, step {step}"
            # The alternating order steps the critics before their opponents' gradients exist.
            part = f" ({', '.join(e.stepped)} had already stepped, the other networks did not)" if e.stepped else ""
            if self.skipped < args.skip_nonfinite:
                self.skipped += 1
                self.epoch_skipped += 1
                if self.group.is_main:
                    bar.write(f"skipped {where}: non-finite {e}{part} ({self.skipped} of --skip-nonfinite "
                              f"{args.skip_nonfinite})", file=sys.stderr)
                return None
            bar.close()
            # The bad update was not applied: in memory is the last good state (but for `e.stepped`).
            bad_path = os.path.join(args.out, "nonfinite_state.pth.tar")
            self._save_inside_epoch(bad_path, epoch, step - 1)
            state = ("The state before that step" if not e.stepped else
                     f"The state with {', '.join(e.stepped)} stepped and the other networks not")
            raise UserError(f"non-finite {e} at {where}. {state} is in {bad_path}, and {self.ckpt_path} is "
                            f"untouched: resume from either with lower learning rates, or allow a few bad steps "
                            f"with --skip-nonfinite N") from None

    def _save_inside_epoch(self, path, epoch, step):
        """A checkpoint `step` steps into `epoch`: with the epoch's metric sums so far and every
        process's random state, so that --resume goes on exactly from there."""
        partial = {**{k: v.item() for k, v in self.sums.items()}, "skipped": self.epoch_skipped}
        rngs = self.group.rng_states()
        if self.group.is_main:
            save_checkpoint(path, self._state(epoch, step, partial=partial, rngs=rngs))
        self.group.barrier()

    def _state(self, epoch, step, **kwargs):
        return checkpoint_state(self.args, self.nets, self.optimizers, self.seed, epoch, step, self.history,
                                skipped=self.skipped, **kwargs)

    def _end_epoch(self, epoch, good, seconds):
        """The epoch's metrics row; on rank 0 its pictures, checkpoint and metrics.csv."""
        args, group = self.args, self.group
        unreadable = group.total(self.batches.skipped)
        if unreadable and group.is_main:
            print(f"epoch {epoch + 1}: skipped {unreadable} unreadable images (named above)", file=sys.stderr)
        if self.epoch_skipped and group.is_main:
            what = "steps (non-finite, or too few readable images on a process)" if self.batches.may_skip else \
                "non-finite steps"
            print(f"epoch {epoch + 1}: skipped {self.epoch_skipped} {what}", file=sys.stderr)
        if good == 0:
            raise UserError(f"epoch {epoch + 1} trained no step: every batch was unreadable or non-finite")
        # The metrics were averaged over the processes at every step: every process holds the same row.
        row = {"epoch": epoch + 1, "steps": good, **{k: v.item() / good for k, v in self.sums.items()},
               "sigma": self.nets.inference.sigma.item(), "seconds": round(seconds, 3)}
        if self.novelty_gap is not None:  # on every process: under --sync-bn its BatchNorm passes meet
            gap = self.novelty_gap(self.nets, self.hp)
            row.update(gap)
            self.board.scalars((epoch + 1) * len(self.batches), gap)
        if self.matching is not None and ((epoch + 1) % args.matching_every == 0 or epoch + 1 == args.epochs):
            matching = self.matching(self.nets)  # on every process, as the novelty gap
            row.update(matching)
            self.board.scalars((epoch + 1) * len(self.batches), matching)
        self.history.append(row)
        if not group.is_main:
            return
        if args.quality_every and ((epoch + 1) % args.quality_every == 0 or epoch + 1 == args.epochs):
            quality = self._quality()
            row.update(quality)
            self.board.scalars((epoch + 1) * len(self.batches), quality)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        self._pictures(epoch)
        state = self._state(epoch + 1, 0)
        try:
            save_checkpoint(self.ckpt_path, state)
            self.written = epoch + 1
            if args.save_every and (epoch + 1) % args.save_every == 0:
                save_checkpoint(os.path.join(args.out, f"checkpoint_epoch{epoch + 1}.pth.tar"), state)
            write_metrics_csv(os.path.join(args.out, "metrics.csv"), self.history)
        except WriteError as e:
            held = f"epoch {self.written}" if self.written else "what was written before this run, if anything"
            raise UserError(f"{e}. Training stopped after epoch {epoch + 1}; {CHECKPOINT_NAME} holds {held}: "
                            f"{resume_hint(self.ckpt_path)} once the disk is fixed") from None

    def _quality(self):
        """fd, kid, precision, recall, confidence and class_entropy of 2,000 samples of a fixed noise (its own generator: the
        training's random stream, and so exact resume, are untouched). The classifier is trained once,
        or read from its cache beside the data or in the run folder."""
        if self.quality is False:
            return {}
        if self.quality is None:
            try:
                self.quality = QualityMeasure(self.args.dataset, self.args.data, self.args.image_size,
                                              cache_dirs=[self.args.out])
            except (UserError, DataError) as e:  # e.g. no test split: the measure has nothing to compare with
                self.quality = False
                print(f"warning: --quality-every: {e}; training goes on without it", file=sys.stderr)
                return {}
            z = torch.randn(QUALITY_SAMPLES, self.cfg.noise_dim, 1, 1, generator=torch.Generator().manual_seed(1))
            self.quality_z = z.to(self.device)
        samples = torch.cat([samples_of(self.nets.generator, z) for z in self.quality_z.split(500)])
        return self.quality.score(samples)

    def _pictures(self, epoch):
        """The epoch's sample grid, to TensorBoard and with --save-imgs to gen_images/: not worth stopping for."""
        wanted = self.args.save_imgs and self.grids
        if self.board.writer is None and not wanted:
            return
        samples = samples_of(self.nets.generator, self.fixed_z)  # one pass of G for both
        self.board.images(epoch + 1, samples)
        if wanted:
            try:
                save_grid(samples, os.path.join(self.args.out, "gen_images", f"imgs_epoch{epoch + 1}.png"))
            except WriteError as e:
                self.grids = False
                print(f"warning: {e}; training goes on without sample grids", file=sys.stderr)

    def _finish(self):
        """After training, or when resuming a run that stopped between its last epoch and the probe: the
        probe (a resumed run that trained more epochs needs a new one: its old one describes other
        weights), then the last pictures and the summary."""
        args, resumed = self.args, self.resumed
        if args.probe_folds and (self.start_epoch < args.epochs or not (resumed and resumed.get("probe"))):
            probe = run_probe(self.nets, args, self.device)
            if probe:
                print("linear decoding accuracy per layer (test split, %d-fold):" % args.probe_folds)
                print(format_probe(probe))
                save_checkpoint(self.ckpt_path, self._state(args.epochs, 0, probe=probe))
        self.board.close()
        monitor.finish(args, self.history, samples_of(self.nets.generator, self.fixed_z))


def train(args, group):
    """The training run of this process (see Run); its exit code."""
    return Run(args, group).train()


def main(argv=None):
    parser = get_parser()
    args = parse_args(parser, argv)
    note_release_flags(args)
    check_args(args, parser)
    keep_freed_memory()
    if args.multiprocessing_distributed:
        return distributed.spawn(_spawned, args, torch.cuda.device_count())
    return run(args, parser)


def _spawned(local_rank, args, nprocs):
    """One process of --multiprocessing-distributed."""
    sys.exit(run(distributed.spawned_args(args, local_rank, nprocs), get_parser()))


def run(args, parser):
    """train() in this process's group (several processes) or alone; user errors as one line."""
    try:
        return train(args, distributed.start(args))
    except BadArgument as e:
        parser.error(str(e))
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nerror: interrupted; checkpoints are written whole, so the last one in {args.out} is intact",
              file=sys.stderr)
        return 130
    finally:
        distributed.stop()


if __name__ == "__main__":
    sys.exit(main())
