#!/usr/bin/env python
"""How well a trained model's inference network F infers, in one command (docs/evaluation.md).

    python measure_inference.py --path RUN                      # the run's dataset and data
    python measure_inference.py --path RUN --dataset mnist --data DIR --n 4000 -b 100 --out DIR

From the checkpoint alone (the measures of inference_metrics.py; none needs the wake/sleep
discriminator):
- reconstruction error of test images from each layer k = 5 .. 1 (F up to h_k, G down to the
  image; eval mode), and for digits (mnist, digits) how often sample_quality's digit classifier
  gives a reconstruction its image's label;
- wake/sleep two-sample tests: a fresh linear classifier telling wake states of --n training
  images from sleep states of --n dreams (training mode, batches of -b, whole batches held out),
  per layer, per adjacent pair and on the whole state, each beside the same test between two
  random halves of 2 x --n training images (the null);
- the graded wake/sleep distance of the same states (matching_metrics.py) with its permutation null
  over whole batches, and both measures for the same networks at initialization (the reference row);
- where the match breaks, block by block: G's fit of each inferred layer, G's descent from wake
  states of other images, and F on G's own dreams (the positive control).
Images, splits, permutations and the networks' noise are drawn from --seed (default: the run's own
seed), so a rerun under another seed is an independent draw. Prints the tables; writes
inference_measures.json and reconstructions.png into --out (default: inference/ beside the
checkpoint). The checkpoint's networks are not changed.
"""
import argparse
import datetime
import os
import sys
import time

import torch
from torchvision.utils import make_grid

import inference_metrics as im
import matching_metrics as mm
from checkpoint import (add_architecture_flags, add_checkpoint_flags, dataset_of, initial_networks, load_networks,
                        resolve_checkpoint_path)
from data import DataMissing, make_batches
from sample_quality import DATASETS_MEASURED, QualityMeasure
from stats import mean_interval, proportion_interval
from utils import (HelpFormatter, UserError, isolated_rng, pick_device, pyplot, run_main, save_grid, to_unit_interval,
                   write_figure, write_json)

FIGURE_COLUMNS = 10  # test images shown in reconstructions.png


