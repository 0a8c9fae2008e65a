#!/usr/bin/env python
"""The wake/sleep discriminator as a neuromodulator: record it, and put a trained model through
the protocols by which cholinergic and novelty responses are studied (docs/neuromodulation.md).

    python neuromodulation.py --path RUN                       # every experiment, on the run's data and seed
    python neuromodulation.py --path RUN --early RUN/checkpoint_epoch2.pth.tar   # one more control
    python neuromodulation_summary.py RUN1 RUN2 ...            # each effect across runs (seeds)

The paper maps D's score of the network's state onto a neuromodulator (#1, putatively
acetylcholine): high in wake, pushed down in sleep, and projected back to gate the plasticity of
the feedforward (inference) connections. recording.py records each input's signal, gate, weight
and generative surprisal by the training step's own code; neuromodulation_experiments.py holds the
experiments. Every experiment runs on the trained networks and on each control (--controls: the
networks at initialization by default; --early: an early checkpoint), on inputs drawn from the
run's own seed unless --seed is given. This script is the command line: its flags and their
checks, and the order of the experiments; neuromodulation_records.py turns the recordings into
effects (each with an interval whose unit is the scored batch) and the records that
neuromodulation_summary.py compares across runs; neuromodulation_report.py prints their tables
and draws the figures into --out.
"""
import argparse
import datetime
import os
import sys

import neuromodulation_experiments as ex
import train
from checkpoint import add_checkpoint_flags, dataset_of, load_networks, resolve_checkpoint_path
from data import DATASETS, channels_of
from losses import StepConfig
from neuromodulation_records import (control_stream_effects, dose_records, familiarization_effects,
                                     familiarization_record, novelty_records, of_networks, plasticity_records,
                                     wake_sleep_records)
from neuromodulation_report import (plot_conditions, plot_dose, plot_familiarization, print_dose, print_familiarization,
                                    print_novelty, print_plasticity, print_wake_sleep)
from step import check_d_gradients
from utils import HelpFormatter, UserError, append_jsonl, pick_device, run_main, unwritable_folder, write_json

EXPERIMENTS = ("wake-sleep", "novelty", "dose-response", "plasticity", "familiarization")


def get_parser():
    p = argparse.ArgumentParser(description="Record the wake/sleep discriminator as a neuromodulator",
                                formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=EXPERIMENTS)
    p.add_argument("-b", "--batch-size", type=int, default=100,
                   help="the one size of every scored batch (D's minibatch std couples a batch's samples)")
    p.add_argument("--n-images", type=int, default=1000,
                   help="inputs per condition in the whole-batch design (a multiple of -b is used)")
    p.add_argument("--oddballs", type=int, default=5, metavar="M",
                   help="oddball design: probes per batch, the other -b minus M familiar")
    p.add_argument("--n-oddball", type=int, default=200, help="oddball design: probes per condition")
    p.add_argument("--controls", nargs="*", default=["init"], metavar="init|CHECKPOINT",
                   help="networks every experiment also runs on, beside the trained ones, in the same records and "
                        "tables: init (the run's networks untrained, same flags and the run's seed, fresh Adam) and "
                        "checkpoints of the run (labelled by their epoch)")
    p.add_argument("--early", default=None, metavar="CHECKPOINT",
                   help="an early checkpoint of the run (train.py --save-every), one more control, labelled 'early' "
                        "whatever its epoch, so that the summary pairs it across runs")
    p.add_argument("--sustained-steps", type=int, default=20,
                   help="plasticity: training steps on a condition over which F's update is measured")
    p.add_argument("--ood-dataset", default=None, choices=DATASETS,
                   help="an out-of-distribution dataset (its test split), e.g. cifar10 for an MNIST model; "
                        "converted to the model's channels and resized to its image size")
    p.add_argument("--ood-data", default=None, metavar="DIR", help="the root of --ood-dataset")
    p.add_argument("--repeats", type=int, default=32, metavar="K",
                   help="familiarization: the repeated set, K test images (also the batch of every step)")
    p.add_argument("--presentations", type=int, default=100, help="familiarization: training steps on a stream")
    p.add_argument("--streams", type=int, default=5,
                   help="familiarization: independent streams (their own images and seeds): the unit of its intervals")
    p.add_argument("--novel-rate", type=float, default=0.25,
                   help="familiarization: chance that a step's batch has one repeated image replaced by a novel one")
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of each bootstrap interval")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the inputs drawn, the oddball positions, the networks' noise and the streams "
                        "(default: the run's own seed, from its checkpoint, so that runs of several seeds draw "
                        "images of their own)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    p.add_argument("--json", default=None, metavar="FILE.jsonl", help="append one record per condition here")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the figures and records.json (default: neuromodulation/ beside the checkpoint)")
    return p


def check_args(args, parser):
    problems = [f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}"
                for k in ("n_images", "repeats", "presentations", "bootstrap", "streams", "n_oddball", "sustained_steps")
                if getattr(args, k) < 1]
    if args.seed is not None and args.seed < 0:  # numpy's generators (the bootstrap) take no negative seed
        problems.append(f"--seed must not be negative, got {args.seed}")
    if args.batch_size < 2:
        problems.append(f"-b must be at least 2 (BatchNorm and the minibatch std need two samples), got "
                        f"{args.batch_size}")
    elif args.n_images < args.batch_size:
        problems.append(f"--n-images {args.n_images} is less than one batch (-b {args.batch_size})")
    elif not 1 <= args.oddballs < args.batch_size:
        problems.append(f"--oddballs must lie in 1 .. {args.batch_size - 1} (-b minus one), got {args.oddballs}")
    elif args.n_oddball < args.oddballs:
        problems.append(f"--n-oddball {args.n_oddball} is less than one batch's probes (--oddballs {args.oddballs})")
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


