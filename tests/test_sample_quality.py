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
    assert good["kid"] < 0.2 * bad["kid"], (good, bad)
    assert good["precision"] > 0.7 and bad["precision"] < 0.1, (good, bad)  # shuffled pixels look like no digit
    assert good["recall"] > 0.5 and bad["recall"] < 0.1, (good, bad)
    assert good["confidence"] > 0.95 and good["confidence"] > bad["confidence"], (good, bad)
    assert good["class_entropy"] > 0.95 * np.log(10) > bad["class_entropy"], (good, bad)  # every class is there


def test_one_class_only_lowers_the_class_entropy(measure, real):
    _, labels = load_in_memory("digits", None, 32, train=True)
    ones = real[labels[-300:] == 1]
    scores = measure.score(ones)
    assert scores["class_entropy"] < 0.3
    assert scores["precision"] > 0.8 and scores["recall"] < 0.3, scores  # real-looking, but one kind of digit


def test_too_few_samples_are_refused(measure, real, capsys):
    with pytest.raises(q.UserError, match="at least 4 samples"):
        measure.score(real[:3])  # precision and recall need a sample's third nearest neighbour among the others
    with pytest.raises(SystemExit):
        gen.main(["--path", "unused", "--n-images", "3", "--classifier-fd"])
    assert "--classifier-fd needs --n-images of at least 4" in capsys.readouterr().err


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


def test_a_cache_of_the_old_format_is_rebuilt(measure, real, tmp_path, monkeypatch):
    """Version 1 kept only the mean and covariance of the test split's features: such a file is retrained
    and rewritten, not read for features it lacks."""
    saved = torch.load(measure.cache, weights_only=True)
    old = {"key": {**saved["key"], "version": 1}, "classes": saved["classes"], "state": saved["state"],
           "mu": torch.from_numpy(measure.ref[0]), "sigma": torch.from_numpy(measure.ref[1])}
    path = tmp_path / os.path.basename(measure.cache)
    torch.save(old, path)
    trained = []
    # The session's classifier stands in for the retrained one (seeded: the same), so the test takes no training.
    monkeypatch.setattr(q, "fit", lambda *args, **kwargs: trained.append(True) or measure.net)
    rebuilt = q.QualityMeasure("digits", None, 32, cache_dirs=[str(tmp_path)])
    assert trained == [True]
    rewritten = torch.load(path, weights_only=True)
    assert rewritten["key"]["version"] == q.VERSION and rewritten["features"].shape == (297, 128)
    assert rebuilt.score(real[:200]) == measure.score(real[:200])


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
    scores = [dict(kv.split("=") for kv in line.split() if "=" in kv) for line in lines]
    assert scores[0].keys() == {"fd", "kid", "precision", "recall", "confidence", "class_entropy"}
    assert "(lower is better)" in lines[0] and "(higher is better" in lines[0]
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
    assert set(manifest["classifier_fd"]) == {"fd", "kid", "precision", "recall", "confidence", "class_entropy",
                                              "classifier"}
    assert manifest["classifier_fd"]["classifier"] == cache  # beside the run
    assert os.stat(cache).st_mtime_ns == written  # read there, not trained anew
    assert "classifier measure: fd=" in capsys.readouterr().out


def test_precision_and_recall_of_a_set_against_itself_and_a_far_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64)
    far = torch.randn(200, 16, generator=g, dtype=torch.float64) + 100
    assert q.precision_recall(a, a) == (1.0, 1.0)
    assert q.precision_recall(a, far) == (0.0, 0.0)
    # In chunks of 7 rows the distances are the same: the chunks cover every row once.
    near = torch.randn(200, 16, generator=g, dtype=torch.float64) + 0.5
    assert q.manifold_coverage(near, a, chunk=7) == q.manifold_coverage(near, a) > 0


def test_a_fake_set_that_covers_one_of_two_clusters_is_precise_without_recall():
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(100, 8, generator=g, dtype=torch.float64)
    real = torch.cat([cluster, torch.randn(100, 8, generator=g, dtype=torch.float64) + 20])
    precision, recall = q.precision_recall(real, cluster)
    assert precision == 1.0  # every fake is a real point
    assert recall == 0.5  # the real points of the first cluster, and none of the second


def test_precision_and_recall_count_the_kth_neighbour_of_the_other_points():
    real = torch.tensor([[0.0], [1.0], [10.0], [12.0]])  # k = 1: balls of radii 1, 1, 2 and 2
    fake = torch.tensor([[-0.5], [2.0], [7.0], [13.0]])  # radii 2.5, 2.5, 5 and 6
    # 2.0 lies on the surface of 1.0's ball (inside) and outside the others; 7.0 lies 3 from 10.0, outside.
    # Recall 1: 0.0 and 1.0 lie within 2.5 of -0.5, 10.0 and 12.0 within 6 of 13.0.
    assert q.precision_recall(real, fake, k=1) == (0.75, 1.0)


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel():
    x = [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.5, -1.0]]
    y = [[1.0, 1.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.5]]

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / 2 + 1) ** 3

    m = 4
    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    between = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    # One subset of all four points of each set (in a random order, which the estimate does not see).
    mean, std = q.kernel_inception_distance(np.array(x), np.array(y), subsets=1, subset_size=4)
    assert mean == pytest.approx(within_x + within_y - 2 * between, rel=1e-12) and std == 0
    assert q.kernel_inception_distance(np.array(x), np.array(y), subsets=3, subset_size=1000)[0] == pytest.approx(mean)


def test_kid_is_near_zero_within_a_distribution_and_positive_between_two():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 400, 16, generator=g, dtype=torch.float64)

    def kid(a, b, seed=0):
        return q.kernel_inception_distance(a, b, subsets=50, subset_size=100, seed=seed)[0]

    shifted = kid(x, y + 1)
    assert shifted > 1
    assert abs(kid(x, x)) < 0.01 * shifted and abs(kid(x, y)) < 0.01 * shifted
    assert kid(x, y) == kid(x, y) != kid(x, y, seed=1)  # seeded subsets
