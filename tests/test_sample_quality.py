"""The offline sample-quality measure (sample_quality.py) on tiny data: scikit-learn's bundled digits."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import generate_and_save_imgs as gen
import sample_quality as q
from conftest import copy_quality_cache, make_checkpoint
from data import load_in_memory, to_unit_range


@pytest.fixture
def measure(digits_quality):
    """The session's measure (conftest: its classifier is trained once for every test that needs one)."""
    return digits_quality


@pytest.fixture(scope="module")
def real():
    images, _ = load_in_memory("digits", None, 32, train=True)  # training digits, scored against the test split
    return to_unit_range(images[-300:])


def test_real_digits_score_better_than_their_pixels_shuffled(measure, real):
    g = torch.Generator().manual_seed(0)
    shuffled = real.flatten(1)[:, torch.randperm(32 * 32, generator=g)].view_as(real)
    good, bad = measure.score(real), measure.score(shuffled)
    assert good["fd"] < 0.2 * bad["fd"], (good, bad)
    assert good["confidence"] > 0.95 and good["confidence"] > bad["confidence"], (good, bad)
    assert good["class_entropy"] > 0.95 * np.log(10) > bad["class_entropy"], (good, bad)  # every class is there


def test_one_class_only_lowers_the_class_entropy(measure, real):
    _, labels = load_in_memory("digits", None, 32, train=True)
    ones = real[labels[-300:] == 1]
    assert measure.score(ones)["class_entropy"] < 0.3


def test_seeded_cached_and_repeatable(measure, real, tmp_path):
    assert measure.cache is not None and os.path.isfile(measure.cache)
    again = q.QualityMeasure("digits", None, 32, cache_dirs=[os.path.dirname(measure.cache)])  # from the cache
    assert again.cache == measure.cache
    scores = [m.score(real[:200]) for m in (measure, again)]
    assert scores[0] == scores[1]
    other = q.QualityMeasure("digits", None, 32, cache_dirs=[str(tmp_path / "other")], seed=1)  # no cache: trained
    assert os.path.dirname(other.cache) == str(tmp_path / "other")  # written where it was looked for
    assert other.score(real[:200])["fd"] != pytest.approx(scores[0]["fd"], rel=1e-3)
    # A cache that describes other data (here: another seed's key) is not used: trained anew, and rewritten.
    # Trained anew with seed 0, the classifier is the session's again: training is seeded.
    name = os.path.basename(measure.cache)
    shutil.copy(other.cache, tmp_path / name)
    rebuilt = q.QualityMeasure("digits", None, 32, cache_dirs=[str(tmp_path)])
    assert rebuilt.score(real[:200])["fd"] == pytest.approx(scores[0]["fd"], rel=1e-6)
    assert torch.load(tmp_path / name, weights_only=True)["key"]["seed"] == 0


def test_natural_images_are_refused(tmp_path):
    with pytest.raises(q.UserError, match="--fid-ref"):
        q.QualityMeasure("cifar10", str(tmp_path), 32)


def test_cli_reads_arrays_and_folders(measure, real, tmp_path, capsys):
    uint8 = real.add(1).mul(127.5).round().to(torch.uint8)
    np.save(tmp_path / "float.npy", real.numpy())  # (N, 1, S, S) floats in [-1, 1], as the release's samples
    np.savez(tmp_path / "rgb.npz", images=uint8.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())  # --npz's
    cache = copy_quality_cache(measure, tmp_path)  # the CLI caches beside the samples
    written = os.stat(cache).st_mtime_ns
    lines = []
    for name in ("float.npy", "rgb.npz"):
        assert q.main([str(tmp_path / name), "--dataset", "digits"]) == 0
        lines.append(capsys.readouterr().out.strip())
    scores = [dict(kv.split("=") for kv in line.split()) for line in lines]
    assert scores[0].keys() == {"fd", "confidence", "class_entropy"}
    for k in scores[0]:
        assert float(scores[0][k]) == pytest.approx(float(scores[1][k]), rel=1e-3)
    assert float(scores[0]["fd"]) == pytest.approx(measure.score(real)["fd"], rel=1e-3)
    assert os.stat(cache).st_mtime_ns == written  # read from beside the samples, not trained and rewritten


def test_generate_reports_the_measure(measure, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run", "digits", "unused")
    cache = copy_quality_cache(measure, tmp_path / "run")  # generate looks beside the run
    written = os.stat(cache).st_mtime_ns
    assert gen.main(["--path", ckpt, "--n-images", "50", "--classifier-fd"]) == 0
    manifest = json.load(open(tmp_path / "run" / "samples" / gen.MANIFEST))
    assert set(manifest["classifier_fd"]) == {"fd", "confidence", "class_entropy", "classifier"}
    assert manifest["classifier_fd"]["classifier"] == cache  # beside the run
    assert os.stat(cache).st_mtime_ns == written  # read there, not trained anew
    assert "classifier measure: fd=" in capsys.readouterr().out