# --- The run: its networks, the experiments in order, the records written ------------------------

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
    seed, seed_from = image_seed(args, state)
    return ex.Setup(args, nets, hp, run_flags, state, path, dataset, data, device, seed, seed_from)


def image_seed(args, state):
    """(seed, where it came from) of every draw of the experiments: --seed where given, else the run's."""
    if args.seed is not None:
        return args.seed, "--seed"
    if state.get("seed") is None:  # (every checkpoint train.py writes records its seed)
        return 0, "0: the checkpoint records no seed"
    return int(state["seed"]), "run"


def control_networks(s):
    """[ex.Subject] of --controls and --early: init, and checkpoints of the same architecture, each
    label once (an effect's name carries it); checked before any work."""
    asked = [("--controls", c) for c in s.args.controls] + ([("--early", s.args.early)] if s.args.early else [])
    controls = []
    for flag, c in asked:
        if flag == "--controls" and c == "init":
            controls.append(ex.initial_networks(s))
            continue
        state, nets = load_networks(resolve_checkpoint_path(c), s.device)
        if nets.cfg != s.nets.cfg:
            raise UserError(f"{flag} {c}: another architecture than {s.checkpoint}'s; nothing was computed")
        controls.append(ex.of_checkpoint("early" if flag == "--early" else f"epoch {state.get('epoch')}", state, nets))
    labels = [c.label for c in controls]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise UserError(f"--controls/--early: more than one control is {', '.join(map(repr, twice))}; give each "
                        f"once; nothing was computed")
    return controls


def one_experiment(s, experiment, subject, inputs, out):
    """One experiment on one subject's networks: its records, tagged with whose they are, and its
    table printed; the trained networks' figure drawn (the dose-response's, of every subject, by
    run_experiments)."""
    figure = subject.label == "trained"
    if experiment == "wake-sleep":
        conditions, reference = ex.wake_sleep(s, subject.nets)
        found, show = wake_sleep_records(s, conditions, reference), print_wake_sleep
        if figure:
            plot_conditions("wake and sleep", conditions, os.path.join(out, "wake-sleep.png"))
    elif experiment == "novelty":
        whole, oddball = ex.novelty(s, inputs["novelty"], subject.nets)
        found, show = novelty_records(s, whole, oddball), print_novelty
        if figure:
            plot_conditions("familiar, novel and out-of-distribution inputs (whole-batch)", list(whole.items()),
                            os.path.join(out, "novelty.png"))
    elif experiment == "dose-response":
        found, show = dose_records(s, ex.dose_response(s, subject.nets, inputs["dose"])), print_dose
    elif experiment == "plasticity":
        found, show = plasticity_records(s, ex.plasticity(s, inputs["novelty"], subject)), print_plasticity
    else:
        streams = [ex.familiarization(s, i, subject) for i in range(s.args.streams)]
        controls = [ex.control_stream(s, i, subject) for i in range(s.args.streams)]
        found = [familiarization_record([familiarization_effects(st) for st in streams],
                                        [control_stream_effects(*c) for c in controls])]
        show = lambda records: print_familiarization(records[0])  # noqa: E731 (one record, of all streams)
        if figure:
            plot_familiarization(streams[0], os.path.join(out, "familiarization.png"))
    found = of_networks(found, subject)
    print(f"\n[{experiment}: {subject.label} networks, epoch {subject.epoch}, {subject.steps} steps]", end="")
    show(found)
    return found


def run_experiments(s, subjects, out):
    """Every experiment asked for, in order, each on every subject (the trained networks, then each
    control): their records (tables printed and figures drawn on the way)."""
    wanted = set(s.args.experiments)
    # drawn once for every subject and both experiments that score them (the OOD dataset is read,
    # and said, once): a control sees the very images the trained networks see
    inputs = {"novelty": ex.novelty_inputs(s) if {"novelty", "plasticity"} & wanted else None,
              "dose": ex.dose_inputs(s) if "dose-response" in wanted else None}
    records = []
    for experiment in (e for e in EXPERIMENTS if e in wanted):
        found = [r for subject in subjects for r in one_experiment(s, experiment, subject, inputs, out)]
        if experiment == "dose-response":
            plot_dose(found, os.path.join(out, "dose-response.png"))
        records += found
    return records


def neuromodulation(args):
    s = setup(args)
    out = args.out or os.path.join(os.path.dirname(s.checkpoint), "neuromodulation")
    problem = unwritable_folder(out)  # before the work, which a figure or records.json could not keep
    if problem:
        raise UserError(f"--out {out} cannot be written ({problem}); nothing was computed")
    subjects = [ex.trained(s)] + control_networks(s)
    common = {"checkpoint": os.path.abspath(s.checkpoint), "epoch": s.state.get("epoch"), "model": s.state["model"],
              "dataset": s.dataset, "data": os.path.abspath(s.data) if s.data else None,
              "classes": s.run_flags.classes, "d_gradients": s.hp.d_gradients, "batch_size": args.batch_size,
              "image_seed": s.seed, "image_seed_from": s.seed_from,
              "flags": vars(args), "time": datetime.datetime.now().isoformat(timespec="seconds")}
    print(f"{s.checkpoint}: epoch {s.state.get('epoch')}, gamma {s.hp.gamma}, {s.dataset}"
          f"{'' if s.run_flags.classes is None else ', classes ' + ' '.join(map(str, s.run_flags.classes))}; "
          f"networks in training mode, as the step runs them; images drawn from seed {s.seed} ({s.seed_from})")
    records = [{**common, **r} for r in run_experiments(s, subjects, out)]
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
