#!/usr/bin/env python
"""How linearly separable the classes are in each layer of a trained inference network.

    python SVM_classify_from_model.py --dataset cifar10 --path RUN/checkpoint.pth.tar --data CIFAR \
        -b 512 --image-size 32 --n-filters 128 --noise-dim 100 --divisive-normalization \
        --n-folds 10 --alpha 0.0001 --epochs 5

On the dataset's test split, the inference network samples every layer (Input, Layer1 ..
Layer5) once per image; then, for each of --n-folds stratified folds and each layer, a linear
SVM (hinge loss, SGD, elastic-net penalty --alpha, --epochs passes) is trained on the
standardized features of the other folds and scored on the held-out one (--resample-features:
the original release's procedure, new noisy features for every pass). Prints the accuracy
mean +/- std over folds per layer; --json appends the result as one JSON line naming the
checkpoint. --dataset and --data default to those the model was trained on.
"""
import argparse
import datetime
import os
import sys

import torch

from checkpoint import add_architecture_flags, load_networks, resolve_checkpoint_path
from data import DATASETS, DataError, make_batches
from metrics import format_probe, layer_features, linear_probe, resampled_probe
from utils import HelpFormatter, UserError, add_release_flags, append_jsonl, nonfinite_floats, pick_device, run_main


def get_parser():
    p = argparse.ArgumentParser(description="Per-layer linear SVM decoding of class labels from a trained model",
                                formatter_class=HelpFormatter)
    p.add_argument("--path", required=True, help="checkpoint file, or the run folder holding checkpoint.pth.tar")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="dataset whose test split is probed (default: the one the model was trained on)")
    p.add_argument("-d", "--data", default=None, metavar="DIR",
                   help="dataset root (default: the one the model was trained on)")
    add_architecture_flags(p)
    p.add_argument("-b", "--batch-size", type=int, default=512, help="images per forward pass")
    p.add_argument("-j", "--workers", type=int, default=4, help="data-loading processes (image folders only)")
    p.add_argument("--n-folds", type=int, default=10, help="folds of the cross-validation")
    p.add_argument("--alpha", type=float, default=1e-4, help="elastic-net penalty of the SVM")
    p.add_argument("--epochs", type=int, default=5, help="SGD passes over the training folds")
    p.add_argument("--resample-features", action="store_true",
                   help="the original release's procedure: new noisy features of every minibatch in every SGD "
                        "pass (the network's noise as augmentation), standardization and SVM updated by "
                        "partial_fit; slower. Default: each image's features sampled once")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, the SGD and the network's sampling noise")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    p.add_argument("--json", default=None, metavar="FILE", help="append the result to FILE as one JSON line")
    unused = "not used by the linear SVM (the original script defined it for its other decoders)"
    add_release_flags(p, {"--noise-type": (dict(metavar="TYPE"), "the networks' noise is part of the checkpoint"),
                          "--lr": (dict(type=float), unused), "--learning-rate": (dict(type=float), unused),
                          "--opt": (dict(), unused), "--wd": (dict(type=float), unused),
                          "--weight-decay": (dict(type=float), unused),
                          "--nonlinear": (dict(action="store_true"), unused),
                          "--loss-type": (dict(), unused), "--hidden-size": (dict(type=int), unused),
                          "--he-initialization": (dict(action="store_true"), unused),
                          "--lr-schedule": (dict(action="store_true"), unused)})
    return p


def check_args(args, parser):
    # nan and inf would end in a traceback inside scikit-learn. The release's flags without effect are
    # gone from args by now (note_release_flags), so only the flags in use are checked.
    nonfinite, problems = nonfinite_floats(parser, args)
    if args.n_folds < 2:
        problems.append(f"--n-folds must be at least 2, got {args.n_folds}")
    for flag in ("batch_size", "epochs"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        problems.append(f"--json {args.json}: its folder does not exist")
    if ("alpha" not in nonfinite and args.alpha < 0) or args.workers < 0:
        problems.append("--alpha and -j must not be negative")
    if problems:
        parser.error("; ".join(problems))


def probe(args):
    device = pick_device(args.device, args.gpu)
    ckpt = resolve_checkpoint_path(args.path)
    state, nets = load_networks(ckpt, device, args)
    trained = state.get("config") or {}
    dataset = args.dataset or trained.get("dataset")
    data = args.data or trained.get("data")
    if dataset not in DATASETS:
        raise UserError("the checkpoint does not say which dataset it was trained on; pass --dataset")
    if dataset != "digits" and not (data and os.path.isdir(data)):
        raise DataError(f"--data {data} is not a folder (pass the root that holds the {dataset} dataset)")
    batches = make_batches(dataset, data, nets.cfg.image_size, args.batch_size, device, train=False,
                           workers=args.workers, shuffle=False, min_batch=1)

    torch.manual_seed(args.seed)  # the inference network samples: its noise is part of the features
    try:
        if args.resample_features:
            images, labels = (torch.cat(t) for t in zip(*batches))
            labels = labels.cpu().numpy()
            results = resampled_probe(nets.inference, images, labels, n_folds=args.n_folds, alpha=args.alpha,
                                      epochs=args.epochs, seed=args.seed, batch_size=args.batch_size)
        else:
            features, labels = layer_features(nets.inference, batches)  # once per image, reused by every fold
            results = linear_probe(features, labels, n_folds=args.n_folds, alpha=args.alpha, epochs=args.epochs,
                                   seed=args.seed)
    except ValueError as e:  # too few images of a class for the folds, or non-finite features
        raise UserError(f"cannot probe {dataset}: {e}") from None
    folds = len(next(iter(results.values()))["folds"])
    procedure = "features resampled every pass" if args.resample_features else "features sampled once"
    print(f"linear SVM accuracy per layer: {ckpt}, {dataset} test split, {len(labels)} images, {folds}-fold, "
          f"{procedure}")
    print(format_probe(results))
    if args.json:
        append_jsonl(args.json, {
            "checkpoint": os.path.abspath(ckpt), "epoch": state.get("epoch"), "model": state["model"],
            "dataset": dataset, "data": os.path.abspath(data) if data else None, "split": "test",
            "n_images": len(labels), "n_folds": folds, "alpha": args.alpha, "epochs": args.epochs,
            "seed": args.seed, "resample_features": args.resample_features,
            "time": datetime.datetime.now().isoformat(timespec="seconds"), "accuracy": results})
    return 0


def main(argv=None):
    return run_main(get_parser(), check_args, probe, argv)


if __name__ == "__main__":
    sys.exit(main())