def get_parser():
    p = argparse.ArgumentParser(description="Measures of how well a trained model's inference network infers",
                                formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    add_architecture_flags(p)
    p.add_argument("--n", type=int, default=4000,
                   help="wake states and sleep states each (training images: twice as many, for the null); "
                        "test images reconstructed")
    p.add_argument("-b", "--batch-size", type=int, default=100,
                   help="batch of every training-mode pass (BatchNorm's batch statistics, as in training)")
    p.add_argument("--out", default=None, metavar="DIR", help="default: inference/ beside the checkpoint")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the images drawn, the networks' noise, the splits and the permutations "
                        "(default: the run's own training seed)")
    p.add_argument("--permutations", type=int, default=mm.PERMUTATIONS,
                   help="of the graded distance's null, per test (999: p-values down to 0.002)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    return p


def check_args(args, parser):
    problems = []
    if args.batch_size < 2:
        problems.append(f"-b must be at least 2 (BatchNorm on batch statistics), got {args.batch_size}")
    elif args.n < 4 * args.batch_size:
        problems.append(f"--n {args.n} is less than 4 batches of -b {args.batch_size}: the two-sample tests fit "
                        f"on 2 batches of each kind and score 2 others")
    if args.permutations < 19:
        problems.append(f"--permutations must be at least 19 (a p-value down to 0.05), got {args.permutations}")
    if problems:
        parser.error("; ".join(problems))


def draw_batches(dataset, root, image_size, batch_size, n, seed, train):
    """Up to n images of a split as (images, labels) batches on the CPU, in a random order seeded by
    seed. Training split: full batches only (the training-mode passes and the two-sample tests)."""
    batches = make_batches(dataset, root, image_size, batch_size, "cpu", train=train, workers=0, shuffle=True,
                           min_batch=batch_size if train else 1)
    batches.set_epoch(seed, 0)
    drawn, count = [], 0
    for x, y in batches:
        if count >= n:
            break
        if train and len(x) < batch_size:  # a folder batch that lost unreadable images
            continue
        drawn.append((x[:n - count], y[:n - count]))
        count += len(drawn[-1][0])
    return drawn


def two_sample_tests(nets, args, dataset, data, device):
    """Wake/sleep two-sample test and its null: ({set: result}, {set: result}, states per kind, what
    differs between the tested wake and sleep states (differences), (training batches, wake states,
    sleep states) for the graded measures)."""
    train = draw_batches(dataset, data, nets.cfg.image_size, args.batch_size, 2 * args.n, args.seed, train=True)
    n_batches = min(args.n // args.batch_size, len(train) // 2)
    if n_batches < 4:
        raise UserError(f"the {dataset} training split gives {len(train)} batches of -b {args.batch_size}; the "
                        f"two-sample tests need 8 (4 of wake states beside 4 of sleep, twice for the null): "
                        f"use a smaller -b")
    wake = im.wake_states(nets, (x.to(device) for x, _ in train[:2 * n_batches]))
    sleep = im.sleep_states(nets, n_batches, args.batch_size, device)
    try:
        return (im.wake_sleep_two_sample(wake[:n_batches], sleep, seed=args.seed),
                im.null_two_sample(wake, seed=args.seed), n_batches * args.batch_size,
                differences(nets, wake[:n_batches], sleep), (train[:n_batches], wake, sleep))
    except ValueError as e:  # scikit-learn refuses non-finite features
        raise UserError(f"cannot run the two-sample tests: {e}") from None


def graded_measures(nets, state, args, states, device):
    """The graded distance with its null, the same two measures for the networks at initialization,
    and the block diagnostics (matching_metrics), on the two-sample tests' states: the tested wake
    states, the other half of the training images' wake states (the start of G's descents), the dreams."""
    train, wake, sleep = states
    n, P, seed = len(sleep), args.permutations, args.seed
    untrained = initial_networks(nets.cfg, state.get("seed") or 0, device)
    initial_wake = im.wake_states(untrained, (x.to(device) for x, _ in train))
    initial_sleep = im.sleep_states(untrained, n, args.batch_size, device)
    return {"distance": mm.graded_distance(wake[:n], sleep, permutations=P, seed=seed),
            "untrained": {"wake_vs_sleep": im.wake_sleep_two_sample(initial_wake, initial_sleep, seed=seed),
                          "distance": mm.graded_distance(initial_wake, initial_sleep, permutations=P, seed=seed)},
            "generator_fit": mm.generator_fit(nets, wake[:n], sleep),
            "descents": mm.descents_from_wake(nets, wake[:n], wake[n:2 * n], P, seed),
            "positive_control": mm.positive_control(nets, sleep, P, seed)}


def differences(nets, wake, sleep):
    """What differs between wake and sleep states (inference_metrics): each layer's statistics, the
    residuals from G's prediction, and D's own separation of the same states."""
    return {"layers": {kind: im.layer_statistics(b) for kind, b in (("wake", wake), ("sleep", sleep))},
            "prediction_residual": {kind: im.prediction_residuals(nets, b) for kind, b in (("wake", wake),
                                                                                            ("sleep", sleep))},
            "largest_mean_difference": im.largest_mean_differences(wake, sleep),
            "discriminator": im.discriminator_separation(nets, wake, sleep)}


def images_to_reconstruct(nets, args, dataset, data):
    """Up to --n test images and labels, or training images where the dataset has no test split."""
    try:
        drawn, split = draw_batches(dataset, data, nets.cfg.image_size, args.batch_size, args.n, args.seed,
                                    train=False), "test"
    except DataMissing as e:  # an image folder without val/
        print(f"note: {e}; reconstructing training images instead", file=sys.stderr)
        drawn, split = draw_batches(dataset, data, nets.cfg.image_size, args.batch_size, args.n, args.seed,
                                    train=True), "train"
    return [x for x, _ in drawn], [y for _, y in drawn], split


def reconstruction_measures(nets, images, labels, classifier, device):
    """{k: {"mse": .., "label_agreement": ..}} and, with a classifier, its accuracy on the inputs."""
    on_device = [x.to(device) for x in images]
    errors = im.reconstruction_error(nets, on_device)
    measures = {k: {"mse": mean_interval(e)} for k, e in errors.items()}
    inputs = None
    if classifier is not None:
        y = torch.cat(labels)
        for k in im.KS:
            agrees = im.label_agreement(classifier, torch.cat([im.reconstructions(nets, x, k) for x in on_device]), y)
            measures[k]["label_agreement"] = proportion_interval(agrees)
        inputs = proportion_interval(im.label_agreement(classifier, torch.cat(images), y))
    return measures, inputs


def save_figure(nets, images, device, path):
    """Rows: FIGURE_COLUMNS test images, then their reconstructions from k = 5, 4, 3, 2, 1."""
    x = torch.cat(images)[:FIGURE_COLUMNS].to(device)
    rows = [x] + [im.reconstructions(nets, x, k) for k in im.KS]
    plt = pyplot("the figures")
    if plt is None:
        save_grid(torch.cat(rows), path, nrow=len(x))
        print(f"figure (rows: inputs, k = {', '.join(map(str, im.KS))}): {path}")
        return
    grid = make_grid(to_unit_interval(torch.cat(rows)), nrow=len(x), padding=2, pad_value=1)
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(x), 0.6 * len(rows) + 0.6))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    step = nets.cfg.image_size + 2  # make_grid's cell: the image and its padding
    ax.set_yticks([2 + step * (i + 0.5) for i in range(len(rows))], ["input"] + [f"k = {k}" for k in im.KS])
    ax.set_xticks([])
    ax.set_title("reconstructions: F up to h_k, G down to the image (eval mode)", fontsize=9)
    fig.tight_layout()
    write_figure(fig, plt, path)


