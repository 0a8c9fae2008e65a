#!/usr/bin/env python
"""Write samples of a trained generator as PNG files, the input of TTUR's or pytorch-fid's FID.

    python generate_and_save_imgs.py --dataset cifar10 --path RUN/checkpoint.pth.tar --image-size 32 \
        --n-filters 128 --noise-dim 100 --divisive-normalization

The checkpoint alone defines the networks; architecture flags, where given, are checked
against it. Writes --n-images files 00000.png, 00001.png, .. (8-bit RGB, lossless, also for
MNIST, since TTUR's fid.py requires three channels) into --out (default: a folder `samples`
beside the checkpoint) and a samples.json saying what made them. Sample i is G(z_i) in eval
mode, z the first --n-images draws of torch.randn(N, noise_dim, 1, 1) from a torch.Generator
seeded with --seed, so a seeded run gives the same images at any batch size. With
--fid-ref it also prints the FID of the samples (needs the optional pytorch-fid).
"""
import argparse
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

import fid
import sample_quality
from checkpoint import add_architecture_flags, load_networks, resolve_checkpoint_path
from data import DATASETS, to_unit_range
from utils import (HelpFormatter, UserError, WriteError, add_release_flags, pick_device, progress_bar, run_main,
                   write_atomically, write_json)

MANIFEST = "samples.json"
SAMPLE_NAME = re.compile(r"\d{5,}\.png")


def get_parser():
    p = argparse.ArgumentParser(description="Save samples of a trained model as PNG files (and optionally their FID)",
                                formatter_class=HelpFormatter)
    p.add_argument("--path", required=True, help="checkpoint file, or the run folder holding checkpoint.pth.tar")
    p.add_argument("--dataset", default=None, choices=DATASETS,
                   help="the dataset the model was trained on, checked against the checkpoint's channels "
                        "(1 for digits and mnist, else 3)")
    add_architecture_flags(p)
    p.add_argument("-b", "--batch-size", type=int, default=100, help="samples per forward pass")
    p.add_argument("--n-images", type=int, default=10000, help="how many samples to write")
    p.add_argument("--out", default=None, help="folder for the PNG files; if not given, samples/ beside the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the numbered PNG files of an earlier run in --out first (otherwise refused)")
    p.add_argument("--npz", default=None, metavar="FILE.npz",
                   help="also write all samples as one uint8 array 'images' of shape (N, S, S, 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise z")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--gpu", type=int, default=None, help="CUDA device index (implies --device cuda)")
    g = p.add_argument_group("FID (needs pytorch-fid)")
    g.add_argument("--fid-ref", default=None, metavar="REF",
                   help="real images to compare with: a .npz of statistics (mu, sigma), a dataset name "
                        "(its train split, read from --data), or a folder of image files")
    g.add_argument("--data", default=None, metavar="DIR",
                   help="dataset root, when --fid-ref is a dataset name or with --classifier-fd (default: the run's)")
    g.add_argument("--save-ref-stats", default=None, metavar="FILE.npz",
                   help="save the statistics of --fid-ref here, to pass as --fid-ref next time")
    g = p.add_argument_group("sample quality for digits, offline (sample_quality.py)")
    g.add_argument("--classifier-fd", action="store_true",
                   help="score the samples by a digit classifier trained on the run's dataset (mnist, digits): "
                        "Fréchet distance and KID of its features to the test split's, precision, recall, "
                        "confidence, class entropy")
    add_release_flags(p, {"--noise-type": (dict(metavar="TYPE"), "the networks' noise is part of the checkpoint")})
    return p


def check_args(args, parser):
    problems = []
    for flag in ("n_images", "batch_size"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ("npz", "save_ref_stats"):
        path = getattr(args, flag)
        if path is not None and not path.endswith(".npz"):
            problems.append(f"--{flag.replace('_', '-')} {path} must end in .npz")
    if args.fid_ref and args.n_images < 2:
        problems.append("--fid-ref needs --n-images of at least 2 (a covariance)")
    if args.classifier_fd and args.n_images < sample_quality.MIN_SAMPLES:
        problems.append(f"--classifier-fd needs --n-images of at least {sample_quality.MIN_SAMPLES} "
                        f"(precision and recall: {sample_quality.NEIGHBOURS} nearest neighbours of each sample)")
    if args.save_ref_stats and not args.fid_ref:
        problems.append("--save-ref-stats needs --fid-ref")
    if args.save_ref_stats and args.fid_ref and args.fid_ref.endswith(".npz"):
        problems.append("--save-ref-stats: --fid-ref is already a statistics file")
    if problems:
        parser.error("; ".join(problems))


def prepare_folder(out, overwrite):
    """An --out with no PNG files in it: the FID of a folder that mixes two runs would be wrong."""
    try:
        os.makedirs(out, exist_ok=True)
        pngs = [f for f in os.listdir(out) if f.lower().endswith(".png")]
    except OSError as e:
        raise UserError(f"cannot use --out {out}: {e}") from None
    if not pngs:
        return
    if not overwrite:
        raise UserError(f"--out {out} already holds {len(pngs)} PNG files (an earlier run?); a folder that mixes "
                        f"runs would give a wrong FID. Pass --overwrite to delete them, or choose another --out")
    foreign = sorted(f for f in pngs if not SAMPLE_NAME.fullmatch(f))
    if foreign:
        raise UserError(f"--out {out} holds PNG files this script does not write (e.g. {foreign[0]}); "
                        f"--overwrite deletes only numbered samples, so choose another --out")
    for name in pngs:
        os.remove(os.path.join(out, name))
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))


