"""Fréchet Inception Distance (Heusel et al. 2017, arXiv:1706.08500) without TensorFlow.

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

between Gaussians fitted to Inception-v3 pool3 features (2048) of two image sets. The
distance and the statistics files are plain numpy; the features come from pytorch-fid's
port of TTUR's Inception graph, an optional dependency (`pip install pytorch-fid`), so
numbers are comparable with TTUR's `fid.py` (not identical to the last digit). Statistics
are `.npz` files with arrays `mu` and `sigma`, the layout TTUR and pytorch-fid both read.
"""
import os
import zipfile

import numpy as np
import torch
from PIL import Image

from data import DATASETS, DataError, make_batches, num_images
from utils import UserError, progress_bar, write_atomically

DIMS = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)) with R = S1^(1/2), because S1 S2 = R (R S2 R) R^-1 is
    similar to the symmetric PSD matrix R S2 R. Its eigenvalues come from eigvalsh, real by
    construction, so there is no complex sqrtm output to discard, and singular covariances
    (fewer samples than dimensions) need no regularizing offset."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)  # symmetrize away round-off before eigvalsh
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def statistics(features):
    """(N, D) features -> mean (D,) and covariance (D, D), in float64 (N - 1 in the denominator, as TTUR)."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least two feature vectors, got an array of shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_statistics(path, mu, sigma):
    if not path.endswith(".npz"):
        raise UserError(f"statistics file {path} must end in .npz (numpy would add the suffix itself)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_statistics(path, dims=None):
    """mu, sigma from an .npz written by this module, TTUR or pytorch-fid."""
    dims = dims or DIMS
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma = f["mu"], f["sigma"]
    except FileNotFoundError:
        raise UserError(f"no statistics file {path}") from None
    except KeyError:
        raise UserError(f"{path} has no arrays 'mu' and 'sigma'; is it a file of FID statistics?") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, or not an npz at all
        raise UserError(f"cannot read FID statistics from {path}: {e}") from None
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        raise UserError(f"{path} holds statistics of shape mu {mu.shape}, sigma {sigma.shape}; "
                        f"expected Inception pool3 features ({dims},) and ({dims}, {dims})")
    return mu, sigma


def inception(device):
    """pytorch-fid's Inception-v3 (pool3, 2048 features), or a UserError saying how to get it."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        raise UserError("--fid-ref needs pytorch-fid, an optional dependency: pip install pytorch-fid "
                        "(or compute FID with TTUR's fid.py on the folder of PNGs)") from None
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[DIMS]])
    except Exception as e:  # noqa: BLE001 (weights come from GitHub on first use: any network error lands here)
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise UserError(f"pytorch-fid could not load its Inception weights ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}). Without internet, copy "
                        f"pt_inception-2015-12-05-6726825d.pth from pytorch-fid's GitHub releases into {hub}") from None
    return model.eval().to(device)


@torch.no_grad()
def activations(model, batches, device):
    """uint8 (B, 3, H, W) batches -> (N, 2048) float64 pool3 features.

    pytorch-fid's model takes [0, 1] and itself resizes to 299 and rescales to [-1, 1]."""
    out = []
    for images in batches:
        feats = model(images.to(device).float().div_(255))[0]  # (B, 2048, 1, 1)
        out.append(feats.flatten(1).double().cpu())
    return torch.cat(out).numpy()


def to_uint8(images):
    """[-1, 1] floats -> uint8, round((x + 1) / 2 * 255): the inverse of the data's scaling."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def three_channels(images):
    """uint8 (B, C, H, W) -> (B, 3, H, W): Inception and TTUR want RGB, MNIST is gray."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _folder_batches(folder, batch_size):
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserError(f"--fid-ref {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in that folder")
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for name in files[start:start + batch_size]:
            with Image.open(os.path.join(folder, name)) as im:
                a = np.array(im.convert("RGB"))  # a writable copy for torch
            if size is None:
                size = a.shape
            elif a.shape != size:
                raise UserError(f"--fid-ref {folder}: {name} is {a.shape[1]}x{a.shape[0]}, the first image "
                                f"{size[1]}x{size[0]}; FID needs one image size (resize the folder first)")
            batch.append(torch.from_numpy(a).permute(2, 0, 1))
        yield torch.stack(batch)


def reference_batches(ref, data, image_size, batch_size):
    """(uint8 RGB batches, how many images, a description) for --fid-ref.

    REF is a dataset name (its train split with the training preprocessing, at the model's
    image size), or a folder of image files (read as they are)."""
    if ref in DATASETS:
        if ref != "digits" and not (data and os.path.isdir(data)):
            raise DataError(f"--fid-ref {ref} needs --data, the folder that holds the dataset")
        batches = make_batches(ref, data, image_size, batch_size, "cpu", train=True, workers=0, shuffle=False,
                               min_batch=1)
        n = num_images(batches)
        return (three_channels(to_uint8(x)) for x, _ in batches), n, f"{ref} train split ({n} images)"
    if os.path.isdir(ref):
        n = sum(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(ref))
        return _folder_batches(ref, batch_size), n, f"folder {ref} ({n} images)"
    raise DataError(f"--fid-ref {ref} is neither a .npz of statistics, a dataset ({', '.join(DATASETS)}) "
                    f"nor a folder")


def reference_statistics(ref, model, device, data=None, image_size=32, batch_size=100, progress=True):
    """(mu, sigma, description) of --fid-ref: precomputed statistics, a dataset, or an image folder."""
    if ref.endswith(".npz"):
        mu, sigma = load_statistics(ref)
        return mu, sigma, f"statistics {ref}"
    batches, n, what = reference_batches(ref, data, image_size, batch_size)
    batches = progress_bar(batches, desc="FID reference", total=-(-n // batch_size), disable=not progress, leave=False)
    mu, sigma = statistics(activations(model, batches, device))
    return mu, sigma, what
