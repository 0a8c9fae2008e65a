"""Sample quality for digits, offline: Fréchet distance, KID, precision and recall of a digit classifier's features.

    python sample_quality.py SAMPLES --dataset mnist --data DIR     # SAMPLES: .npz, .npy or a PNG folder
    python generate_and_save_imgs.py --path RUN --n-images 2000 --classifier-fd --data DIR

Inception features (fid.py) mean little for 32x32 gray digits, and need weights from the internet.
Here a small convolutional classifier is trained on the dataset's training split (seeded; cached
in a file beside the data, or beside the run where the data folder is read-only, and retrained
when that file is absent or describes other data). Six numbers describe a set of samples:

- fd: the Fréchet distance between Gaussians fitted to the classifier's penultimate features
  (128) of the samples and of the test split (lower is better; the FID formula of fid.py);
- kid: the kernel inception distance of the same features (Bińkowski et al. 2018), an unbiased
  MMD^2 with a cubic polynomial kernel, averaged over random subsets (lower is better; near 0, and
  possibly slightly below, for samples as good as real digits);
- precision and recall (Kynkäänniemi et al. 2019, k = 3): the fraction of samples that lie on the
  test digits' manifold (do they look real?) and of test digits that lie on the samples' manifold
  (is every kind of digit drawn?); higher is better, 1 at most;
- confidence: the classifier's mean top-class probability on the samples (do they look like
  some digit?);
- class_entropy: the entropy, in nats, of the histogram of predicted classes (log 10 = 2.30 when
  every class is equally frequent; lower means missing classes).

These are comparable only at the same dataset, image size, classifier seed and sample count: not
with Inception FID or the paper's numbers. Samples are scored as the PNGs hold them, quantized to
8 bits. For calibration, score real training images: that is the floor of the measure.
"""
import argparse
import hashlib
import os
import pickle
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import fid
from data import DATASETS, DataError, channels_of, load_in_memory, to_unit_range
from utils import UserError, WriteError, isolated_rng, serialized, write_atomically

# Of the classifier, its training and what its cache holds; a cache of another version is retrained. 2: the
# cache holds the test split's features (precision, recall and kid need them), not only their mean and covariance.
VERSION = 2
DATASETS_MEASURED = ("digits", "mnist")  # the datasets a digit classifier can describe
LOWER_IS_BETTER = ("fd", "kid")  # score()'s other numbers are better higher
NEIGHBOURS = 3  # the k of precision and recall, as in Kynkäänniemi et al. 2019
MIN_SAMPLES = NEIGHBOURS + 1  # a sample's k-th nearest neighbour among the samples


