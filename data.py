"""Datasets: images scaled to [-1, 1], side S, as batches of float tensors.

`digits` (scikit-learn's bundled 8x8 handwritten digits, upscaled) needs no download and
is the default. `mnist` and `cifar10` come through torchvision's files; these three fit
in memory, so they are resized once and kept as one uint8 tensor on the training device
(no per-image decoding every epoch). `folder`, `imagenet` and `lfw` read an image folder
(`DATA/train`, evaluation `DATA/val`) through a DataLoader.
"""
import gzip
import math
import os
import pickle
import struct
import sys
import zlib

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DistributedSampler, default_collate
from torchvision import datasets, transforms

IN_MEMORY = ("digits", "mnist", "cifar10")
FOLDERS = ("folder", "imagenet", "lfw")
DATASETS = IN_MEMORY + FOLDERS


class DataError(Exception):
    """A dataset that is missing or broken; the message says what to do."""


class DataMissing(DataError):
    """No dataset where --data points (as opposed to a damaged one): a bad argument."""


def channels_of(dataset):
    return 1 if dataset in ("digits", "mnist") else 3


def to_unit_range(images_uint8):
    """uint8 in [0, 255] -> float in [-1, 1]: ToTensor then Normalize(0.5, 0.5), per channel."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def _resize(images, size, center_crop=False):
    """(N, C, H, W) uint8 -> (N, C, size, size) uint8, antialiased, in chunks to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = []
    for chunk in images.split(4096):
        chunk = TF.resize(chunk, [size], antialias=True)  # the shorter side becomes `size`
        if center_crop:
            chunk = TF.center_crop(chunk, [size, size])
        out.append(chunk)
    return torch.cat(out)


def _digits(train):
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # A fixed split: the first 1500 digits train, the last 297 test.
    split = slice(0, 1500) if train else slice(1500, None)
    return images[split], labels[split]