def _interval(r, key="mean", digits=3):
    return f"{r[key]:.{digits}f} [{r['low']:.{digits}f}, {r['high']:.{digits}f}]"


def print_report(rec):
    agreement = rec["label_agreement_of_inputs"]
    print(f"\nreconstruction of {rec['n_reconstructed']} {rec['split']} images, F and G in eval mode "
          f"(k: F up to h_k, G down to the image); 95 % intervals")
    print(f"{'k':>6}  {'mse per pixel, [-1, 1] units':<30}" + ("  label agreement" if agreement else ""))
    for k, m in rec["reconstruction"].items():
        line = f"{k:>6}  {_interval(m['mse'], digits=4):<30}"
        print(line + (f"  {_interval(m['label_agreement'])}" if agreement else ""))
    if agreement:
        print(f"{'inputs':>6}  {'':<30}  {_interval(agreement)}  (the classifier on the images themselves)")
    print(f"\nwake/sleep two-sample test: {rec['n_per_kind']} wake and {rec['n_per_kind']} sleep states in batches "
          f"of {rec['batch_size']}, training mode; a fresh classifier fitted on half the batches, accuracy on the "
          f"others (0.5 = indistinguishable); null: two halves of the training images")
    untrained = rec["graded"]["untrained"]
    print(f"{'states':>8}  {'wake vs sleep':<24}  {'null: wake vs wake':<24}  untrained networks: wake vs sleep")
    for name, r in rec["wake_vs_sleep"].items():
        print(f"{name:>8}  {_interval(r, 'accuracy'):<24}  {_interval(rec['null'][name], 'accuracy'):<24}  "
              f"{_interval(untrained['wake_vs_sleep'][name], 'accuracy')}")
    print_graded(rec["graded"], rec["permutations"])
    print_differences(rec["differences"])


def _distance(r):
    return f"{r['distance']:.4f} ({r['null_99']:.4f}, p {r['p']:.3f})"


def print_graded(graded, permutations):
    print(f"\ngraded wake/sleep distance H of the same states (0: matched, 1 at most); in brackets the 99th "
          f"percentile of its null ({permutations} permutations of whole batches) and the p-value")
    print(f"{'states':>8}  {'trained':<28}  untrained networks")
    for name, r in graded["distance"].items():
        print(f"{name:>8}  {_distance(r):<28}  {_distance(graded['untrained']['distance'][name])}")
    print("\nwhere the match breaks, block k of G: the fraction of the inferred h(k-1)'s variance that G's noiseless "
          "block of the inferred hk explains; the residual's rms on wake states against G's own (sleep states); "
          "H of G's descent from wake hk of other images to each layer below, against wake states (* p > 0.01)")
    print(f"{'k':>3}  {'explained':>9}  {'residual rms':>17}  descent from wake hk: H at h(k-1), .., h0")
    for k, fit in graded["generator_fit"].items():
        descent = graded["descents"][k]
        below = "  ".join(f"{descent[f'h{l}']['distance']:.4f}{'*' if descent[f'h{l}']['p'] > 0.01 else ' '}"
                          for l in range(int(k) - 1, -1, -1))
        print(f"{k:>3}  {fit['explained']:>9.3f}  {fit['residual_rms_wake']:>8.4f}/{fit['residual_rms_sleep']:<8.4f}  "
              f"{below}")
    control = graded["positive_control"]
    print(f"\npositive control, F on G's own dreams against the states dreamed: per layer H (null 99th percentile, p) "
          f"and the relative error; F's h5 recovers {control['top_r2']:.3f} of the variance of N(z)")
    for l in range(1, im.N_LAYERS):
        print(f"{'h' + str(l):>8}  {_distance(control[l]):<28}  relative error {control[l]['relative_error']:.3f}")