def sample_noise(n, noise_dim, seed):
    # Drawn at once on the CPU: the same z (and images) whatever the batch size or device.
    return torch.randn(n, noise_dim, 1, 1, generator=torch.Generator().manual_seed(seed))


def write_png(path, image):
    """uint8 (3, H, W) -> an 8-bit RGB PNG."""
    try:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")
    except OSError as e:
        if os.path.exists(path):
            os.unlink(path)  # PIL leaves what it wrote of the file
        raise WriteError(path, e) from None


def generate(args):
    device = pick_device(args.device, args.gpu)
    ckpt = resolve_checkpoint_path(args.path)
    state, nets = load_networks(ckpt, device, args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(ckpt)), "samples")
    # The references before any sample: a missing pytorch-fid, reference or dataset should cost nothing.
    reference = fid_reference(args, nets.cfg.image_size, device) if args.fid_ref else None
    quality = None
    if args.classifier_fd:  # trains the classifier on its first use
        config = state.get("config", {})
        quality = sample_quality.QualityMeasure(args.dataset or config.get("dataset"),
                                                args.data or config.get("data"), nets.cfg.image_size,
                                                cache_dirs=[os.path.dirname(os.path.abspath(ckpt))])
    prepare_folder(out, args.overwrite)

    images, width = write_samples(nets, args, out, device)
    manifest = {"checkpoint": os.path.abspath(ckpt), "epoch": state.get("epoch"), "seed": args.seed,
                "n_images": args.n_images, "model": state["model"], "files": f"{'0' * width}.png ..",
                "pixels": "uint8 RGB, round((x + 1) / 2 * 255) of the generator's tanh output x"}
    if args.npz:
        array = images.permute(0, 2, 3, 1).numpy()  # (N, S, S, 3), the layout of the PNGs
        os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
        write_atomically(args.npz, lambda f: np.savez(f, images=array))
        print(f"wrote all samples as one array to {args.npz}")
    if reference is not None:
        manifest["fid"] = fid_of(images, reference, args, device)
    if quality is not None:
        scores = quality.score(to_unit_range(images[:, :nets.cfg.channels]))
        manifest["classifier_fd"] = {**scores, "classifier": quality.cache}
        print("classifier measure: " + sample_quality.summary(scores)
              + f" ({args.n_images} samples vs the test split; comparable only at equal sample counts)")
    write_json(os.path.join(out, MANIFEST), manifest)
    return 0


def fid_reference(args, image_size, device):
    """(Inception network, mu, sigma, description) of --fid-ref; its statistics saved with --save-ref-stats."""
    inception = fid.inception(device)
    mu_r, sigma_r, ref = fid.reference_statistics(args.fid_ref, inception, device, args.data, image_size,
                                                  args.batch_size)
    if args.save_ref_stats:
        fid.save_statistics(args.save_ref_stats, mu_r, sigma_r)
        print(f"saved the statistics of {ref} to {args.save_ref_stats}")
    return inception, mu_r, sigma_r, ref


@torch.no_grad()
def write_samples(nets, args, out, device):
    """--n-images samples of G in eval mode as numbered PNG files in out: (uint8 (N, 3, S, S), name width)."""
    G = nets.generator.eval()
    z = sample_noise(args.n_images, nets.cfg.noise_dim, args.seed)
    width = max(5, len(str(args.n_images - 1)))
    kept = []
    for start in progress_bar(range(0, args.n_images, args.batch_size), desc="samples", unit="batch", dynamic_ncols=True):
        x = G(z[start:start + args.batch_size].to(device))[0]  # (B, c, S, S) in [-1, 1]
        images = fid.three_channels(fid.to_uint8(x)).cpu()
        for i, image in enumerate(images):
            write_png(os.path.join(out, f"{start + i:0{width}d}.png"), image)
        kept.append(images)
    print(f"wrote {args.n_images} samples to {out}")
    return torch.cat(kept), width


def fid_of(images, reference, args, device):
    inception, mu_r, sigma_r, ref = reference
    if args.n_images < fid.DIMS:
        print(f"note: with fewer samples than {fid.DIMS} features the covariance is singular; "
              f"such an FID is biased upwards and comparable only at the same sample count")
    mu_g, sigma_g = fid.statistics(fid.activations(inception, images.split(args.batch_size), device))
    value = fid.frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
    print(f"FID {value:.3f} ({args.n_images} samples vs {ref})")
    return {"value": value, "reference": ref}


def main(argv=None):
    return run_main(get_parser(), check_args, generate, argv)


if __name__ == "__main__":
    sys.exit(main())
