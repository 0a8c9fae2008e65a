"""Small datasets the tests make themselves (no network, no files from outside the repository)."""
import os
import pickle
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