def print_differences(differ):
    layers, residual = differ["layers"], differ["prediction_residual"]
    print("\nthe same states, wake / sleep: channel RMS, fraction of exact zeros, mean entry, an entry's sd across samples, and the mean "
          "|h_(k-1) - G's noiseless block of h_k| of the layer below each")
    print(f"{'layer':>6}  {'channel rms':>15}  {'zeros':>13}  {'mean':>13}  {'sd':>13}  {'residual from G':>17}  "
          f"largest |mean difference| of an entry")
    for l in layers["wake"]:
        w, s = layers["wake"][l], layers["sleep"][l]
        print(f"{'h' + str(l):>6}  {w['channel_rms']:>7.3f}/{s['channel_rms']:<7.3f}  {w['zeros']:>6.3f}/"
              f"{s['zeros']:<6.3f}  {w['mean']:>6.3f}/{s['mean']:<6.3f}  {w['sd']:>6.3f}/{s['sd']:<6.3f}  "
              f"{residual['wake'][l]:>8.4f}/{residual['sleep'][l]:<8.4f} (h{l - 1})  "
              f"{differ['largest_mean_difference'][l]:.3f}")
    d = differ["discriminator"]
    if d:
        print(f"D on the same states: mean score wake {d['wake']:.3f}, sleep {d['sleep']:.3f}, margin {d['margin']:.3f} "
              f"({d['margin_sd']:.2f} pooled sd), AUROC {d['auroc']:.3f}")


def setup(args):
    """(checkpoint path, state, networks, device, dataset, data), refusing a dataset of other channels."""
    device = pick_device(args.device, args.gpu)
    path = resolve_checkpoint_path(args.path)
    state, nets = load_networks(path, device, args)  # a --dataset of other channels is refused here, in one line
    dataset, data = dataset_of(path, state, args)
    return path, state, nets, device, dataset, data


def measure(args):
    start = time.time()
    path, state, nets, device, dataset, data = setup(args)
    if args.seed is None:
        args.seed = state.get("seed") or 0
    out = args.out or os.path.join(os.path.dirname(path), "inference")
    classifier = None
    if dataset in DATASETS_MEASURED:  # trained on its first use, then read from its cache
        classifier = QualityMeasure(dataset, data, nets.cfg.image_size, cache_dirs=[os.path.dirname(path)]).net
    torch.manual_seed(args.seed)  # F's and G's noise, and z
    wake_vs_sleep, null, n_per_kind, differ, states = two_sample_tests(nets, args, dataset, data, device)
    images, labels, split = images_to_reconstruct(nets, args, dataset, data)
    reconstruction, inputs = reconstruction_measures(nets, images, labels, classifier, device)
    with isolated_rng(args.seed + 1):  # random numbers of their own: the measures above read as they did before
        graded = graded_measures(nets, state, args, states, device)
    os.makedirs(out, exist_ok=True)
    save_figure(nets, images, device, os.path.join(out, "reconstructions.png"))
    rec = {"checkpoint": os.path.abspath(path), "epoch": state.get("epoch"), "model": state["model"],
           "dataset": dataset, "data": os.path.abspath(data) if data else None, "seed": args.seed,
           "batch_size": args.batch_size, "n_per_kind": n_per_kind, "split": split,
           "n_reconstructed": sum(len(x) for x in images),
           "reconstruction": {str(k): m for k, m in reconstruction.items()},
           "label_agreement_of_inputs": inputs, "wake_vs_sleep": wake_vs_sleep, "null": null,
           "permutations": args.permutations, "graded": graded, "differences": differ,
           "time": datetime.datetime.now().isoformat(timespec="seconds")}
    print_report(rec)
    rec["seconds"] = round(time.time() - start, 1)
    write_json(os.path.join(out, "inference_measures.json"), rec)
    print(f"\nmeasures: {os.path.join(out, 'inference_measures.json')} ({rec['seconds']} s)")
    return 0


def main(argv=None):
    return run_main(get_parser(), check_args, measure, argv)


if __name__ == "__main__":
    sys.exit(main())
