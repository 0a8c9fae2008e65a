"""Small datasets, checkpoints and a digit classifier the tests make themselves (no network, no files from
outside the repository)."""
import os
import pickle
import shutil
import struct
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tests that mean something on a GPU run on every device this machine has; CUDA shows as skipped elsewhere.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]

# A network small enough that a step takes milliseconds on a CPU.
TINY = ["--n-filters", "4", "--noise-dim", "8", "--image-size", "32"]


def class_images(labels, side, channels, seed):
    """uint8 images whose class k is a bright horizontal band at a k-dependent height, plus noise."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(0, 60, size=(n, channels, side, side)).astype(np.uint8)
    band = max(1, side // 10)
    for i, k in enumerate(labels):
        top = int(k) * (side - band) // 9
        images[i, :, top:top + band, :] = 230
    return images


def write_mnist(root, n_train=64, n_test=40, seed=0):
    """A torchvision-style MNIST folder (root/MNIST/raw, four uncompressed IDX files)."""
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = class_images(labels, 28, 1, seed + n)[:, 0]
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return str(root)


def write_cifar10(root, n_per_batch=16, n_test=40, seed=0):
    """A CIFAR-10 python folder (root/cifar-10-batches-py) with tiny batches."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for j, (name, n) in enumerate(names):
        labels = rng.permutation(np.arange(n) % 10)
        images = class_images(labels, 32, 3, seed + j)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": images.reshape(n, -1), "labels": labels.tolist()}, f)
    return str(root)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def make_checkpoint(folder, dataset, data, *flags):
    """A checkpoint as train.py writes it, of a tiny untrained model (no training steps: fast)."""
    import models
    import train
    from checkpoint import CHECKPOINT_NAME, checkpoint_state, save_checkpoint
    from step import make_optimizers
    args = train.get_parser().parse_args(TINY + ["--dataset", dataset, "--data", data, "--out", str(folder),
                                                 "--seed", "0", *flags])
    torch.manual_seed(0)
    nets = models.Networks(train.model_config(args))
    with torch.no_grad():  # untrained, G's output is ~1e-5 around gray; this spreads it over [-1, 1]
        for conv in nets.generator.convs:
            conv.weight.mul_(12)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CHECKPOINT_NAME)
    save_checkpoint(path, checkpoint_state(args, nets, make_optimizers(nets, args), 0, 1, 0, []))
    return path


@pytest.fixture(scope="session")
def digits_quality(tmp_path_factory):
    """sample_quality's measure of the bundled digits at 32x32, seed 0: its classifier trained once a
    session. Its cache (digits_quality.cache) is shared: tests copy it (copy_quality_cache), never move it."""
    import sample_quality
    return sample_quality.QualityMeasure("digits", None, 32, cache_dirs=[str(tmp_path_factory.mktemp("quality"))])


def copy_quality_cache(measure, folder):
    """The measure's cache copied into folder, where a QualityMeasure looking there reads it instead of
    training; its path."""
    os.makedirs(folder, exist_ok=True)
    return shutil.copy(measure.cache, folder)