def _read_idx(path, ndim):
    """An IDX file of unsigned bytes (MNIST's format), plain or gzipped (a .gz name), as a uint8 tensor,
    checked against its header."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip: BadGzipFile is an OSError; a cut-off one, EOFError
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    header = 4 * (ndim + 1)
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, less than an IDX header")
    magic, *dims = struct.unpack(f">{ndim + 1}I", data[:header])
    if magic != 0x800 + ndim:  # 0x08: unsigned bytes; the low byte: the number of dimensions
        raise DataError(f"{path} is not an uncompressed IDX file of {ndim}-d bytes (magic number {magic:#x}; gzipped?)")
    size = header + math.prod(dims)
    if len(data) != size:
        raise DataError(f"{path} is {'truncated' if len(data) < size else 'too long'}: "
                        f"{len(data)} bytes where its header promises {size}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*dims)


def _mnist(root, train):
    raw = os.path.join(root, "MNIST", "raw")
    prefix = "train" if train else "t10k"
    needed = [os.path.join(raw, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    # MNIST as its site serves it is gzipped: either form will do, the uncompressed one if both are there.
    needed = [p if os.path.exists(p) or not os.path.exists(p + ".gz") else p + ".gz" for p in needed]
    missing = [os.path.basename(p) for p in needed if not os.path.exists(p)]
    if missing:
        try:
            datasets.MNIST(root, train=train, download=True)
        except Exception as e:  # no network, or a mirror that is down
            raise DataMissing(
                f"{raw} lacks {' and '.join(missing)}, and MNIST could not be downloaded ({e.__class__.__name__}). "
                f"Put the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                f"t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (plain or .gz) in {raw}, "
                f"then pass --data {root}.") from None
    images, labels = _read_idx(needed[0], 3), _read_idx(needed[1], 1)
    if len(images) != len(labels) or len(images) == 0:
        raise DataError(f"MNIST files in {raw} disagree: {len(images)} images, {len(labels)} labels")
    return images.unsqueeze(1), labels.long()


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; let them build numpy arrays and nothing else."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _cifar10(root, train):
    folder = os.path.join(root, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
    if missing:
        try:
            datasets.CIFAR10(root, train=train, download=True)
        except Exception as e:
            raise DataMissing(
                f"{folder} lacks {', '.join(missing)}, and CIFAR-10 could not be downloaded ({e.__class__.__name__}). "
                f"Unpack the python version (cifar-10-python.tar.gz) so that {folder} holds "
                f"data_batch_1 .. data_batch_5 and test_batch, then pass --data {root}.") from None
    images, labels = [], []
    for n in names:
        path = os.path.join(folder, n)
        try:
            with open(path, "rb") as f:
                batch = _ArraysOnly(f, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except Exception as e:  # a truncated pickle alone fails in several ways (EOFError, UnpicklingError ...)
            raise DataError(f"cannot read CIFAR-10 batch {path} (truncated or not a CIFAR-10 batch?): "
                            f"{e.__class__.__name__}: {e}") from None
        if len(images[-1]) != len(labels[-1]):
            raise DataError(f"CIFAR-10 batch {path} holds {len(images[-1])} images but {len(labels[-1])} labels")
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_in_memory(dataset, root, image_size, train=True):
    """(uint8 images (N, C, S, S), int64 labels (N,)) for digits, mnist or cifar10."""
    if dataset == "digits":
        images, labels = _digits(train)
    elif dataset == "mnist":
        images, labels = _mnist(root, train)
    elif dataset == "cifar10":
        images, labels = _cifar10(root, train)
    else:
        raise ValueError(f"{dataset} is not an in-memory dataset")
    return _resize(images, image_size), labels


def class_labels(dataset, root):
    """The labels a dataset's images carry, which --classes chooses from: 0 .. 9 for digits, MNIST and
    CIFAR-10; an image folder's class index, its sub-folders of DATA/train in sorted order (ImageFolder's)."""
    if dataset in IN_MEMORY:
        return list(range(10))
    try:
        names, _ = datasets.folder.find_classes(os.path.join(root, "train"))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise DataMissing(f"no class folders in {os.path.join(root, 'train')}: {e}") from None
    return list(range(len(names)))


def of_classes(images, labels, classes):
    """The images (and labels) whose label is one of classes; all of them where classes is None."""
    if classes is None:
        return images, labels
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    return images[keep], labels[keep]


def _shards(n_or_dataset, rank, world_size, shuffle):
    """Process `rank`'s shard of every epoch. DistributedSampler deals out one permutation of all the
    images in turn, so at every step the processes' batches together are the one process's batch;
    it drops the last few images that would leave the shards unequal, so that every process makes
    the same number of steps (else the last steps would wait forever)."""
    dataset = range(n_or_dataset) if isinstance(n_or_dataset, int) else n_or_dataset
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, drop_last=world_size > 1)


# The permutation's seed, away from the training noise's (train.epoch_seed: seed * 1_000_003 + epoch).
# A CPU generator keeps only a seed's low 32 bits, so 2 ** 31 apart is as far apart as two seeds get.
PERMUTATION_OFFSET = 2 ** 31


def _seed_shards(sampler, seed, epoch):
    # DistributedSampler permutes with torch.randperm seeded with sampler.seed + epoch.
    sampler.seed = seed * 1_000_003 + PERMUTATION_OFFSET
    sampler.set_epoch(epoch)


def _keeps_partial(n, batch_size, min_batch):
    """Whether an epoch of n images keeps its last, partial batch: it holds `min_batch` images or more."""
    return n % batch_size >= min_batch


class TensorBatches:
    """Minibatches of a dataset held as one uint8 tensor, shuffled by a seeded generator.

    The order of epoch e depends only on (seed, e), so a resumed run sees the same batches.
    An epoch's last, partial batch is kept, as the original release's DataLoader kept it, if it
    holds `min_batch` images or more (training: BatchNorm on the 1x1 top layer and the minibatch-std
    feature need two). With several processes (world_size), `batch_size` is each process's share of
    the global batch and each takes its shard."""
    skipped = 0  # images that could not be read: none, they were all decoded up front
    may_skip = False  # no image of a batch can be missing

    def __init__(self, images, labels, batch_size, device, shuffle=True, min_batch=2, rank=0, world_size=1):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.shuffle, self.min_batch = batch_size, shuffle, min_batch
        self.sampler = _shards(len(images), rank, world_size, shuffle)
        self.order = None

    def set_epoch(self, seed, epoch):
        if self.shuffle:
            _seed_shards(self.sampler, seed, epoch)
            self.order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.images.device)

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size + _keeps_partial(n, self.batch_size, self.min_batch)

    def __iter__(self):
        order = self.order
        if order is None:  # unshuffled, or shuffled before any set_epoch
            order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.images.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield to_unit_range(self.images[idx]), self.labels[idx]


class _ReadableImages(datasets.ImageFolder):
    """An ImageFolder that reports an unreadable image by path and gives None for it, rather than
    ending the epoch; `_collate_readable` leaves it out of the batch and counts it."""

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            image = self.loader(path)  # decodes the whole file (PIL's convert("RGB"))
        except Exception as e:
            # PIL's decoders fail on a damaged file in many ways: OSError, SyntaxError and ValueError most
            # often, DecompressionBombError, and TypeError from a TIFF tag of the wrong type. Only the
            # decoding is guarded: an error of the transforms below is this code's, and surfaces.
            print(f"\nskipping unreadable image {path}: {e.__class__.__name__}: {e}", file=sys.stderr)
            return None
        return self.transform(image), label


def _collate_readable(items):
    """(images, labels, number of unreadable items); images and labels are None if none was read."""
    good = [item for item in items if item is not None]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, len(items) - len(good)


class FolderBatches:
    """Minibatches of an image folder (resize, center-crop), decoded by DataLoader workers.

    An epoch's last, partial batch is kept if it holds `min_batch` images or more, as in
    TensorBatches. Unreadable images are left out of their batch; `skipped` counts them in the
    current epoch. A batch left with fewer than two images is skipped; with several processes
    (world_size) it is yielded as (None, None) instead, so that every process can skip that step
    together."""

    def __init__(self, root, image_size, batch_size, device, workers=4, shuffle=True, min_batch=2, rank=0,
                 world_size=1, classes=None):
        if not os.path.isdir(root):
            raise DataMissing(f"image folder {root} does not exist (expected one sub-folder per class)")
        tf = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                 transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
        try:
            self.dataset = _ReadableImages(root, tf)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataMissing(f"no images in {root}: {e}") from None
        if classes is not None:  # the images of the classes chosen; their labels stay the folder's class index
            self.dataset.samples = self.dataset.imgs = [s for s in self.dataset.samples if s[1] in classes]
            self.dataset.targets = [label for _, label in self.dataset.samples]
        self.device, self.shuffle = device, shuffle
        self.may_skip = world_size > 1
        self.sampler = _shards(self.dataset, rank, world_size, shuffle)
        drop_last = not _keeps_partial(len(self.sampler), batch_size, min_batch)
        # The sampler orders the images; the generator only seeds the workers, from (seed, epoch)
        # rather than from the global random state, which a resumed run must find untouched.
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
            num_workers=workers, pin_memory=torch.device(device).type == "cuda", collate_fn=_collate_readable,
            generator=self.generator, persistent_workers=workers > 0)
        self.skipped = 0

    def set_epoch(self, seed, epoch):
        self.generator.manual_seed(seed * 1_000_003 + epoch)
        if self.shuffle:
            _seed_shards(self.sampler, seed, epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.skipped = 0
        for x, y, unreadable in self.loader:
            self.skipped += unreadable
            # Training needs two samples in a batch (BatchNorm on the 1x1 top layer, minibatch std).
            if x is None or (unreadable and len(x) < 2):
                if self.may_skip:
                    yield None, None
                continue
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def make_batches(dataset, root, image_size, batch_size, device, train=True, workers=4, shuffle=True,
                 min_batch=2, rank=0, world_size=1, classes=None):
    """Batches of the train (or test) split, of the images whose label is in classes (None: all); a
    DataError says what is missing. An epoch's last batch is kept if it holds min_batch images or more
    (training needs two, evaluation one). With several processes, `batch_size` is this process's share
    and the batches are its shard (rank of world_size)."""
    if dataset in IN_MEMORY:
        images, labels = of_classes(*load_in_memory(dataset, root, image_size, train), classes)
        return TensorBatches(images, labels, batch_size, device, shuffle, min_batch, rank, world_size)
    if dataset in FOLDERS:
        sub = os.path.join(root, "train" if train else "val")
        return FolderBatches(sub, image_size, batch_size, device, workers, shuffle, min_batch, rank, world_size,
                             classes)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def num_images(batches):
    return len(batches.images) if isinstance(batches, TensorBatches) else len(batches.dataset)


def split_images(dataset, root, image_size, train, n, seed, classes=None):
    """Up to n images of a split (of the classes given, None: all) in [-1, 1] on the CPU, drawn by a
    permutation seeded with seed."""
    if dataset in IN_MEMORY:
        return seeded_draw(of_classes(*load_in_memory(dataset, root, image_size, train), classes)[0], n, seed)
    # An image folder lists its images class by class: its first n would be its first classes only.
    folder = make_batches(dataset, root, image_size, 1, "cpu", train=train, workers=0, shuffle=False,
                          classes=classes).dataset
    taken = []
    for i in torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist():
        item = folder[i]  # None for an unreadable image, which the folder has named
        if item is not None:
            taken.append(item[0])
        if len(taken) == n:
            break
    if not taken:
        raise DataError(f"{root}: no readable images in the {'train' if train else 'test'} split")
    return torch.stack(taken)


def seeded_draw(images, n, seed):
    """n of a dataset's uint8 images (all, if fewer), drawn by a permutation seeded with seed, in [-1, 1]."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return to_unit_range(images[order.to(images.device)]).cpu()
