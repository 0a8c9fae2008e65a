"""Sample quality for digits, offline: the Fréchet distance of a digit classifier's features.

    python sample_quality.py SAMPLES --dataset mnist --data DIR     # SAMPLES: .npz, .npy or a PNG folder
    python generate_and_save_imgs.py --path RUN --n-images 2000 --classifier-fd --data DIR

Inception features (fid.py) mean little for 32x32 gray digits, and need weights from the internet.
Here a small convolutional classifier is trained on the dataset's training split (seeded; cached
in a file beside the data, or beside the run where the data folder is read-only, and retrained
when that file is absent or describes other data). Three numbers describe a set of samples:

- fd: the Fréchet distance between Gaussians fitted to the classifier's penultimate features
  (128) of the samples and of the test split (lower is better; the FID formula of fid.py);
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
from utils import UserError, WriteError, serialized, write_atomically

VERSION = 1  # of the classifier and its training; a cache of another version is retrained
DATASETS_MEASURED = ("digits", "mnist")  # the datasets a digit classifier can describe


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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


def _fingerprint(images, labels):
    return hashlib.sha1(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]


class QualityMeasure:
    """The classifier of one dataset, image size and seed, with the test split's feature statistics."""

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
                self.ref = (saved["mu"].numpy(), saved["sigma"].numpy())
                self.cache = path
                return
        self.net = fit(train_x, train_y, seed=seed)
        test_x, _ = load_in_memory(dataset, root, image_size, train=False)
        self.ref = fid.statistics(features_and_probabilities(self.net, to_unit_range(test_x))[0])
        state = {"key": key, "classes": self.net.logits.out_features, "state": self.net.state_dict(),
                 "mu": torch.from_numpy(self.ref[0]), "sigma": torch.from_numpy(self.ref[1])}
        for d in dirs:  # the first writable folder keeps it; none writable: retrain next time
            try:
                os.makedirs(d, exist_ok=True)
                write_atomically(os.path.join(d, name), lambda f: f.write(serialized(state)))
                self.cache = os.path.join(d, name)
                break
            except (OSError, WriteError):
                continue

    def score(self, samples):
        """{fd, confidence, class_entropy} of float samples (N, C, S, S) in [-1, 1], quantized to 8 bits first."""
        x = to_unit_range(fid.to_uint8(samples.detach().cpu().float()))
        feats, probs = features_and_probabilities(self.net, x)
        mu, sigma = fid.statistics(feats)
        freq = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)
        nz = freq[freq > 0]
        return {"fd": fid.frechet_distance(mu, sigma, *self.ref), "confidence": float(probs.max(1).mean()),
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
    print(" ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
