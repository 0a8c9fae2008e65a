"""The evaluation scripts: samples for FID, the Fréchet distance, and the per-layer linear probe."""
import argparse
import json
import os
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import ROOT, make_checkpoint, write_cifar10, write_mnist
from PIL import Image

import fid
import generate_and_save_imgs as gen
import models
import SVM_classify_from_model as svm
import utils


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """(data root, checkpoint) for MNIST; 20 test images per class, enough for 10 folds."""
    base = tmp_path_factory.mktemp("eval_mnist")
    root = write_mnist(base / "data", n_train=32, n_test=200)
    return root, make_checkpoint(base / "run", "mnist", root)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_cifar")
    root = write_cifar10(base / "data", n_per_batch=8, n_test=100)
    return root, make_checkpoint(base / "run", "cifar10", root, "--divisive-normalization", "True")


def run_script(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_pngs(folder):
    names = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    images = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as im:
            assert im.mode == "RGB"
            images.append(np.asarray(im))
    return names, np.stack(images)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- the original release's command lines, as written (tiny architecture values, few images)

def test_release_generate_command(cifar):
    _, ckpt = cifar
    r = run_script("generate_and_save_imgs.py", "--dataset", "cifar10", "--path", ckpt, "--image-size", 32,
                   "--n-filters", 4, "--noise-dim", 8, "--divisive-normalization", "--n-images", 12)
    assert r.returncode == 0, r.stderr
    out = os.path.join(os.path.dirname(ckpt), "samples")
    names, images = read_pngs(out)
    assert names == [f"{i:05d}.png" for i in range(12)]
    assert images.shape == (12, 32, 32, 3) and images.std() > 10
    manifest = read_json(os.path.join(out, gen.MANIFEST))
    assert manifest["checkpoint"] == ckpt and manifest["seed"] == 0 and manifest["n_images"] == 12


def test_release_svm_command(cifar, tmp_path):
    root, ckpt = cifar
    out = tmp_path / "probe.jsonl"
    r = run_script("SVM_classify_from_model.py", "--dataset", "cifar10", "--path", ckpt, "--data", root, "-b", 512,
                   "--image-size", 32, "--n-filters", 4, "--noise-dim", 8, "--divisive-normalization",
                   "--n-folds", 10, "--alpha", 0.0001, "--epochs", 5, "--json", out)
    assert r.returncode == 0, r.stderr
    for name in models.LAYER_NAMES:
        assert f"{name}: " in r.stdout and "+/-" in r.stdout
    (record,) = read_json_lines(out)
    assert record["checkpoint"] == ckpt and record["n_folds"] == 10 and record["n_images"] == 100
    assert list(record["accuracy"]) == list(models.LAYER_NAMES)
    assert all(len(r["folds"]) == 10 for r in record["accuracy"].values())


# --- samples

def test_pngs_are_the_generators_output(mnist, tmp_path):
    _, ckpt = mnist
    n, seed = 23, 3
    args = ["--dataset", "mnist", "--path", os.path.dirname(ckpt), "--n-images", n, "--seed", seed]
    assert gen.main(list(map(str, args + ["-b", 10, "--out", tmp_path / "a", "--npz", tmp_path / "a.npz"]))) == 0
    names, images = read_pngs(tmp_path / "a")
    assert len(names) == n and images.shape == (n, 32, 32, 3)

    # The documented rule: z = the first n draws of randn(n, nz, 1, 1) from a Generator seeded with --seed.
    state = torch.load(ckpt, weights_only=True)
    nets = models.Networks(models.ModelConfig.from_dict(state["model"]))
    nets.load_state_dict(state["networks"])
    nets.generator.eval()
    with torch.no_grad():
        z = torch.randn(n, state["model"]["noise_dim"], 1, 1, generator=torch.Generator().manual_seed(seed))
        x = nets.generator(z)[0].numpy()  # (n, 1, 32, 32)
    expected = (x[:, 0, :, :, None] + 1) / 2  # gray, compared with each of the three channels
    assert np.abs(images / 255.0 - expected).max() <= 1 / 255
    assert expected.std() > 0.1  # the comparison is not between two flat gray images

    with np.load(tmp_path / "a.npz") as f:
        assert f["images"].dtype == np.uint8 and np.array_equal(f["images"], images)

    # Seeded: the same images at another batch size; another seed gives others.
    assert gen.main(list(map(str, args + ["-b", 7, "--out", tmp_path / "b"]))) == 0
    assert np.array_equal(read_pngs(tmp_path / "b")[1], images)
    args[-1] = seed + 1
    assert gen.main(list(map(str, args + ["--out", tmp_path / "c"]))) == 0
    assert not np.array_equal(read_pngs(tmp_path / "c")[1], images)


def test_runs_never_mix_in_one_folder(mnist, tmp_path, capsys):
    _, ckpt = mnist
    out = tmp_path / "s"
    base = ["--path", ckpt, "--out", str(out)]
    assert gen.main(base + ["--n-images", "12"]) == 0
    capsys.readouterr()
    assert gen.main(base + ["--n-images", "5"]) == 1
    assert "--overwrite" in one_error_line(capsys)
    assert len(read_pngs(out)[0]) == 12
    assert gen.main(base + ["--n-images", "5", "--overwrite"]) == 0
    assert read_pngs(out)[0] == [f"{i:05d}.png" for i in range(5)]
    Image.new("RGB", (32, 32)).save(out / "mine.png")
    capsys.readouterr()
    assert gen.main(base + ["--n-images", "5", "--overwrite"]) == 1
    assert "mine.png" in one_error_line(capsys)
    assert (out / "mine.png").exists()


# --- refusals: one line, no traceback

@pytest.mark.parametrize("script", [gen, svm])
def test_architecture_mismatch_names_each_field(script, cifar, capsys):
    root, ckpt = cifar
    base = ["--path", ckpt, "--data", root] if script is svm else ["--path", ckpt]
    assert script.main(base + ["--n-filters", "8", "--noise-dim", "8", "--divisive-normalization", "False"]) == 1
    line = one_error_line(capsys)
    assert "trained with --n-filters 4, --divisive-normalization True" in line and "noise-dim" not in line
    assert script.main(base + ["--dataset", "mnist"]) == 1
    assert "a 3-channel --dataset" in one_error_line(capsys)


# What each kind of bad --path is told; only a pickle that needs other globals hears of arbitrary code.
BAD_CHECKPOINTS = {"missing": "no checkpoint at", "truncated": "is truncated: a zip archive without its end",
                   "empty": "is empty", "other kind": "not an adversarial wake-sleep checkpoint",
                   "not torch": "is not a PyTorch checkpoint (it starts with unknown bytes 89 50 4e 47",
                   "text": "is not a PyTorch checkpoint (it starts with text: 'hello\\n')",
                   "needs globals": "(argparse.Namespace) that only a full unpickling could rebuild"}


@pytest.mark.parametrize("script", [gen, svm])
@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line(script, kind, mnist, tmp_path, capsys):
    path = tmp_path / "checkpoint.pth.tar"
    if kind == "truncated":
        path.write_bytes(Path(mnist[1]).read_bytes()[:5000])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "other kind":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "not torch":
        path.write_bytes(b"\x89PNG not a checkpoint" * 100)
    elif kind == "text":
        path.write_text("hello\n")  # echo hello > checkpoint.pth.tar
    elif kind == "needs globals":
        torch.save({"args": argparse.Namespace(lr=1e-4)}, path)  # as the original release's checkpoints
    assert script.main(["--path", str(path), "--out" if script is gen else "--data", str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert BAD_CHECKPOINTS[kind] in line, line
    assert ("arbitrary code" in line) == (kind == "needs globals"), line
    assert not any(f.endswith(".png") for f in os.listdir(tmp_path))


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_alpha_is_refused_by_name(value, mnist, capsys):
    with pytest.raises(SystemExit) as exit_:
        svm.main(["--path", mnist[1], "--alpha", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"error: --alpha must be a finite number, got {value}")


def test_a_full_disk_or_a_missing_folder_is_one_line(mnist, tmp_path, capsys, monkeypatch):
    import errno
    root, ckpt = mnist
    written = []

    def full_after_two(image, path, *args, **kwargs):
        if len(written) == 2:
            with open(path, "wb") as f:  # PIL has begun the file when the disk fills
                f.write(b"\x89PNG")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(path)
        real(image, path, *args, **kwargs)

    real = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", full_after_two)
    assert gen.main(["--path", ckpt, "--n-images", "5", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err  # the progress bar, then the error
    assert "Traceback" not in err and [line for line in err.splitlines() if "error: " in line] == [
        f"error: cannot write {tmp_path}/s/00002.png: no space left on device; nothing was left half-written"]
    assert sorted(os.listdir(tmp_path / "s")) == ["00000.png", "00001.png"]  # no half PNG
    monkeypatch.undo()

    # --json's folder is checked before any work; a write that fails later is one line too.
    with pytest.raises(SystemExit):
        svm.main(["--path", ckpt, "--data", root, "--json", str(tmp_path / "no" / "such" / "folder.jsonl")])
    assert "--json" in capsys.readouterr().err
    with pytest.raises(utils.WriteError, match="x.jsonl: read-only file system"):
        monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "")))
        utils.append_jsonl(str(tmp_path / "x.jsonl"), {"a": 1})


def test_missing_dataset_is_one_line(cifar, tmp_path, capsys, monkeypatch):
    _, ckpt = cifar
    assert svm.main(["--path", ckpt, "--dataset", "folder", "--data", str(tmp_path)]) == 1
    assert "val" in one_error_line(capsys)
    assert svm.main(["--path", ckpt, "--dataset", "cifar10", "--data", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in one_error_line(capsys)
    monkeypatch.setattr(fid, "inception", lambda device: FakeInception())
    assert gen.main(["--path", ckpt, "--out", str(tmp_path / "s"), "--fid-ref", "cifar10",
                     "--data", str(tmp_path / "nowhere")]) == 1
    assert "--data" in one_error_line(capsys)
    assert not os.path.exists(tmp_path / "s")  # refused before writing any sample


# --- the linear probe

def images_through_inference(monkeypatch):
    """A list that gets the batch size of every pass of the inference network from now on."""
    seen = []
    forward = models.Inference.forward
    monkeypatch.setattr(models.Inference, "forward", lambda self, x, *a, **k: seen.append(len(x)) or forward(
        self, x, *a, **k))
    return seen


def test_probe_separable_classes_and_shuffled_labels(mnist, tmp_path, monkeypatch):
    root, ckpt = mnist
    seen = images_through_inference(monkeypatch)
    out = tmp_path / "probe.jsonl"
    flags = ["--path", ckpt, "--epochs", "5", "--n-folds", "10", "--json", str(out)]
    assert svm.main(flags + ["--data", root]) == 0
    assert sum(seen) == 200  # features once per image, not once per fold or pass

    # The same images with shuffled labels: nothing to decode.
    shuffled = tmp_path / "shuffled"
    raw = os.path.join(write_mnist(shuffled, n_train=32, n_test=200), "MNIST", "raw", "t10k-labels-idx1-ubyte")
    labels = np.fromfile(raw, np.uint8, offset=8)
    with open(raw, "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + np.random.default_rng(1).permutation(labels).tobytes())
    assert svm.main(flags + ["--data", str(shuffled)]) == 0

    real, shuffle = [r["accuracy"]["Input"]["mean"] for r in read_json_lines(out)]
    assert real >= 0.97  # the classes are bands at different heights: linearly separable by construction
    assert shuffle < 0.25  # chance is 0.1


def test_probe_with_features_resampled_every_pass(mnist, tmp_path, monkeypatch):
    root, ckpt = mnist
    seen = images_through_inference(monkeypatch)
    out = tmp_path / "probe.jsonl"
    assert svm.main(["--path", ckpt, "--data", root, "--epochs", "2", "--n-folds", "4", "-b", "64",
                     "--resample-features", "--json", str(out)]) == 0
    # Each fold: 2 passes over its 150 training images, sampled anew each time, and its 50 held out once.
    assert sum(seen) == 4 * (2 * 150 + 50)
    (row,) = read_json_lines(out)
    assert row["resample_features"] is True and row["n_folds"] == 4
    assert row["accuracy"]["Input"]["mean"] >= 0.97  # bands at different heights, as above


# --- FID

def test_frechet_distance_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
    assert fid.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0)
    rng = np.random.default_rng(0)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2.
    mu1, mu2, a, b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)
    # Full, non-commuting covariances: against scipy's matrix square root.
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T, m2 @ m2.T + 0.1 * np.eye(5)
    expected = np.sum((mu1[:5] - mu2[:5]) ** 2) + np.trace(s1) + np.trace(s2) \
        - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert fid.frechet_distance(mu1[:5], s1, mu2[:5], s2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2[:5], s2, mu1[:5], s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_sampled_features():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    l1, l2 = np.array([[1, 0, 0], [0.5, 1, 0], [0, 0.3, 0.5]]), np.array([[2, 0, 0], [0, 1, 0], [0.2, 0, 1]])
    x1 = rng.normal(size=(200_000, 3)) @ l1.T + mu1  # features with mean mu1, covariance l1 l1^T
    x2 = rng.normal(size=(200_000, 3)) @ l2.T + mu2
    m1, s1 = fid.statistics(x1)
    np.testing.assert_allclose(s1, l1 @ l1.T, atol=0.02)
    expected = fid.frechet_distance(mu1, l1 @ l1.T, mu2, l2 @ l2.T)
    assert fid.frechet_distance(m1, s1, *fid.statistics(x2)) == pytest.approx(expected, rel=0.02)
    # Fewer samples than dimensions: a singular covariance, still finite and zero against itself.
    m, s = fid.statistics(rng.normal(size=(10, 50)))
    assert abs(fid.frechet_distance(m, s, m, s)) < 1e-6 * np.trace(s)


def test_statistics_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "DIMS", 4)
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    fid.save_statistics(str(tmp_path / "s.npz"), mu, sigma)
    got = fid.load_statistics(str(tmp_path / "s.npz"))
    assert np.array_equal(got[0], mu) and np.array_equal(got[1], sigma)
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 4)))
    np.savez(tmp_path / "small.npz", mu=np.zeros(3), sigma=np.eye(3))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really")
    for name, words in (("other", "'mu'"), ("small", "shape"), ("broken", "cannot read"), ("none", "no stat")):
        with pytest.raises(fid.UserError, match=words):
            fid.load_statistics(str(tmp_path / f"{name}.npz"))
    with pytest.raises(fid.UserError, match=".npz"):
        fid.save_statistics(str(tmp_path / "s.txt"), mu, sigma)


class FakeInception(torch.nn.Module):
    """Stands in for pytorch-fid's network: [0, 1] images -> (B, 48, 1, 1), a 4x4 average pooling."""

    def forward(self, x):
        assert x.shape[1] == 3 and 0 <= x.min() and x.max() <= 1
        return [torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(len(x), 48, 1, 1)]


def test_fid_against_a_dataset_a_folder_and_saved_statistics(mnist, tmp_path, monkeypatch, capsys):
    root, ckpt = mnist
    monkeypatch.setattr(fid, "DIMS", 48)
    monkeypatch.setattr(fid, "inception", lambda device: FakeInception())
    base = ["--path", ckpt, "--n-images", "60"]
    assert gen.main(base + ["--out", str(tmp_path / "a"), "--fid-ref", "mnist", "--data", root,
                            "--save-ref-stats", str(tmp_path / "ref.npz")]) == 0
    first = read_json(tmp_path / "a" / gen.MANIFEST)["fid"]["value"]
    assert first > 1e-3 and "FID" in capsys.readouterr().out
    assert gen.main(base + ["--out", str(tmp_path / "b"), "--fid-ref", str(tmp_path / "ref.npz")]) == 0
    assert read_json(tmp_path / "b" / gen.MANIFEST)["fid"]["value"] == pytest.approx(first, rel=1e-9)
    # Against the PNGs of the same seed: the same features, so a distance of zero.
    assert gen.main(base + ["--out", str(tmp_path / "c"), "--fid-ref", str(tmp_path / "a")]) == 0
    assert abs(read_json(tmp_path / "c" / gen.MANIFEST)["fid"]["value"]) < 1e-6


def test_fid_without_pytorch_fid_or_its_weights(mnist, tmp_path, monkeypatch, capsys):
    _, ckpt = mnist
    argv = ["--path", ckpt, "--out", str(tmp_path / "s"), "--fid-ref", "mnist"]
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)
    assert gen.main(argv) == 1
    assert "pip install pytorch-fid" in one_error_line(capsys)

    class NoWeights:
        BLOCK_INDEX_BY_DIM = {2048: 3}  # noqa: RUF012 (mimics pytorch-fid's class)

        def __init__(self, blocks):
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    package = types.ModuleType("pytorch_fid")
    package.inception = types.ModuleType("pytorch_fid.inception")
    package.inception.InceptionV3 = NoWeights
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", package.inception)
    assert gen.main(argv) == 1
    assert "Inception weights" in one_error_line(capsys)
    assert not os.path.exists(tmp_path / "s")