class DigitClassifier(nn.Module):
    """Two conv-pool blocks, a 128-unit feature layer, 10 classes."""

    def __init__(self, channels=1, image_size=32, width=32, features=128, classes=10):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, S/2, S/2)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))  # (B, 2w, S/4, S/4)
        self.hidden = nn.Linear(2 * width * (image_size // 4) ** 2, features)
        self.logits = nn.Linear(features, classes)

    def features(self, x):
        return F.relu(self.hidden(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.logits(self.features(x))


def fit(images, labels, seed=0, epochs=4, batch_size=128, lr=1e-3):
    """A DigitClassifier trained on uint8 images (N, C, S, S) with int labels, on the CPU, seeded."""
    g = torch.Generator().manual_seed(seed)
    with isolated_rng(seed):
        net = DigitClassifier(images.shape[1], images.shape[-1], classes=int(labels.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x = to_unit_range(images)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(net(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def features_and_probabilities(net, x, batch_size=500):
    """Penultimate features (N, 128) and class probabilities (N, classes) of float images in [-1, 1]."""
    feats, probs = [], []
    for chunk in x.split(batch_size):
        h = net.features(chunk.float())
        feats.append(h)
        probs.append(F.softmax(net.logits(h), dim=1))
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


def manifold_coverage(points, manifold, k=3, chunk=1000):
    """The fraction of points (N, D) inside the k-nearest-neighbour manifold of manifold (M, D)
    (Kynkäänniemi et al. 2019, arXiv:1904.06991): the union of balls, one around each manifold point,
    whose radius is that point's distance to its k-th nearest neighbour in the manifold. A point on a
    ball's surface is inside. Distances come `chunk` rows at a time: memory chunk x M, whatever N."""
    if not 0 < k < len(manifold):
        raise ValueError(f"k = {k} needs more than k points in the manifold, got {len(manifold)}")
    # kthvalue(k + 1): a manifold point's nearest neighbour in its own set is itself, at distance 0.
    radii = torch.cat([torch.cdist(part, manifold).kthvalue(k + 1, dim=1).values for part in manifold.split(chunk)])
    inside = torch.cat([(torch.cdist(part, manifold) <= radii).any(dim=1) for part in points.split(chunk)])
    return inside.double().mean().item()


def precision_recall(real_feats, fake_feats, k=3):
    """(precision, recall) of fake features (N, D) against real ones (M, D) (Kynkäänniemi et al. 2019, whose
    k is 3): precision is the fraction of fakes on the real manifold, recall the fraction of reals on the
    fake one. Compare sets of equal size, as the paper does: the balls of a larger set are smaller."""
    real, fake = torch.as_tensor(real_feats, dtype=torch.float64), torch.as_tensor(fake_feats, dtype=torch.float64)
    return manifold_coverage(fake, real, k), manifold_coverage(real, fake, k)


def kernel_inception_distance(real_feats, fake_feats, subsets=100, subset_size=1000, seed=0):
    """The kernel inception distance of Bińkowski et al. 2018 (arXiv:1801.01401) between real and fake
    features (N, d): (mean, standard deviation) over `subsets` random subsets of the unbiased estimate

        MMD^2 = sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

    with the kernel k(x, y) = (x.y / d + 1)^3. Each subset draws m = min(subset_size, len(real), len(fake))
    points x of the real and y of the fake set, without replacement, from a generator seeded with seed,
    so a seed gives the same value. Unbiased: sets of one distribution give values around 0, some below."""
    real, fake = torch.as_tensor(real_feats, dtype=torch.float64), torch.as_tensor(fake_feats, dtype=torch.float64)
    m, d = min(subset_size, len(real), len(fake)), real.shape[1]
    if m < 2:
        raise ValueError(f"KID needs at least two feature vectors in each set, got {len(real)} and {len(fake)}")
    g = torch.Generator().manual_seed(seed)
    real_rows = torch.stack([torch.randperm(len(real), generator=g)[:m] for _ in range(subsets)])  # (subsets, m)
    fake_rows = torch.stack([torch.randperm(len(fake), generator=g)[:m] for _ in range(subsets)])
    # Several subsets per batched matmul (kernel matrices of about 4M entries, 32 MB): one subset at a time,
    # the many small operations cost far more than the arithmetic on a busy CPU.
    at_once = max(1, 4_000_000 // m ** 2)
    values = []
    for i, j in zip(real_rows.split(at_once), fake_rows.split(at_once)):
        x, y = real[i], fake[j]  # (B, m, d)
        k_xx, k_yy, k_xy = ((a @ b.transpose(1, 2) / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))  # (B, m, m)
        within = (_off_diagonal_sum(k_xx) + _off_diagonal_sum(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean((1, 2)))
    values = torch.cat(values)
    return values.mean().item(), values.std(correction=0).item()


def _off_diagonal_sum(k):
    """Sums of the matrices k (B, m, m) without their diagonals: the unbiased MMD leaves out k(x_i, x_i)."""
    return k.sum((1, 2)) - k.diagonal(dim1=1, dim2=2).sum(1)


def summary(scores):
    """score()'s numbers as one line, grouped by which way is better."""
    def line(keys):
        return " ".join(f"{k}={scores[k]:.4g}" for k in keys)
    lower = [k for k in scores if k in LOWER_IS_BETTER]
    higher = [k for k in scores if k not in LOWER_IS_BETTER]
    return (f"{line(lower)} (lower is better); {line(higher)} "
            f"(higher is better; class_entropy is at most 2.303, all ten digits equally often)")


def _fingerprint(images, labels):
    return hashlib.sha1(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]


class QualityMeasure:
    """The classifier of one dataset, image size and seed, with the test split's features and their statistics."""

    def __init__(self, dataset, root, image_size, cache_dirs=(), seed=0):
        if dataset not in DATASETS_MEASURED:
            raise UserError(f"the classifier measure is for digits (mnist, digits), not {dataset}; "
                            f"use --fid-ref (Inception FID) for natural images")
        train_x, train_y = load_in_memory(dataset, root, image_size, train=True)
        key = {"version": VERSION, "dataset": dataset, "image_size": image_size, "seed": seed,
               "train": _fingerprint(train_x, train_y)}
        name = f"quality_classifier_{dataset}{image_size}_seed{seed}.pt"
        dirs = [d for d in ([root] if dataset != "digits" else []) + list(cache_dirs) if d]
        self.cache = None
        for d in dirs:  # a cache whose key matches, else retrain
            path = os.path.join(d, name)
            try:
                saved = torch.load(path, weights_only=True)
            except (OSError, RuntimeError, pickle.UnpicklingError):
                continue  # absent, or not a cache this code wrote: retrain
            if saved.get("key") == key:
                self.net = DigitClassifier(channels_of(dataset), image_size, classes=saved["classes"])
                self.net.load_state_dict(saved["state"])
                self.net.eval()
                self._reference(saved["features"].double().numpy())
                self.cache = path
                return
        self.net = fit(train_x, train_y, seed=seed)
        test_x, _ = load_in_memory(dataset, root, image_size, train=False)
        self._reference(features_and_probabilities(self.net, to_unit_range(test_x))[0])
        # float32 loses nothing: the features are the network's float32 outputs, widened to float64.
        state = {"key": key, "classes": self.net.logits.out_features, "state": self.net.state_dict(),
                 "features": torch.from_numpy(self.ref_feats).float()}
        for d in dirs:  # the first writable folder keeps it; none writable: retrain next time
            try:
                os.makedirs(d, exist_ok=True)
                write_atomically(os.path.join(d, name), lambda f: f.write(serialized(state)))
                self.cache = os.path.join(d, name)
                break
            except (OSError, WriteError):
                continue

    def _reference(self, feats):
        """The test split's features (N, 128), float64, and their mean and covariance for fd."""
        self.ref_feats = feats
        self.ref = fid.statistics(feats)
        # Precision and recall take the first N of this fixed order: the same test digits at every score of N samples.
        self.ref_order = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0)).numpy()

    def score(self, samples):
        """{fd, kid, precision, recall, confidence, class_entropy} of float samples (N, C, S, S) in [-1, 1],
        quantized to 8 bits first. precision and recall compare the N samples with N test digits (a fixed
        draw; all of them where the test split is smaller); kid averages 100 subsets of
        min(1000, N, test digits) each."""
        if len(samples) < MIN_SAMPLES:
            raise UserError(f"the classifier measure needs at least {MIN_SAMPLES} samples, got {len(samples)}")
        x = to_unit_range(fid.to_uint8(samples.detach().cpu().float()))
        feats, probs = features_and_probabilities(self.net, x)
        mu, sigma = fid.statistics(feats)
        precision, recall = precision_recall(self.ref_feats[self.ref_order[:len(feats)]], feats, k=NEIGHBOURS)
        freq = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
        nz = freq[freq > 0]
        return {"fd": fid.frechet_distance(mu, sigma, *self.ref),
                "kid": kernel_inception_distance(self.ref_feats, feats, subsets=100, subset_size=1000, seed=0)[0],
                "precision": precision, "recall": recall, "confidence": float(probs.max(1).mean()),
                "class_entropy": float(abs((nz * np.log(nz)).sum()))}  # abs: one class gives -0.0


def load_samples(path, channels):
    """Float samples (N, C, S, S) in [-1, 1] from an .npy/.npz array (uint8 in [0, 255] or float in
    [-1, 1], channels first or last) or a folder of PNG files."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(fid.IMAGE_EXTENSIONS))
        if not files:
            raise UserError(f"{path} holds no image files")
        a = np.stack([np.asarray(Image.open(os.path.join(path, f)).convert("RGB" if channels == 3 else "L"))
                      for f in files])
    else:
        try:
            a = np.load(path)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} cannot be read as a numpy array ({e})") from None
        if isinstance(a, np.lib.npyio.NpzFile):
            a = a["images"] if "images" in a.files else a[a.files[0]]
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)  # channels last -> first
    t = t[:, :channels]  # gray samples saved as RGB
    return to_unit_range(t) if t.dtype == torch.uint8 else t.float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", help=".npz (generate_and_save_imgs.py --npz), .npy, or a folder of PNG files")
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument("--data", default="../data", help="dataset root (its train split trains the classifier)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier")
    args = p.parse_args(argv)
    try:
        measure = QualityMeasure(args.dataset, args.data, args.image_size, seed=args.seed,
                                 cache_dirs=[os.path.dirname(os.path.abspath(args.samples))])
        scores = measure.score(load_samples(args.samples, channels_of(args.dataset)))
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
